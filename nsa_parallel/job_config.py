"""The training job's configuration: OmegaConf YAML files checked against a typed schema.

A file may name another with ``base: other.yaml`` (relative to itself); its keys override
the base's, and command-line dotlist overrides (``train.max_steps=100``) override both.
Unknown keys, wrong types, invalid values and YAML syntax errors (with the file, line and
column) are errors naming the key, raised before any worker starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import NSAConfig


@dataclass
class ModelSection:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: int = 16
    ffn_hidden_size: int = 256
    vocab_size: int = 64
    rotary_base: float = 10000.0
    attention: str = "nsa"  # "nsa", or "full": Megatron's own attention spec (the baseline)


@dataclass
class NSASection:
    compress_block_size: int = 32
    compress_stride: int = 16
    select_block_size: int = 64
    num_selected_blocks: int = 16
    window_size: int = 512


@dataclass
class ParallelSection:
    tensor_model_parallel_size: int = 1
    context_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1


@dataclass
class TrainSection:
    max_steps: int = 100
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    output_dir: str = "outputs/run"
    checkpoint_interval: int = 50
    log_interval: int = 10
    keep_checkpoints: int = 2  # older checkpoints are deleted once a newer one is complete
    clip_grad: float = 1.0  # max global gradient norm; 0 turns clipping off
    seed: int = 1234
    precision: str = "bf16"
    # "token": the loss is the mean over all loss tokens (Megatron's); "sample": the mean of each
    # sample's own mean, so a task mix weighs its tasks by samples, not by their loss tokens.
    loss_normalization: str = "token"
    # Megatron's activation recomputation (TransformerConfig's fields of the same names): None keeps
    # every activation; "full" recomputes whole layers (recompute_method "uniform": groups of
    # recompute_num_layers layers; "block": the first recompute_num_layers layers of each stage);
    # "selective" recomputes recompute_modules (None: Megatron's default, core_attn) inside each layer:
    # core_attn, the attention in Megatron's core_attention slot (SDPA, or NSA's core with phi); mlp and
    # layernorm: see BROKEN_RECOMPUTE_MODULES.
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: Optional[list[str]] = None
    # A checkpoint (step_N directory) or run directory whose weights a new run starts from, with
    # step 0 and a fresh optimizer (Megatron-LM's --pretrained-checkpoint --finetune); model.* and
    # nsa.* as there, train.seq_length free (context extension). See nsa_parallel.train.init_from.
    init_from: Optional[str] = None


@dataclass
class DataSection:
    path: Optional[str] = None  # Megatron indexed dataset prefix; None: the built-in retrieval task
    num_pairs: int = 32  # retrieval and MQAR: key-value pairs spread through each sequence, all queried at its end
    # Task -> weight: each sample is one task, drawn in proportion (lm: the text, passkey, mqar; see
    # nsa_parallel.train.tasks), with data.path as the corpus. Empty: data.path's text as it is.
    mix: dict[str, float] = field(default_factory=dict)
    # Token id that ends a document: each document then attends only to itself (packed sequences,
    # positions from 0 per document). None: sequences run across documents.
    eod_token: Optional[int] = None


@dataclass
class LaunchSection:
    address: Optional[str] = None  # Ray cluster address; None: an embedded local Ray
    num_workers: int = 1
    gpus_per_worker: int = 0
    cpus_per_worker: int = 1
    max_failures: int = 3  # worker-group restarts after a worker dies (each resumes from the latest checkpoint)


@dataclass
class JobConfig:
    model: ModelSection = field(default_factory=ModelSection)
    nsa: NSASection = field(default_factory=NSASection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    launch: LaunchSection = field(default_factory=LaunchSection)

    @property
    def nsa_config(self) -> NSAConfig:
        return NSAConfig(**{f.name: getattr(self.nsa, f.name) for f in fields(NSASection)})

    @property
    def world_size(self) -> int:
        return self.launch.num_workers

    @property
    def data_parallel_size(self) -> int:
        p = self.parallel
        return self.world_size // (p.tensor_model_parallel_size * p.context_parallel_size
                                   * p.pipeline_model_parallel_size)


PRECISIONS = ("bf16", "fp32")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
# Megatron's selective recomputation of a dense GPT's parts (its MoE and MLA ones have no place here).
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
# Those that megatron-core cannot run for these models (the backward pass would fail), and why.
BROKEN_RECOMPUTE_MODULES = {
    "mlp": "megatron-core (0.16 to 0.19) recomputes the MLP through its CheckpointFunction, which hands back "
           "linear_fc2's bias Parameter itself; autograd gives that Parameter the checkpoint's grad_fn and the "
           "backward pass recurses without end (these models have linear biases)",
    "layernorm": "megatron-core (0.16 to 0.19) takes every CheckpointWithoutOutput for an fp8 one "
                 "(`self.fp8 = fp8 is not None`) and then needs Transformer Engine, which nsa-train does not use",
}
LOSS_NORMALIZATIONS = ("token", "sample")
ATTENTIONS = ("nsa", "full")


def _layers(path: Path, seen: tuple[Path, ...] = ()) -> list:
    """The file and its ``base:`` chain, base first."""
    path = path.resolve()
    if path in seen:
        raise ValueError(f"base: {path} includes itself")
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        node = OmegaConf.load(path)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ValueError(f"config file {path}: YAML syntax error at {where}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path}: YAML error: {err}") from None
    if not isinstance(node, DictConfig):
        raise ValueError(f"config file {path}: must be a mapping of sections (model:, train:, ...)")
    base = node.pop("base", None)
    return (_layers(path.parent / base, seen + (path,)) if base else []) + [node]


def load_job_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Loads ``path`` (with its ``base:`` chain) and dotlist ``overrides``, then validates."""
    layers = _layers(Path(path))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(JobConfig), *layers,
                                 OmegaConf.from_dotlist(list(overrides or [])))
    except OmegaConfBaseException as err:  # unknown key or wrong type, named by OmegaConf
        raise ValueError(f"invalid config {path}: {err}") from None
    except yaml.YAMLError as err:  # an override's value
        raise ValueError(f"invalid override in {overrides}: {err}") from None
    config: JobConfig = OmegaConf.to_object(merged)
    validate(config)
    return config


