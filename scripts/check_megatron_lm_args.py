"""Checks a ``pretrain_gpt.py`` command line without a GPU: Megatron-LM parses and validates it, its
``--spec MODULE NAME`` resolves, as Megatron-LM resolves it, to a ``ModuleSpec``, and with ``--forward N``
Megatron-LM's own ``gpt_builder`` builds the model from the parsed arguments (on the CPU, in float32)
and runs one forward and backward pass over ``N`` tokens (gloo, Triton's interpreter).

``scripts/fetch_megatron_lm.sh`` puts Megatron-LM's source in ``megatron-lm/``; ``scripts/gpu_megatron_lm.sh
--check`` runs this for each of its commands:

    python scripts/check_megatron_lm_args.py megatron-lm [--forward N] -- [pretrain_gpt.py arguments ...]

Exit status 0 when all of that runs; the GPU run itself (CUDA, NCCL, bf16, the distributed optimizer,
checkpoints) is not checked here.
"""
from __future__ import annotations

import os
import sys
import typing


def forward_backward(args, tokens: int) -> float:
    """Megatron-LM's GPT from ``args`` (float32, on the CPU): the loss of one forward and backward pass."""
    import contextlib
    import tempfile
    from unittest import mock

    import torch
    import torch.distributed as dist
    from gpt_builders import gpt_builder  # Megatron-LM's, beside pretrain_gpt.py
    from megatron.core import parallel_state, tensor_parallel

    from nsa_parallel.train.cpu_stand_ins import cpu_stand_ins

    os.environ.setdefault("TRITON_INTERPRET", "1")
    args.bf16, args.params_dtype, args.use_cpu_initialization = False, torch.float32, True
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model = gpt_builder(args, pre_process=True, post_process=True)
    ids = torch.randint(args.padded_vocab_size, (1, tokens + 1))
    # DotProductAttention (the default spec) draws dropout inside the model-parallel CUDA RNG tracker,
    # which has no states on the CPU: there its fork does nothing.
    tracker = tensor_parallel.random.get_cuda_rng_tracker()
    with cpu_stand_ins(), mock.patch.object(tracker, "fork", contextlib.nullcontext):
        loss = model(ids[:, :-1], torch.arange(tokens)[None], None, labels=ids[:, 1:]).mean()
        loss.backward()
    grads = [p.grad for p in model.parameters()]
    if any(g is None or not torch.isfinite(g).all() for g in grads):
        raise RuntimeError("a parameter has no finite gradient")
    return loss.item()


def main(argv: list[str]) -> int:
    megatron_lm, argv = argv[0], argv[1:]
    separator = argv.index("--")
    ours, args = argv[:separator], argv[separator + 1:]
    tokens = int(ours[ours.index("--forward") + 1]) if "--forward" in ours else 0
    sys.path.insert(0, os.path.abspath(megatron_lm))
    if not hasattr(typing, "override"):  # Megatron-LM 0.19's training package needs Python 3.12's
        typing.override = lambda f: f  # the GPU image runs 3.12; a CPU check may run on 3.10/3.11
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    from megatron.core.transformer.spec_utils import ModuleSpec, import_module
    from megatron.training import arguments

    sys.argv = ["pretrain_gpt.py", *args]
    defaults = {"tokenizer_type": "GPT2BPETokenizer"}  # pretrain_gpt.py's own
    if hasattr(arguments, "parse_and_validate_args"):  # 0.19: pretrain_gpt.py's own call
        parsed = arguments.parse_and_validate_args(args_defaults=defaults)
    else:  # 0.16: what initialize_megatron does
        from megatron.training.global_vars import set_global_variables

        parsed = arguments.parse_args()
        arguments.validate_args(parsed, defaults)
        set_global_variables(parsed)
    # (both build the tokenizer, hence the padded vocabulary, and set Megatron-LM's globals)
    if parsed.spec is not None:
        spec = import_module(parsed.spec)  # exactly what gpt_builders.gpt_builder does with --spec
        if not isinstance(spec, ModuleSpec):
            print(f"--spec {' '.join(parsed.spec)} is a {type(spec).__name__}, not a ModuleSpec", file=sys.stderr)
            return 1
        print(f"--spec {' '.join(parsed.spec)}: ModuleSpec of {spec.module.__name__}, self_attention "
              f"{spec.submodules.self_attention.module.__name__}")
    print(f"parsed: {parsed.num_layers} layers, hidden {parsed.hidden_size}, seq {parsed.seq_length}, "
          f"recompute {parsed.recompute_granularity}, bf16 {parsed.bf16}, "
          f"distributed optimizer {parsed.use_distributed_optimizer}")
    if tokens:
        print(f"Megatron-LM's gpt_builder, float32 on the CPU: loss {forward_backward(parsed, tokens):.4f} over "
              f"{tokens} tokens, every parameter with a finite gradient")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
