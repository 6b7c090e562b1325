"""What every worker runs: build the model, resume from the latest checkpoint, train, checkpoint.

:func:`train` runs on each rank after ``torch.distributed`` is initialised (by Ray Train,
``torchrun`` or the single-process runner); it sets up Megatron's parallel state itself.
"""
from __future__ import annotations

import contextlib
import logging
import math
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from omegaconf import OmegaConf

from ..context_parallel import CommStats
from ..job_config import JobConfig
from .checkpoint import load_checkpoint, load_common, save_checkpoint, verify_checkpoint
from .checkpoint_dirs import remove_interrupted, resume_candidates
from .cpu_stand_ins import cpu_stand_ins
from .data import RetrievalTask, step_microbatches, token_source
from .errors import JobError
from .fault import maybe_crash
from .init_from import check_init_from
from .metrics import MetricsWriter
from .model import build_model, init_model_parallel
from .optimizer import DIST_CKPT_METADATA, build_optimizer
from .paths import RunPaths
from .progress import Progress
from .resume_config import check_resume_config
from .schedule import learning_rate
from .tasks import TaskMix

log = logging.getLogger(__name__)


def _parallel_layout() -> dict[str, int]:
    ps = parallel_state
    return {"tp": ps.get_tensor_model_parallel_world_size(), "cp": ps.get_context_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size()}


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _checkpoint_state(model, optimizer, step: int, consumed_samples: int, device: torch.device,
                      is_loading: bool = False, with_rng: bool = True) -> dict:
    """Model and optimizer shards, plain step/data/layout values, and this rank's RNG state."""
    model_state = model.sharded_state_dict(metadata=DIST_CKPT_METADATA)
    state = {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading),
             "step": step, "consumed_samples": consumed_samples, "parallel_layout": _parallel_layout()}
    if with_rng:
        # One RNG state per model-parallel position; data-parallel replicas hold the same one.
        ps = parallel_state
        state["rng_state"] = ShardedObject(
            "rng_state", _rng_state(device),
            (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_context_parallel_world_size()),
            (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
             ps.get_context_parallel_rank()),
            replica_id=ps.get_data_parallel_rank())
    return state


def _load(path: Path, model, optimizer, device: torch.device) -> tuple[int, int]:
    """Loads checkpoint ``path`` into the model, the optimizer and the RNGs; returns (step, consumed samples)."""
    common = load_common(path)
    # RNG states are per parallel position; after a change of layout they start afresh.
    same_layout = common["parallel_layout"] == _parallel_layout()
    template = _checkpoint_state(model, optimizer, 0, 0, device, is_loading=True, with_rng=same_layout)
    loaded = load_checkpoint(path, template)
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"], loaded["step"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return loaded["step"], loaded["consumed_samples"]