def _positive(section: object, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            raise ValueError(f"{prefix}.{name} ({value}) must be positive")


def validate(c: JobConfig) -> None:
    """Checks values and their relations; every message names the key."""
    try:
        c.nsa_config
    except ValueError as err:
        raise ValueError(f"nsa.{err}") from None
    m, p, t, lc = c.model, c.parallel, c.train, c.launch
    _positive(m, "model", ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                           "kv_channels", "ffn_hidden_size", "vocab_size"))
    _positive(p, "parallel", ("tensor_model_parallel_size", "context_parallel_size",
                              "pipeline_model_parallel_size"))
    _positive(t, "train", ("max_steps", "seq_length", "micro_batch_size", "global_batch_size",
                           "checkpoint_interval", "log_interval", "keep_checkpoints"))
    _positive(lc, "launch", ("num_workers", "cpus_per_worker"))
    if lc.gpus_per_worker not in (0, 1):
        raise ValueError(f"launch.gpus_per_worker ({lc.gpus_per_worker}) must be 0 (CPU) or 1: one worker per GPU")
    if lc.max_failures < 0:
        raise ValueError(f"launch.max_failures ({lc.max_failures}) must not be negative")
    _check_numbers(c)
    if t.init_from is not None and not t.init_from.strip():
        raise ValueError("train.init_from must be a checkpoint or run directory, or null")
    if t.loss_normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"train.loss_normalization ({t.loss_normalization!r}) must be one of {LOSS_NORMALIZATIONS}")
    if t.loss_normalization == "sample" and c.data.eod_token is not None:
        raise ValueError("train.loss_normalization=sample and data.eod_token cannot be combined: a row of packed "
                         "documents is not one sample")
    if t.precision not in PRECISIONS:
        raise ValueError(f"train.precision ({t.precision!r}) must be one of {PRECISIONS}")
    if t.precision == "bf16" and lc.gpus_per_worker == 0:
        raise ValueError("train.precision (bf16) needs GPUs: set launch.gpus_per_worker=1 or train.precision=fp32")
    if m.attention not in ATTENTIONS:
        raise ValueError(f"model.attention ({m.attention!r}) must be one of {ATTENTIONS}")
    if m.attention == "full" and p.context_parallel_size > 1:
        raise ValueError("model.attention=full (torch SDPA as Megatron's core attention) does not support "
                         f"parallel.context_parallel_size ({p.context_parallel_size}) > 1")
    if m.num_attention_heads % m.num_query_groups:
        raise ValueError(f"model.num_attention_heads ({m.num_attention_heads}) must be a multiple of "
                         f"model.num_query_groups ({m.num_query_groups})")
    tp = p.tensor_model_parallel_size
    if m.vocab_size % tp:
        raise ValueError(f"model.vocab_size ({m.vocab_size}) must be divisible by "
                         f"parallel.tensor_model_parallel_size ({tp})")
    if m.num_query_groups % tp:
        raise ValueError(f"model.num_query_groups ({m.num_query_groups}) must be divisible by "
                         f"parallel.tensor_model_parallel_size ({tp})")
    pp = p.pipeline_model_parallel_size
    if m.num_layers % pp:  # Megatron splits the layers evenly over the stages
        raise ValueError(f"model.num_layers ({m.num_layers}) must be divisible by "
                         f"parallel.pipeline_model_parallel_size ({pp})")
    model_parallel = tp * p.context_parallel_size * pp
    if lc.num_workers % model_parallel:
        raise ValueError(f"launch.num_workers ({lc.num_workers}) must be a multiple of "
                         "parallel.tensor_model_parallel_size x parallel.context_parallel_size x "
                         f"parallel.pipeline_model_parallel_size ({tp} x {p.context_parallel_size} x {pp} = "
                         f"{model_parallel})")
    # Megatron's load-balanced layout cuts the sequence into 2*CP chunks of whole selection blocks.
    chunk = 2 * p.context_parallel_size * c.nsa.select_block_size
    if t.seq_length % chunk:
        raise ValueError(f"train.seq_length ({t.seq_length}) must be divisible by 2 x "
                         f"parallel.context_parallel_size x nsa.select_block_size ({chunk})")
    _check_recompute(c)
    if c.data.path is None:
        _check_retrieval_task(c)
    if c.data.mix:
        _check_task_mix(c)
    if c.data.eod_token is not None:
        _check_documents(c)
    per_step = t.micro_batch_size * c.data_parallel_size
    if t.global_batch_size % per_step:
        raise ValueError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                         f"train.micro_batch_size x data-parallel size ({per_step})")


