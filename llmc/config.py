"""Configuration: the model shape, the training run, and the CLI generated from them.

One dataclass (`TrainConfig`) describes a run; `python -m llmc.train --help` is generated from
its fields, so a field added here is a flag there. Values left as `None` are resolved by
`resolve()` once the device is known (the no-flag demo is d12 on a GPU, a small model on a CPU).

Model presets follow llm.c: dN is N layers with the GPT-2 family's width and heads.
Shape notation used across llmc: B batch, T sequence length, C channels (n_embd), NH heads,
HS head size (C // NH), L layers, V vocabulary (50257), Vp padded vocabulary (50304).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the flag and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int = 50257  # V: the GPT-2 tokenizer's vocabulary
    padded_vocab_size: int = 50304  # Vp: V rounded up to a multiple of 128 for the matmuls
    block_size: int = 1024  # maximum sequence length (rows of wpe)

    def __post_init__(self):
        if self.n_layer < 1 or self.n_head < 1 or self.n_embd < 1:
            raise ConfigError(f"model sizes must be positive, got {self}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "pick --n-embd as a multiple of --n-head")
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError("padded_vocab_size must be >= vocab_size")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def check_batch(self, B: int, T: int) -> None:
        """ValueError unless a (B, T) batch fits the model: B, T >= 1 and T <= block_size."""
        if B < 1 or T < 1:
            raise ValueError(f"B and T must be >= 1, got B={B}, T={T}")
        if T > self.block_size:
            raise ValueError(f"T={T} is above the model's block_size={self.block_size}; "
                             f"use T <= {self.block_size}")


# name -> (n_layer, n_head, n_embd), as llm.c's -e dN presets.
PRESETS = {
    "d12": (12, 12, 768),    # GPT-2 124M
    "d24": (24, 16, 1024),   # GPT-2 350M
    "d36": (36, 20, 1280),   # GPT-2 774M
    "d48": (48, 25, 1600),   # GPT-2 1558M
    "d6": (6, 6, 384),       # a small model for CPU runs and quick GPU checks
    "d4": (4, 4, 128),       # the CPU demo: a few minutes for a visible loss drop
}


def model_config(name: str, **overrides) -> ModelConfig:
    """A preset by name ("d12", ...), with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)} "
                          "or give --n-layer/--n-head/--n-embd")
    n_layer, n_head, n_embd = PRESETS[name]
    fields = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**fields)