def _try_load(config: JobConfig, path: Path, model, optimizer, device: torch.device) -> tuple[int, int] | str:
    """All ranks: (step, consumed samples) from ``path``, or what is wrong with it (alike on every rank)."""
    problem = verify_checkpoint(path)
    if problem is not None:
        return problem
    check_resume_config(config, path)  # JobError, alike on every rank
    try:
        result: tuple[int, int] | str = _load(path, model, optimizer, device)
    except Exception as err:  # noqa: BLE001  a checkpoint that verifies but does not load is as bad
        result = f"it does not load ({type(err).__name__}: {err})"
    failed = torch.tensor([isinstance(result, str)], dtype=torch.int32, device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    return result if isinstance(result, str) or not failed.item() else "it does not load on another rank"


def _resume(config: JobConfig, paths: RunPaths, model, optimizer,
            device: torch.device) -> tuple[int, int, Path | None]:
    """Loads the newest checkpoint that verifies and loads, falling back from a damaged ``latest``;
    returns (step, consumed samples, its path). Raises ``JobError`` when none does: starting
    afresh would prune them."""
    rank0 = dist.get_rank() == 0
    box = [resume_candidates(paths.checkpoints) if rank0 else None]
    dist.broadcast_object_list(box, src=0)
    problems = []
    for path in box[0]:
        loaded = _try_load(config, path, model, optimizer, device)
        if not isinstance(loaded, str):
            if rank0:
                log.info("resuming from %s (step %d)", path, loaded[0])
            return *loaded, path
        if rank0:
            log.warning("checkpoint %s is damaged: %s; falling back to the previous checkpoint", path, loaded)
        problems.append(f"{path}: {loaded}")
    if problems:
        raise JobError(f"no checkpoint under {paths.checkpoints} verifies and loads:\n  " + "\n  ".join(problems)
                       + f"\nmove {paths.checkpoints} away to start afresh")
    return 0, 0, None


def _init_weights(config: JobConfig, model, optimizer) -> None:
    """A new run's weights from ``train.init_from`` (the optimizer's state and the step stay fresh)."""
    path = check_init_from(config)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise JobError(f"train.init_from: checkpoint {path} is damaged: {problem}")
    loaded = load_checkpoint(path, {"model": model.sharded_state_dict(metadata=DIST_CKPT_METADATA)})
    model.load_state_dict(loaded["model"])
    optimizer.reload_model_params()
    if dist.get_rank() == 0:
        log.info("weights from %s (train.init_from); step, optimizer and schedule start afresh", path)


def check_finite(step: int, loss: float, grad_norm: float, last_good: Path | None) -> None:
    """Stops training at a non-finite loss or gradient norm, before anything is saved or pruned.

    Both values are reduced over all ranks, so every rank stops at the same step.
    """
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    rerun = (f"the last good checkpoint is {last_good} (a rerun resumes from it)" if last_good
             else "no checkpoint was written yet (a rerun starts afresh)")
    raise JobError(f"step {step}: the loss is {loss} and the gradient norm {grad_norm}; training stopped without "
                   f"saving, and {rerun}: lower train.lr, or clip with train.clip_grad")


def packed_documents(cu_seqlens: torch.Tensor | None) -> PackedSeqParams | None:
    """Megatron's description of a row of packed documents (``data.eod_token``), or None."""
    if cu_seqlens is None:
        return None
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _loss(mb: dict[str, torch.Tensor], num_tasks: int, by_sample: bool,
          per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron's loss function for one micro-batch (last pipeline stage): (summed loss, its token or
    sample count, {"sums": [summed loss, count, per-task loss sums, per-task token counts]})."""
    sample_loss = (per_token.float() * mb["loss_mask"]).sum(-1)
    sample_tokens = mb["loss_mask"].sum(-1)
    if by_sample:
        whole = sample_tokens.clone()
        dist.all_reduce(whole, group=parallel_state.get_context_parallel_group())  # each CP rank holds a share
        loss = (sample_loss / whole.clamp(min=1)).sum()
        # A sample spans the CP ranks, which sum their counts: only CP rank 0 counts it.
        count = (whole > 0).sum() if parallel_state.get_context_parallel_rank() == 0 else torch.zeros_like(whole.sum())
    else:
        loss, count = sample_loss.sum(), sample_tokens.sum()
    # float64: token counts beyond 2**24 stay exact
    tasks = torch.zeros(2, num_tasks, dtype=torch.float64, device=loss.device)  # loss, tokens
    if "task" in mb:
        tasks.index_add_(1, mb["task"], torch.stack([sample_loss.detach(), sample_tokens]).double())
    sums = torch.cat([torch.stack([loss.detach().double(), count.double()]), tasks.flatten()])
    return loss, count.int(), {"sums": sums}


def train_step(module: torch.nn.Module, optimizer, microbatches: list[dict[str, torch.Tensor]], lr: float,
               task_names: list[str] = (), by_sample: bool = False) -> tuple[float, float, dict[str, float]]:
    """One optimizer step over this rank's micro-batches, by Megatron's schedule (1F1B across pipeline
    stages, or forward and backward in turn without pipeline parallelism); returns (global mean loss,
    grad norm, the global mean loss of each of ``task_names`` that the step's samples hold).

    The loss is the exact mean over every loss token of the global batch, or with ``by_sample``
    the mean over its samples of each sample's own mean (so that a task's share of the gradient
    is its share of the samples, however many loss tokens it has), however the batch is split
    over micro-batches, ranks and stages: each micro-batch's loss is summed (Megatron's
    ``calculate_per_token_loss``), and the optimizer's ``finalize_model_grads_func`` sums gradients
    and the token (or sample) count over all replicas and divides once. Micro-batches of a task mix
    carry each sample's task (``task``, an index into ``task_names``); per-task losses are per token.
    Every stage holds the micro-batches; the first stage reads their tokens, the last their labels.
    """
    optimizer.zero_grad()
    device = microbatches[0]["tokens"].device

    def forward_step(batches, model):
        mb = next(batches)
        output = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"],
                       packed_seq_params=packed_documents(mb.get("cu_seqlens")))
        return output, partial(_loss, mb, len(task_names), by_sample)

    micro_batch_size, local_length = microbatches[0]["tokens"].shape
    with cpu_stand_ins() if device.type == "cpu" else contextlib.nullcontext():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(microbatches), model=module,
            num_microbatches=len(microbatches), micro_batch_size=micro_batch_size,
            # the whole sequence: the schedule sizes what stages exchange as its share per CP rank
            seq_length=local_length * parallel_state.get_context_parallel_world_size(), forward_only=False)
    grad_norm = optimizer.step(lr)
    # The sums exist on the last stage: over its DP x CP replicas, then (the other stages adding
    # zeros) to every stage, so that every rank sees the same loss.
    sums = sum((out["sums"] for out in outputs), torch.zeros(2 + 2 * len(task_names), dtype=torch.float64,
                                                              device=device))
    dist.all_reduce(sums, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
    tasks = sums[2:].view(2, -1)
    per_task = {name: (tasks[0, i] / tasks[1, i]).item() for i, name in enumerate(task_names) if tasks[1, i] > 0}
    return (sums[0] / sums[1].clamp(min=1)).item(), grad_norm, per_task


def take_comm_stats(model: torch.nn.Module) -> dict[str, float]:
    """MiB this rank's NSA layers exchanged for context parallelism since the last call, by path."""
    totals: dict[str, int] = {}
    for module in model.modules():
        stats = getattr(module, "comm_stats", None)
        if isinstance(stats, CommStats):
            for key, value in stats.as_dict().items():
                totals[key] = totals.get(key, 0) + value
            stats.reset()
    return {f"cp_comm/{key}_MiB": value / 2**20 for key, value in totals.items() if value}