def _check_numbers(c: JobConfig) -> None:
    """The float keys (NaN and inf parse as floats) and the integers without a positive rule."""
    m, t = c.model, c.train
    finite = math.isfinite
    rules = (  # key, value, holds, rule; train.lr comes before train.min_lr, which it bounds
        ("model.rotary_base", m.rotary_base, finite(m.rotary_base) and m.rotary_base > 0, "positive and finite"),
        ("train.lr", t.lr, finite(t.lr) and t.lr > 0, "positive and finite"),
        ("train.min_lr", t.min_lr, 0 <= t.min_lr <= t.lr, f"in [0, train.lr ({t.lr})]"),
        ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, ">= 0"),
        ("train.weight_decay", t.weight_decay, finite(t.weight_decay) and t.weight_decay >= 0, "finite and >= 0"),
        ("train.clip_grad", t.clip_grad, finite(t.clip_grad) and t.clip_grad >= 0,
         "finite and >= 0 (0 turns clipping off)"),
        # numpy's RandomState (GPTDataset's shuffle) takes seeds in [0, 2**32)
        ("train.seed", t.seed, 0 <= t.seed < 2**32, "in [0, 2**32)"),
    )
    for key, value, holds, rule in rules:
        if not holds:
            raise ValueError(f"{key} ({value}) must be {rule}")