@dataclass
class TrainConfig:
    """Every knob of `python -m llmc.train`. `None` means: resolved from the device."""
    device: str = field(default="auto", metadata=dict(
        choices=("auto", "cuda", "cpu"), help="where to train; auto picks cuda when a GPU is visible"))
    model: Optional[str] = field(default=None, metadata=dict(
        help="preset: d12 (124M), d24 (350M), d36 (774M), d48 (1558M), d6, d4 "
             "[default: d12 on cuda, d4 on cpu]"))
    n_layer: Optional[int] = field(default=None, metadata=dict(help="override the preset's layers"))
    n_head: Optional[int] = field(default=None, metadata=dict(help="override the preset's heads"))
    n_embd: Optional[int] = field(default=None, metadata=dict(help="override the preset's width"))
    batch_size: Optional[int] = field(default=None, metadata=dict(
        help="micro-batch size B per GPU [default: 16 on cuda, 8 on cpu]"))
    seq_len: Optional[int] = field(default=None, metadata=dict(
        help="sequence length T [default: 1024 on cuda, 64 on cpu]"))
    total_batch_size: Optional[int] = field(default=None, metadata=dict(
        help="tokens per optimizer step; a multiple of B*T*world_size, the rest is gradient "
             "accumulation [default: B*T*world_size]"))
    max_steps: Optional[int] = field(default=None, metadata=dict(
        help="optimizer steps [default: 200 on cuda, 30 on cpu]"))
    lr: Optional[float] = field(default=None, metadata=dict(
        help="peak learning rate [default: 6e-4 on cuda, 3e-3 on cpu (the small demo model)]"))
    warmup_steps: int = field(default=0, metadata=dict(help="linear warmup steps"))
    lr_schedule: str = field(default="cosine", metadata=dict(
        choices=("cosine", "linear", "constant"), help="decay after warmup"))
    lr_decay_frac: float = field(default=0.0, metadata=dict(
        help="final learning rate as a fraction of --lr"))
    weight_decay: float = field(default=0.0, metadata=dict(help="AdamW decay on 2-D weights"))
    beta1: float = field(default=0.9, metadata=dict(help="AdamW beta1"))
    beta2: float = field(default=0.95, metadata=dict(help="AdamW beta2"))
    eps: float = field(default=1e-8, metadata=dict(help="AdamW epsilon"))
    grad_clip: float = field(default=1.0, metadata=dict(help="global-norm clip; 0 disables"))
    train_data: Optional[str] = field(default=None, metadata=dict(
        help="train shards: a file, directory or glob of .arrow token shards "
             "[default: the bundled tiny-shakespeare]"))
    val_data: Optional[str] = field(default=None, metadata=dict(
        help="validation shards [default: the bundled tiny-shakespeare validation split]"))
    val_every: int = field(default=0, metadata=dict(help="validate every N steps (and at the end); 0: only at the end"))
    val_steps: int = field(default=10, metadata=dict(help="batches per validation"))
    sample_every: int = field(default=0, metadata=dict(help="print a sample every N steps (always at the end); 0: only at the end"))
    sample_tokens: int = field(default=64, metadata=dict(help="tokens generated per sample"))
    hellaswag: Optional[str] = field(default=None, metadata=dict(
        help="a HellaSwag eval file (python -m data_tools.hellaswag) scored at every validation"))
    hellaswag_limit: Optional[int] = field(default=None, metadata=dict(
        help="score only the first N HellaSwag examples"))
    out_dir: str = field(default="out", metadata=dict(help="config.json, metrics.jsonl and checkpoints go here"))
    checkpoint_every: int = field(default=0, metadata=dict(help="checkpoint every N steps (and at the end); 0: only at the end"))
    keep_checkpoints: int = field(default=2, metadata=dict(help="how many newest checkpoints to keep"))
    resume: Optional[str] = field(default=None, metadata=dict(
        help="a checkpoint directory to continue from, or 'auto' for the newest in --out-dir"))
    init_from: Optional[str] = field(default=None, metadata=dict(
        help="start from this model's weights (fine-tuning): a Hugging Face GPT-2 directory or "
             "hub id, an llm.c .bin, an llmc checkpoint or out dir; the model shape comes from "
             "the file, the optimizer starts fresh; a run that --resume continues keeps its own"))
    seed: int = field(default=1337, metadata=dict(help="seed for the weights, the data order and sampling"))
    dtype: str = field(default="bf16", metadata=dict(
        choices=("bf16", "fp32"), help="compute dtype on cuda (the CPU path is always fp32)"))
    recompute: int = field(default=0, metadata=dict(
        choices=(0, 1), help="1: recompute GELU in the backward instead of storing it"))
    classifier_chunks: Optional[int] = field(default=None, metadata=dict(
        help="run the LM head in this many chunks of rows (smaller logits buffer) "
             "[default: one chunk per 16,384 tokens of the micro-batch]"))
    zero: Optional[int] = field(default=None, metadata=dict(
        choices=(0, 1), help="ZeRO stage: 1 shards the optimizer state over ranks [default: 1 when world size > 1]"))
    fp8: bool = field(default=False, metadata=dict(
        help="run the linear layers' products (qkv, attention and MLP projections) in fp8 on "
             "GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper): E4M3 weights "
             "and activations, E5M2 gradients, per-tensor delayed scaling; needs --dtype bf16; "
             "checkpoints stay bf16 weights"))
    fp8_wgrad: int = field(default=1, metadata=dict(
        choices=(0, 1), help="with --fp8: 1 runs the weight-gradient products in fp8 as well "
                             "(transposed fp8 copies of inputs and gradients), 0 keeps them bf16"))
    fp8_fast_accum: int = field(default=1, metadata=dict(
        choices=(0, 1), help="with --fp8: 1 lets the forward products use cuBLASLt's fast fp8 "
                             "accumulation (the backward products always promote to fp32)"))
    attention: str = field(default="auto", metadata=dict(
        choices=("auto", "flash", "matmul"), help="attention kernel on cuda: flash (bf16 tensor cores) or matmul (cuBLAS + softmax, any dtype)"))
    graphs: bool = field(default=True, metadata=dict(
        help="on cuda, replay each micro-step as a CUDA graph (no launch waits on Python); "
             "--no-graphs launches every kernel from Python"))
    log_every: int = field(default=1, metadata=dict(help="print a step line every N steps"))
    overwrite: bool = field(default=False, metadata=dict(
        help="start fresh in an --out-dir that holds another run, deleting its checkpoints, "
             "config.json and metrics.jsonl (without it such a run is refused)"))
    skip_update_lossz: float = field(default=0.0, metadata=dict(
        help="skip the optimizer update of a step whose loss z-score over the last 128 steps "
             "is above this (llm.c's outlier guard, e.g. 3); 0: never"))
    skip_update_gradz: float = field(default=0.0, metadata=dict(
        help="skip the update of a step whose gradient-norm z-score is above this; 0: never"))

    def model_config(self) -> ModelConfig:
        return model_config(self.model, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve(cfg: TrainConfig, device: str, world_size: int = 1) -> TrainConfig:
    """Fill the `None` fields for `device` ("cuda" or "cpu") and check the combination."""
    cuda = device == "cuda"
    out = dataclasses.replace(cfg, device=device)
    if out.model is None:
        out.model = "d12" if cuda else "d4"
    if out.batch_size is None:
        out.batch_size = 16 if cuda else 8
    if out.lr is None:
        out.lr = 6e-4 if cuda else 3e-3
    if out.seq_len is None:
        out.seq_len = 1024 if cuda else 64
    if out.max_steps is None:
        out.max_steps = 200 if cuda else 30
    if out.classifier_chunks is None:
        n = out.batch_size * out.seq_len
        out.classifier_chunks = n // 16384 if n % 16384 == 0 and n > 16384 else 1
    if out.zero is None:
        out.zero = 1 if world_size > 1 else 0
    if not cuda:
        out.dtype = "fp32"
    check(out, world_size)
    return out


def check(cfg: TrainConfig, world_size: int = 1) -> None:
    """Raise ConfigError naming the flag for any combination that cannot run."""
    mc = cfg.model_config()
    positive = ("batch_size", "seq_len", "max_steps", "val_steps", "log_every")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "val_every", "sample_every", "checkpoint_every", "sample_tokens"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.seq_len > mc.block_size:
        raise ConfigError(f"--seq-len {cfg.seq_len} is above the model's context of "
                          f"{mc.block_size} tokens; use --seq-len {mc.block_size} or less")
    tokens_per_micro = cfg.batch_size * cfg.seq_len * world_size
    if cfg.total_batch_size is not None:
        if cfg.total_batch_size <= 0 or cfg.total_batch_size % tokens_per_micro != 0:
            raise ConfigError(
                f"--total-batch-size {cfg.total_batch_size} is not a positive multiple of "
                f"batch-size*seq-len*world-size = {cfg.batch_size}*{cfg.seq_len}*{world_size} = "
                f"{tokens_per_micro}; pick a multiple, e.g. {tokens_per_micro * 2}")
    _check_optimizer(cfg)
    if cfg.sample_tokens > mc.block_size:
        raise ConfigError(f"--sample-tokens {cfg.sample_tokens} is above the model's context of "
                          f"{mc.block_size} tokens (each token re-runs the prefix, so this would "
                          f"take minutes); use --sample-tokens {mc.block_size} or less")
    if cfg.hellaswag_limit is not None and cfg.hellaswag_limit < 1:
        raise ConfigError(f"--hellaswag-limit must be >= 1, got {cfg.hellaswag_limit}; leave it "
                          "out to score every example")
    n_rows = cfg.batch_size * cfg.seq_len
    if cfg.classifier_chunks < 1 or n_rows % cfg.classifier_chunks != 0:
        raise ConfigError(f"--classifier-chunks {cfg.classifier_chunks} must be >= 1 and divide "
                          f"batch-size*seq-len = {n_rows}")
    if cfg.fp8 and cfg.device == "cpu":
        raise ConfigError("--fp8 needs a GPU with fp8 tensor cores (compute capability 8.9+); "
                          "the CPU path is fp32: drop --fp8 or train with --device cuda")
    if cfg.fp8 and cfg.dtype != "bf16":
        raise ConfigError(f"--fp8 runs the products in fp8 beside bf16 weights and activations; "
                          f"use --dtype bf16 (got --dtype {cfg.dtype})")
    if cfg.fp8 and (mc.n_embd % 16 or n_rows % 16):
        raise ConfigError(f"--fp8 needs n_embd ({mc.n_embd}) and batch-size*seq-len ({n_rows}) "
                          "to be multiples of 16 (cuBLASLt's fp8 rows are 16-byte aligned)")
    if cfg.keep_checkpoints < 1:
        raise ConfigError("--keep-checkpoints must be >= 1")
    if cfg.zero == 1 and world_size == 1:
        pass  # harmless: one shard is the whole buffer


def _check_optimizer(cfg: TrainConfig) -> None:
    """Every AdamW and schedule number: finite and in its range (NaN fails every comparison)."""
    def bad(flag, value, want):
        raise ConfigError(f"--{flag} must be {want}, got {value}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        bad("lr", cfg.lr, "a finite number > 0, e.g. 6e-4")
    if not (0.0 <= cfg.lr_decay_frac <= 1.0):
        bad("lr-decay-frac", cfg.lr_decay_frac, "in [0, 1]")
    for name in ("beta1", "beta2"):
        if not (0.0 <= getattr(cfg, name) < 1.0):
            bad(name, getattr(cfg, name), "in [0, 1), e.g. 0.9 and 0.95")
    if not (math.isfinite(cfg.eps) and cfg.eps > 0):
        bad("eps", cfg.eps, "a finite number > 0 (0 divides 0 by 0 for unused rows), e.g. 1e-8")
    for name in ("weight_decay", "grad_clip", "skip_update_lossz", "skip_update_gradz"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            bad(name.replace("_", "-"), value, "a finite number >= 0")


def grad_accum_steps(cfg: TrainConfig, world_size: int = 1) -> int:
    """Micro-steps per optimizer step."""
    per_micro = cfg.batch_size * cfg.seq_len * world_size
    total = cfg.total_batch_size or per_micro
    return total // per_micro


# ----------------------------------------------------------------------------------------------
# CLI generated from the dataclass

def _arg_type(tp):
    """The argparse type for a field annotation (Optional[X] -> X)."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), {"Optional": Optional})  # annotations are strings here
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    return tp


def build_parser(prog: str = "python -m llmc.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train GPT-2 with llmc. With no flags: a quick demo on the bundled "
        "tiny-shakespeare (d12 on a GPU, a small model on a CPU).")
    for f in dataclasses.fields(TrainConfig):
        tp = _arg_type(f.type)
        text = f.metadata.get("help", "")
        if tp is bool:  # a switch: --overwrite; one on by default also gets --no-X
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action=action,
                                default=f.default, help=text)
            continue
        if f.default is not None and "[default" not in text:  # one default per flag, one format
            text += f" [default: {f.default}]"
        kw = dict(type=tp, default=f.default, help=text)
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)
    return parser


def parse_args(argv=None) -> TrainConfig:
    """argv -> TrainConfig; argparse exits with a usage line on unknown flags or bad types."""
    ns = build_parser().parse_args(argv)
    return TrainConfig(**vars(ns))
