"""Gradient synchronisation and AdamW: Megatron's DDP + distributed optimizer on GPUs, plain torch on CPUs.

Both sum each step's per-token losses, sum gradients over the data-parallel and
context-parallel ranks, divide by the global number of loss tokens, clip by the norm
over all model-parallel shards (every tensor- and pipeline-parallel rank) and step AdamW;
biases and norm weights get no weight decay. Megatron's pipeline schedules finish the
gradients themselves, calling the config's ``finalize_model_grads_func`` after the last
backward pass: each optimizer installs its own there (Megatron's ``finalize_model_grads`` on
GPUs). Megatron's DDP and optimizer keep their buffers on CUDA, hence the CPU twin.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    optim_state_to_sharding_state,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..compression import BlockCompressor
from ..job_config import TrainSection

ADAM_BETAS = (0.9, 0.95)  # the usual LLM pre-training setting
ADAM_EPS = 1e-8
# Optimizer state sharded per DP rank as laid out in memory: the fastest save and load
# (resharding only over DP); Megatron-LM's default.
DIST_CKPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _decays(name: str, param: torch.nn.Parameter) -> bool:
    """Weight decay for weight matrices only: not for biases (Megatron's ``bias``, and ``phi``'s ``b1`` and
    ``b2``, which are 2-D: one row per KV group) nor for norms and other 1-D parameters."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim > 1 and leaf != "bias" and leaf not in BlockCompressor.BIASES


class LocalAdamW:
    """CPU: torch AdamW; gradients summed over the DP x CP group with one flat all-reduce."""

    def __init__(self, model: GPTModel, train: TrainSection):
        self.module = model  # what the forward pass runs
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if _decays(n, p)], "weight_decay": train.weight_decay},
                  {"params": [p for n, p in named if not _decays(n, p)], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.clip_grad = train.clip_grad
        self.dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.model_parallel_group = parallel_state.get_model_parallel_group()  # TP x PP
        model.config.finalize_model_grads_func = self.finalize_grads

    def reload_model_params(self) -> None:
        """Nothing to do: the optimizer updates the model's own parameters."""

    def zero_grad(self) -> None:
        for p in self.params:  # zeros, not None: the flat all-reduce needs every gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()

    def finalize_grads(self, model_chunks: list[torch.nn.Module], num_tokens: torch.Tensor, **kwargs: Any) -> None:
        """Megatron's ``finalize_model_grads`` (its call): ``num_tokens``, counted by the last pipeline
        stage, to every stage, then gradients and ``num_tokens`` (in place) summed over DP x CP and the
        gradients divided by it."""
        dist.broadcast(num_tokens, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=self.pp_group)
        dist.all_reduce(num_tokens, group=self.dp_cp_group)
        grads = [p.grad for p in self.params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.dp_cp_group)
        flat /= num_tokens.clamp(min=1)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    def step(self, lr: float) -> float:
        """Clips, steps with learning rate ``lr``; returns the gradient norm before clipping."""
        # TP-split weights count once per shard, TP-replicated ones once in all.
        squares = sum(p.grad.double().square().sum() for p in self.params if param_is_not_tensor_parallel_duplicate(p))
        squares = torch.as_tensor(squares, dtype=torch.float64)
        dist.all_reduce(squares, group=self.model_parallel_group)
        norm = squares.sqrt().item()
        if self.clip_grad > 0 and norm > self.clip_grad:
            for p in self.params:
                p.grad.mul_(self.clip_grad / (norm + 1e-6))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return norm

    def sharded_state_dict(self, model_state: ShardedStateDict, is_loading: bool = False) -> dict[str, Any]:
        """AdamW's moments sharded like their parameters; the step count is the checkpoint's own."""
        if is_loading:  # the load template needs every moment to exist already
            for p in self.params:
                state = self.optimizer.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state = self.optimizer.state_dict()
        optim_state_to_sharding_state(state, get_param_id_to_sharded_param_map(model_state, self.params),
                                      exclude_keys=("step",))
        return state

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        for moments in state["state"].values():
            moments["step"] = torch.tensor(float(step))
        self.optimizer.load_state_dict(state)


class MegatronAdamW:
    """GPU: Megatron's ``DistributedDataParallel`` and distributed optimizer (fp32 main weights under bf16)."""

    def __init__(self, model: GPTModel, train: TrainSection):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, ParamKey, get_megatron_optimizer
        from megatron.core.optimizer.optimizer_config import ParamWithNamePredicate
        from megatron.core.transformer.module import Float16Module

        config = model.config
        config.finalize_model_grads_func = finalize_model_grads
        module = Float16Module(config, model) if config.bf16 else model
        self.module = DistributedDataParallel(
            config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True), module)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
                            adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1], adam_eps=ADAM_EPS,
                            clip_grad=train.clip_grad, bf16=config.bf16, params_dtype=config.params_dtype,
                            use_distributed_optimizer=True),
            [self.module],
            # The same rule as LocalAdamW's, in place of Megatron's (".bias" or 1-D), which decays phi's biases.
            config_overrides={ParamKey(with_name_predicate=ParamWithNamePredicate(
                name="no_weight_decay", fn=lambda param, name: not _decays(name, param))): {"wd_mult": 0.0}})

    def zero_grad(self) -> None:
        self.module.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        _, grad_norm, _ = self.optimizer.step()
        return float(grad_norm or 0.0)

    def _torch_adam_states(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """(fp32 main-weight shard, its state) of the torch Adams inside Megatron's optimizer; none with fused Adams.

        Without Apex or Transformer Engine, megatron-core (0.16-0.19) wraps torch's Adam and
        mishandles its per-parameter ``step`` tensor when loading; the methods below repair it.
        """
        states = []
        for inner in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            adam = inner.optimizer
            if isinstance(adam, torch.optim.Adam | torch.optim.AdamW):
                states += [(p, adam.state[p]) for group in adam.param_groups for p in group["params"]]
        return states

    def reload_model_params(self) -> None:
        """After weights were loaded into the model: its fp32 main weights from them."""
        self.optimizer.reload_model_params()

    def sharded_state_dict(self, model_state: ShardedStateDict, is_loading: bool = False) -> dict[str, Any]:
        if is_loading:
            # Megatron's load template asserts that all states hold one step, and a fresh optimizer
            # has no state at all: zero moments and step 0, as LocalAdamW does.
            for param, state in self._torch_adam_states():
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                 exp_avg_sq=torch.zeros_like(param))
        return self.optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=DIST_CKPT_METADATA)

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        self.optimizer.load_state_dict(state)
        # Megatron copies each state's step from the load template (0) and gives all
        # parameters one shared tensor, which torch's Adam would increment once per parameter.
        for _, adam_state in self._torch_adam_states():
            adam_state["step"] = torch.tensor(float(step))


def build_optimizer(model: GPTModel, train: TrainSection, device: torch.device) -> LocalAdamW | MegatronAdamW:
    return MegatronAdamW(model, train) if device.type == "cuda" else LocalAdamW(model, train)