def train(config: JobConfig, device: torch.device) -> None:
    """Trains ``config`` on this rank until ``train.max_steps``, resuming from the latest checkpoint."""
    t = config.train
    paths = RunPaths(Path(t.output_dir))
    rank0 = dist.get_rank() == 0
    init_model_parallel(config, device)
    try:
        if rank0:
            paths.checkpoints.mkdir(parents=True, exist_ok=True)
            remove_interrupted(paths.checkpoints)
        dist.barrier()
        model = build_model(config, device)
        optimizer = build_optimizer(model, t, device)
        source = token_source(config, paths.data_cache)
        step, consumed, last_good = _resume(config, paths, model, optimizer, device)
        if last_good is None and t.init_from:
            _init_weights(config, model, optimizer)
        if rank0:
            log.info("%s attention, %.1fM parameters per model-parallel rank, parallel layout %s; steps %d to %d",
                     config.model.attention, sum(p.numel() for p in model.parameters()) / 1e6, _parallel_layout(),
                     step + 1, t.max_steps)
            if isinstance(source, RetrievalTask):
                log.info("retrieval task: %d key-value pairs per sequence; loss %.2f is guessing a value, "
                         "lower means the model finds the pairs in its context", config.data.num_pairs,
                         source.guessing_loss)
        ps = parallel_state
        task_names = source.names if isinstance(source, TaskMix) else []
        metrics = MetricsWriter(paths, step) if rank0 else None
        progress = Progress(step, t.max_steps, t.log_interval, t.global_batch_size * t.seq_length) if rank0 else None
        job_yaml = OmegaConf.to_yaml(OmegaConf.structured(config))
        while step < t.max_steps:
            lr = learning_rate(step, t)
            batches = step_microbatches(source, consumed, config, ps.get_data_parallel_rank(),
                                        ps.get_data_parallel_world_size(), ps.get_context_parallel_rank(),
                                        ps.get_context_parallel_world_size(), device)
            loss, grad_norm, task_losses = train_step(optimizer.module, optimizer, batches, lr, task_names,
                                                      t.loss_normalization == "sample")
            step, consumed = step + 1, consumed + t.global_batch_size
            maybe_crash("step", step, paths.checkpoints)
            comm = take_comm_stats(model)
            if rank0:
                tokens_per_s = progress.update(step, loss, lr, grad_norm)
                metrics.write(step, {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                                     **{f"loss/{name}": value for name, value in task_losses.items()}, **comm})
                if comm and step == 1:
                    log.info("context-parallel bytes of rank 0 in step 1 (MiB): %s",
                             {k.removeprefix("cp_comm/"): round(v, 2) for k, v in comm.items()})
            check_finite(step, loss, grad_norm, last_good)
            if step % t.checkpoint_interval == 0 or step == t.max_steps:
                state = _checkpoint_state(model, optimizer, step, consumed, device)
                last_good = save_checkpoint(paths.checkpoints, step, state, t.keep_checkpoints, {"job.yaml": job_yaml})
                if rank0:
                    log.info("saved checkpoint %s", last_good)
                    progress.restart_clock()  # tokens/s counts training time only
        if rank0:
            progress.close()
            metrics.close()
    finally:
        parallel_state.destroy_model_parallel()