def _check_recompute(c: JobConfig) -> None:
    """Megatron's rules for its recomputation fields, as errors naming our keys, before any worker starts."""
    t = c.train
    granularity, method, num_layers, modules = (t.recompute_granularity, t.recompute_method,
                                                t.recompute_num_layers, t.recompute_modules)
    if granularity not in RECOMPUTE_GRANULARITIES:
        raise ValueError(f"train.recompute_granularity ({granularity!r}) must be null, 'full' or 'selective'")
    now = "null" if granularity is None else granularity
    if granularity != "full":
        for key, value in (("recompute_method", method), ("recompute_num_layers", num_layers)):
            if value is not None:
                raise ValueError(f"train.{key} ({value!r}) applies to train.recompute_granularity=full only "
                                 f"(it is {now}): leave it null")
    if granularity != "selective" and modules is not None:
        raise ValueError(f"train.recompute_modules ({modules}) applies to train.recompute_granularity=selective "
                         f"only (it is {now}): leave it null")
    if granularity == "full":
        if method not in RECOMPUTE_METHODS:
            raise ValueError(f"train.recompute_method ({method!r}) must be one of {RECOMPUTE_METHODS} with "
                             "train.recompute_granularity=full")
        per_stage = c.model.num_layers // c.parallel.pipeline_model_parallel_size
        if num_layers is None or not 1 <= num_layers <= per_stage:
            raise ValueError(f"train.recompute_num_layers ({num_layers}) must be between 1 and the layers per "
                             f"pipeline stage, model.num_layers / parallel.pipeline_model_parallel_size ({per_stage}), "
                             "with train.recompute_granularity=full")
        if method == "uniform" and per_stage % num_layers:  # Megatron's groups would run past the last layer
            raise ValueError(f"train.recompute_num_layers ({num_layers}) must divide the layers per pipeline "
                             f"stage ({per_stage}) with train.recompute_method=uniform")
    if granularity == "selective":
        chosen = ["core_attn"] if modules is None else modules
        unknown = [name for name in chosen if name not in RECOMPUTE_MODULES]
        if unknown or not chosen:
            raise ValueError(f"train.recompute_modules ({modules}) must be a non-empty list of {RECOMPUTE_MODULES}")
        for name in chosen:
            if name in BROKEN_RECOMPUTE_MODULES:
                raise ValueError(f"train.recompute_modules: {name} is refused: {BROKEN_RECOMPUTE_MODULES[name]}; "
                                 "use core_attn or train.recompute_granularity=full")


def _check_documents(c: JobConfig) -> None:
    """Document boundaries need a corpus with documents and NSA's attention."""
    eod = c.data.eod_token
    if not 0 <= eod < c.model.vocab_size:
        raise ValueError(f"data.eod_token ({eod}) must be a token id in [0, model.vocab_size ({c.model.vocab_size}))")
    if c.data.path is None:
        raise ValueError("data.eod_token needs data.path: the built-in retrieval task has no documents")
    if c.model.attention != "nsa":
        raise ValueError(f"data.eod_token needs model.attention=nsa (got {c.model.attention!r}): "
                         "the full-attention baseline (SDPA, causal per row) does not take packed sequences")


def _check_task_mix(c: JobConfig) -> None:
    """Known tasks, usable weights, a corpus; what depends on the corpus is checked when it is opened."""
    from .train.tasks import TASKS  # noqa: PLC0415 (train imports this module)

    d = c.data
    for name, weight in d.mix.items():
        if name not in TASKS:
            raise ValueError(f"data.mix.{name}: unknown task; the tasks are {TASKS}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"data.mix.{name} ({weight}) must be a finite weight >= 0")
    if sum(d.mix.values()) <= 0:
        raise ValueError("data.mix: at least one task needs a positive weight")
    if d.path is None:
        raise ValueError("data.mix needs data.path: the corpus the tasks' text comes from")
    if d.eod_token is not None:
        raise ValueError("data.mix and data.eod_token cannot be combined: task samples are single documents")
    if d.num_pairs <= 0:
        raise ValueError(f"data.num_pairs ({d.num_pairs}) must be positive")


def _check_retrieval_task(c: JobConfig) -> None:
    """The built-in task needs distinct key tokens and room for every pair and its query."""
    pairs = c.data.num_pairs
    if pairs <= 0:
        raise ValueError(f"data.num_pairs ({pairs}) must be positive")
    # One query token, then keys and values: half the rest each (see nsa_parallel.train.data).
    if (c.model.vocab_size - 1) // 2 < pairs:
        raise ValueError(f"data.num_pairs ({pairs}) needs model.vocab_size >= {2 * pairs + 1} "
                         f"(distinct keys), got {c.model.vocab_size}")
    if c.train.seq_length + 1 < 5 * pairs:
        raise ValueError(f"data.num_pairs ({pairs}) does not fit train.seq_length ({c.train.seq_length}): "
                         f"each pair takes 2 tokens and its query 3, so at most {(c.train.seq_length + 1) // 5}")
