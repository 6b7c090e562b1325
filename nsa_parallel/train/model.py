"""Megatron parallel state and the GPT model a job config describes."""
from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from ..job_config import JobConfig
from ..megatron import CPURotaryEmbedding, get_gpt_layer_nsa_spec, get_gpt_layer_sdpa_spec


def init_model_parallel(config: JobConfig, device: torch.device) -> None:
    """Megatron's TP/CP/PP groups (DP is what is left) on the already initialised default group.

    Seeds every rank alike first, so data-parallel replicas start from the same weights.
    """
    p = config.parallel
    if device.type == "cuda":
        torch.cuda.set_device(device)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size)
    torch.manual_seed(config.train.seed)
    if device.type == "cuda":
        # Megatron's tracker gives each TP rank its own stream for TP-split weights.
        tensor_parallel.model_parallel_cuda_manual_seed(config.train.seed)


def transformer_config(config: JobConfig, device: torch.device) -> TransformerConfig:
    m, p, t = config.model, config.parallel, config.train
    bf16 = t.precision == "bf16"
    variable = config.data.eod_token is not None and p.pipeline_model_parallel_size > 1
    return TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups, kv_channels=m.kv_channels, ffn_hidden_size=m.ffn_hidden_size,
        tensor_model_parallel_size=p.tensor_model_parallel_size, context_parallel_size=p.context_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        # What stages send each other; packed documents make a micro-batch's length vary, so stages
        # exchange shapes first. Megatron refuses that with its default MoE dispatcher even without
        # experts (none here); alltoall is the one it names.
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        variable_seq_lengths=variable, moe_token_dispatcher_type="alltoall" if variable else "allgather",
        hidden_dropout=0.0, attention_dropout=0.0,
        recompute_granularity=t.recompute_granularity, recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers, recompute_modules=t.recompute_modules,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=device.type == "cpu",
        # Losses are summed over tokens and divided by the global token count once
        # (see trainer.train_step), so gradients are summed, not averaged, over replicas.
        calculate_per_token_loss=True)


def layer_spec(config: JobConfig) -> ModuleSpec:
    """NSA's layer spec, or for ``attention=full`` Megatron's local spec with torch's fused SDPA as core
    attention (the same norms and linear layers as NSA's spec, on the CPU and GPUs alike)."""
    if config.model.attention == "nsa":
        return get_gpt_layer_nsa_spec(config.nsa_config, rotary_base=config.model.rotary_base)
    return get_gpt_layer_sdpa_spec()


def seeded_layers(spec: ModuleSpec, seed: int, layers_per_stage: int) -> ModuleSpec:
    """``spec`` with the RNGs seeded from ``seed`` and the layer's global number before each layer is
    made. Megatron draws initial weights layer after layer (on the CPU from the torch RNG, on GPUs
    from the CUDA RNG and its model-parallel tracker), so without this a stage's first layer would
    get the draws of the model's first layer: seeded per layer, the initial model is the same however
    the layers are split over pipeline stages (and the embedding and output layer, drawn before and
    after them, too)."""
    layer_class = spec.module

    class SeededLayer(layer_class):
        def __init__(self, config: TransformerConfig, *args, layer_number: int = 1, **kwargs):
            # Megatron passes the number within the stage (the offset is the layer's own business)
            first = parallel_state.get_pipeline_model_parallel_rank() * layers_per_stage
            torch.manual_seed(seed + first + layer_number)
            if not config.use_cpu_initialization:
                tensor_parallel.model_parallel_cuda_manual_seed(seed + first + layer_number)
            super().__init__(config, *args, layer_number=layer_number, **kwargs)

    SeededLayer.__name__ = SeededLayer.__qualname__ = layer_class.__name__  # as Megatron's logs name it
    return dataclasses.replace(spec, module=SeededLayer)


def build_model(config: JobConfig, device: torch.device) -> GPTModel:
    """This pipeline stage's part of the GPT model on ``device`` (Megatron's even split of the layers;
    the embedding on the first stage, the output layer and loss on the last), with Megatron's rotary
    embedding for either attention; on the CPU its table stays on the CPU (:class:`CPURotaryEmbedding`),
    where Megatron's would move it to CUDA."""
    tc = transformer_config(config, device)
    rotary_base = int(config.model.rotary_base)
    model = GPTModel(
        config=tc, vocab_size=config.model.vocab_size,
        transformer_layer_spec=seeded_layers(layer_spec(config), config.train.seed,
                                             tc.num_layers // tc.pipeline_model_parallel_size),
        max_sequence_length=config.train.seq_length, position_embedding_type="rope", rotary_base=rotary_base,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage())
    if device.type == "cpu":
        # The arguments GPTModel gave Megatron's (rotary_percent 1, no scaling): no weights to carry over.
        model.rotary_pos_emb = CPURotaryEmbedding(
            kv_channels=tc.kv_channels, rotary_percent=1.0, rotary_interleaved=tc.rotary_interleaved,
            rotary_base=rotary_base, use_cpu_initialization=True, cp_group=model.rotary_pos_emb.cp_group)
    return model.to(device)
