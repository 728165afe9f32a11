"""Pretraining, and the training runtime that the later stages (fine-tuning, RLHF) import.

    python train.py                                   # char-level Tiny Shakespeare, a few minutes on a CPU
    python train.py --input novels/ --tokenizer gpt2  # your own text: tokenized first, then trained on
    torchrun --nproc_per_node=4 train.py --data data/tokens/novels-gpt2
    python train.py --resume out/tinyshakespeare-char # continue a run exactly where it stopped

Reads token files made by tokenizer.py (`train.bin`, `val.bin`, `meta.json`, `tokenizer.json`), or text
that it tokenizes into `data/tokens/` first. Writes `out/<run>/`: `run.json` (the resolved settings),
`log.jsonl` (one JSON object per logged step) and checkpoints `step-NNNNNN/` (model.pt, config.json,
tokenizer.json, train_state.pt), each written to a temporary folder and renamed into place.

The runtime pieces are functions: `setup_runtime` (process group and device), `autocast`,
`build_optimizers`, `lr_multiplier`, `train_step` (micro-steps with gradient accumulation and sync, then
`clip_and_step`), `save_checkpoint` / `load_train_state`, `RunLog`.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import tokenizer as tok
from model import GPT, GPTConfig, IGNORE_INDEX, find_checkpoint, load_tensor_file, read_checkpoint_config, write_checkpoint_files

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DEFAULT_INPUT = Path("data/tinyshakespeare/input.txt")


# ---------------------------------------------------------------------------------------------------
# Settings


@dataclass
class TrainConfig:
    # data
    data: str = field(default="", metadata={"help": "folder of token files made by `tokenizer.py encode`"})
    input: str = field(default="", metadata={"help": "text file or folder to tokenize and train on "
                                                     f"(default when --data is unset: {DEFAULT_INPUT}, downloaded if missing)"})
    tokenizer: str = field(default="char", metadata={"help": "tokenizer for --input: char, byte, gpt2 or a tokenizer JSON file"})
    gpt2_files: str = field(default="", metadata={"help": "folder with GPT-2's encoder.json + vocab.bpe or gpt2.tiktoken (offline use)"})
    # run
    # Not "--run": torchrun would read that as an abbreviation of its own --run-path.
    run_name: str = field(default="", metadata={"help": "output goes to <out-dir>/<run-name> (default: the data folder's name)"})
    out_dir: str = field(default="out", metadata={"help": "parent folder of runs"})
    resume: str = field(default="", metadata={"help": "run folder to continue, e.g. out/shakespeare"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing run folder of the same name"})
    seed: int = field(default=1337, metadata={"help": "random seed for weights, data windows and dropout"})
    # batch and schedule
    batch_size: int = field(default=32, metadata={"help": "micro-batch size in sequences, per process"})
    total_batch_tokens: int = field(default=0, metadata={"help": "tokens per optimizer step over all processes "
                                                                  "(0: one micro-batch per process, no accumulation)"})
    max_steps: int = field(default=600, metadata={"help": "optimizer steps"})
    optimizer: str = field(default="muon", metadata={"help": "adamw, or muon (Muon for hidden matrices, AdamW for the rest)"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW)"})
    muon_lr: float = field(default=0.02, metadata={"help": "peak learning rate of the Muon matrices"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of the peak"})
    schedule: str = field(default="cosine", metadata={"help": "cosine, constant, or wsd (warmup-stable-decay)"})
    warmup_steps: int = field(default=50, metadata={"help": "steps of linear warmup from 0"})
    decay_frac: float = field(default=0.2, metadata={"help": "wsd only: fraction of steps spent in the final decay"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay, applied to matrices only"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.99, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: no clipping)"})
    max_bad_steps: int = field(default=10, metadata={"help": "stop after this many consecutive non-finite steps"})
    # hardware
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on CUDA GPUs that support it, else float16; bfloat16 on CPUs with AVX-512 or AMX; else float32), "
                                                         "float32, bfloat16 or float16 (CUDA only)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    fsdp: bool = field(default=False, metadata={"help": "shard parameters, gradients and optimizer state over processes "
                                                        "with FSDP2 (under torchrun) instead of replicating them with DDP"})
    threads: int = field(default=0, metadata={"help": "CPU threads per process (0: torch's default)"})
    # evaluation, checkpoints, logs
    eval_interval: int = field(default=200, metadata={"help": "steps between validation runs (0: only at the end)"})
    eval_tokens: int = field(default=131072, metadata={"help": "validation tokens scored per evaluation"})
    ckpt_interval: int = field(default=0, metadata={"help": "steps between checkpoints (0: only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept per run (0: all)"})
    log_interval: int = field(default=50, metadata={"help": "steps between log lines"})
    sample_tokens: int = field(default=300, metadata={"help": "tokens sampled at the end of training (0: none)"})


MODEL_HELP = {
    "context_len": "context length in tokens",
    "n_layer": "transformer blocks",
    "n_head": "attention heads",
    "n_kv_head": "key/value heads: n-head for MHA, 1 for MQA, a divisor for GQA (0: n-head)",
    "n_embd": "model width",
    "pos": "position scheme: learned, sinusoidal, rope, alibi or none",
    "rope_base": "RoPE frequency base",
    "norm": "layernorm, rmsnorm, dyt or none",
    "norm_placement": "pre (norm inside the residual branch) or post (after the residual add)",
    "dyt_alpha": "initial alpha of DyT",
    "qk_norm": "RMS-normalize queries and keys per head",
    "window": "sliding-window attention size in tokens (0: full attention)",
    "window_pattern": "per-layer pattern of L (sliding window) and G (global), repeated over layers",
    "mlp": "gelu, swiglu or relu2",
    "mlp_hidden": "MLP hidden size (0: 4 x width, or 8/3 x width rounded up to 64 for swiglu)",
    "n_expert": "experts per MoE layer (0: dense MLPs)",
    "moe_top_k": "experts per token",
    "moe_every": "use MoE in every k-th layer",
    "moe_capacity_factor": "expert capacity as a multiple of the even share; extra tokens are dropped (0: none)",
    "moe_shared_expert": "add an always-on shared expert",
    "moe_aux_coef": "weight of the load-balancing loss",
    "moe_z_coef": "weight of the router z-loss",
    "tie_embeddings": "share the input embedding with the output head",
    "dropout": "dropout probability",
    "bias": "biases in linear layers and LayerNorm",
}
# The default model of the main job; it trains on Tiny Shakespeare in about 100 s on a 2-core CPU.
MODEL_DEFAULTS = dict(context_len=128, n_layer=4, n_head=4, n_embd=128, pos="rope", norm="rmsnorm", mlp="gelu")


def add_dataclass_flags(parser, defaults, helps):
    """Add one --flag per field, with its default and help text; booleans become --flag / --no-flag."""
    for name, default in defaults.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{helps[name]} (default: {'on' if default else 'off'})")
        else:
            # Empty defaults mean "not set", and some help texts already explain their default.
            suffix = "" if default == "" or "(default" in helps[name] else " (default: %(default)s)"
            parser.add_argument(flag, type=type(default), default=default, help=helps[name] + suffix)


def build_parser():
    parser = tok.ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    add_dataclass_flags(parser.add_argument_group("training"), train_fields,
                        {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)})
    model_fields = {f.name: MODEL_DEFAULTS.get(f.name, f.default) for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"}
    add_dataclass_flags(parser.add_argument_group("model"), model_fields, MODEL_HELP)
    return parser


def parse_args(argv=None):
    """Parse flags into (TrainConfig, model settings dict, names of the flags given explicitly)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    # Parsing again with every default suppressed leaves only the flags that were given, which lets
    # --resume take the saved settings for everything else.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_args(argv)))
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in args.items() if k in train_names})
    model_args = {k: v for k, v in args.items() if k not in train_names}
    return cfg, model_args, given


def check_train_config(cfg):
    """Reject settings that cannot work, before anything is written."""
    positive = ["batch_size", "max_steps", "eval_tokens", "log_interval"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(cfg, name)} must be positive")
    for name in ["total_batch_tokens", "warmup_steps", "eval_interval", "ckpt_interval", "keep_last", "sample_tokens", "threads"]:
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(cfg, name)} must be >= 0")
    if not (cfg.lr > 0 and cfg.muon_lr > 0):   # written this way so that NaN fails too
        raise ValueError(f"learning rates must be positive (got --lr {cfg.lr}, --muon-lr {cfg.muon_lr})")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ValueError(f"--{name}={getattr(cfg, name)} must be in [0, 1)")
    for name in ("weight_decay", "grad_clip", "seed"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(cfg, name)} must be >= 0")
    if cfg.max_bad_steps < 1:
        raise ValueError(f"--max-bad-steps={cfg.max_bad_steps} must be at least 1")
    choices = {"optimizer": ("adamw", "muon"), "schedule": ("cosine", "constant", "wsd"),
               "device": ("auto", "cpu", "cuda", "mps"), "dtype": ("auto", "float32", "bfloat16", "float16")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name}={getattr(cfg, name)!r} is not one of {', '.join(allowed)}")
    if not 0 <= cfg.min_lr_ratio <= 1 or not 0 < cfg.decay_frac <= 1:
        raise ValueError("--min-lr-ratio must be in [0, 1] and --decay-frac in (0, 1]")


# ---------------------------------------------------------------------------------------------------
# Runtime: processes, devices, precision


@dataclass
class Runtime:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def resolve_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available on this machine; use --device cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r} is not one of auto, cpu, cuda, mps")
    return name


def resolve_dtype(name, device_type):
    """The compute dtype: float32, or bfloat16/float16 under autocast. float16 needs CUDA (GradScaler)."""
    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # oneDNN reports bfloat16 support on x86 CPUs with AVX-512 or AMX. NOTE: bfloat16 was measured
        # faster only on a CPU with AVX-512 BF16 (1.35x float32's training tokens/s); it may be slower elsewhere.
        if device_type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name == "float16" and device_type != "cuda":
        raise ValueError(f"--dtype float16 needs a CUDA GPU; on {device_type} use bfloat16 or float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def setup_runtime(device="auto", dtype="auto", seed=1337, threads=0):
    """Join the process group when started by torchrun (NCCL on CUDA, gloo otherwise), pick this process's
    device (by local rank) and dtype, and seed torch and random the same on every rank (so every rank
    builds the same initial weights; reseed per rank afterwards where randomness should differ)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device_type = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    runtime = Runtime(rank, local_rank, world_size,
                      torch.device(device_type, local_rank) if device_type == "cuda" else torch.device(device_type),
                      resolve_dtype(dtype, device_type))
    torch.manual_seed(seed)
    random.seed(seed)
    return runtime


def shutdown_runtime(runtime):
    """Leave the process group once every rank is done: a gloo rank that exits while another is still
    finishing its work can abort with SIGABRT."""
    if runtime.distributed:
        dist.barrier()
        dist.destroy_process_group()


def autocast(runtime):
    """Mixed precision for the forward pass; float32 runs without autocast."""
    if runtime.dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=runtime.device.type, dtype=runtime.dtype)


def all_reduce_sum(value, runtime):
    """Sum a tensor over all processes (a no-op in one process)."""
    if runtime.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def print0(runtime, *args, **kwargs):
    if runtime.is_main:
        print(*args, **kwargs, flush=True)


def measure_matmul_peak(device, dtype, size=2048, repeats=10):
    """The measured FLOP/s of a large square matmul on this device: the ceiling MFU is reported against."""
    size = size if device.type != "cpu" else 1024
    generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG, and so a resumed run, alone
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    best = float("inf")
    for _ in range(3 + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


# ---------------------------------------------------------------------------------------------------
# Data


def prepare_token_data(cfg, runtime):
    """Return the token folder to train on: --data as given, or --input tokenized into data/tokens/."""
    if cfg.data:
        if not (Path(cfg.data) / "meta.json").is_file():
            raise FileNotFoundError(f"--data {cfg.data} is not a token folder (it has no meta.json); make one with "
                                    "`tokenizer.py encode`, or pass text files with --input")
        return Path(cfg.data)
    source = Path(cfg.input) if cfg.input else DEFAULT_INPUT
    if not cfg.input and not source.exists() and runtime.is_main:
        download_shakespeare(source)
    if not source.exists():
        raise FileNotFoundError(f"--input {source} not found; pass an existing text file or folder")
    name = source.stem if source.is_file() else source.name
    if name == "input":
        name = source.parent.name or name
    tokenizer_name = Path(cfg.tokenizer).stem if cfg.tokenizer.endswith(".json") else cfg.tokenizer
    out = Path("data/tokens") / f"{name}-{tokenizer_name}"
    if runtime.is_main and not token_cache_is_current(out, source, cfg.tokenizer):
        files = tok.find_text_files([str(source)])
        tokenizer = (tok.build_char_tokenizer(files) if cfg.tokenizer == "char"
                     else tok.load_tokenizer(cfg.tokenizer, gpt2_files=cfg.gpt2_files or None))
        print0(runtime, f"tokenizing {source} with {cfg.tokenizer} into {out}")
        tok.encode_corpus(tokenizer, [str(source)], out, force=True)
    if runtime.distributed:
        dist.barrier()
    return out


def token_cache_is_current(out, source, tokenizer_name):
    """True when `out` already holds the tokens of `source` made by a tokenizer of this name."""
    try:
        meta = tok.read_token_meta(out)
    except (OSError, ValueError):
        return False
    files = tok.find_text_files([str(source)])
    # A text file edited after the token files were written makes them stale, even at the same size.
    made = (out / "meta.json").stat().st_mtime
    same_text = meta["sources"] == [str(p) for p in files] and all(p.stat().st_mtime <= made for p in files) and \
        meta["train_bytes"] + meta["val_bytes"] == sum(p.stat().st_size for p in files)
    if tokenizer_name.endswith(".json"):
        return same_text and meta["tokenizer_hash"] == tok.load_tokenizer(tokenizer_name).hash
    return same_text and meta["tokenizer"] == tokenizer_name


def download_shakespeare(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading Tiny Shakespeare to {path}", flush=True)
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            text = response.read()
    except OSError as e:
        raise FileNotFoundError(f"{path} is missing and the download from {SHAKESPEARE_URL} failed ({e}); "
                                "pass a local text file with --input") from None
    tmp = path.with_suffix(".part")
    tmp.write_bytes(text)
    os.replace(tmp, path)


class TokenData:
    """Random training windows and fixed validation windows over memory-mapped token files.

    Window starts depend only on (seed, step, micro-batch index), so a resumed run reads exactly the data
    the uninterrupted run would have, and N processes with accumulation A read the same windows as one
    process with accumulation N * A.
    """

    def __init__(self, folder, context_len, device):
        self.folder, self.context_len, self.device = Path(folder), context_len, device
        self.meta = tok.read_token_meta(self.folder)
        self.train, self.val = tok.load_tokens(self.folder, "train"), tok.load_tokens(self.folder, "val")
        for split, tokens in (("train", self.train), ("val", self.val)):
            if len(tokens) <= context_len + 1:
                raise ValueError(f"{self.folder}: the {split} split has {len(tokens)} tokens, too few for context "
                                 f"length {context_len}; use more text or a smaller --context-len")

    def _windows(self, tokens, starts):
        rows = np.stack([tokens[s: s + self.context_len + 1] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(rows)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        return batch[:, :-1], batch[:, 1:]                      # inputs, targets: (B, T) each

    def train_batch(self, seed, step, index, batch_size):
        rng = np.random.default_rng([seed, step, index])
        starts = rng.integers(0, len(self.train) - self.context_len - 1, size=batch_size)
        return self._windows(self.train, starts)

    def val_batches(self, batch_size, max_tokens, rank=0, world_size=1):
        """Consecutive non-overlapping windows from the start of the validation split, shared out by rank."""
        n_windows = min((len(self.val) - 1) // self.context_len, max(1, max_tokens // self.context_len))
        starts = list(range(0, n_windows * self.context_len, self.context_len))[rank::world_size]
        for i in range(0, len(starts), batch_size):
            yield self._windows(self.val, starts[i: i + batch_size])


# ---------------------------------------------------------------------------------------------------
# Optimization


def build_optimizers(model, cfg, device_type):
    """AdamW with weight decay on matrices only; with --optimizer muon, Muon takes the hidden matrices of the
    blocks and AdamW keeps embeddings, the output head, norms and biases. Returns a list of optimizers."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    muon_names = set()
    if cfg.optimizer == "muon":
        muon_names = {n for n, p in params.items() if p.dim() == 2 and n.startswith("blocks.")}
    decay = [p for n, p in params.items() if p.dim() >= 2 and n not in muon_names]
    no_decay = [p for n, p in params.items() if p.dim() < 2]
    fused = device_type == "cuda"
    optimizers = [torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0}],
                                    lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)]
    if muon_names:
        optimizers.append(torch.optim.Muon([params[n] for n in sorted(muon_names)], lr=cfg.muon_lr,
                                           weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"))
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step, cfg):
    """Learning-rate factor at a step: linear warmup, then cosine decay, constant, or warmup-stable-decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_start = int(cfg.max_steps * (1 - cfg.decay_frac))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, cfg.max_steps - 1 - decay_start)
        return 1.0 - (1.0 - cfg.min_lr_ratio) * progress
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - 1 - cfg.warmup_steps)  # the last step reaches the minimum
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizers, multiplier):
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * multiplier


def lm_loss_sum(model, batch):
    """Summed next-token cross-entropy of one micro-batch (inputs, targets)."""
    inputs, targets = batch
    _, loss_sum = model(inputs, targets, reduction="sum")
    return loss_sum


def count_targets(batch):
    return (batch[1] != IGNORE_INDEX).sum()


@dataclass
class StepResult:
    loss: float          # mean loss per target over the whole step (all micro-batches and ranks)
    grad_norm: float     # before clipping, unscaled
    n_targets: int       # targets in the whole step
    skipped: bool        # True when the gradients were not finite and the update was skipped
    aux_loss: float = 0.0


def train_step(model, batches, optimizers, runtime, grad_clip=1.0, scaler=None,
               loss_fn=lm_loss_sum, count_fn=count_targets):
    """One optimizer step over a list of micro-batches, with gradient accumulation.

    The loss is normalized by the number of targets in the whole step, over every micro-batch and every
    rank, so each target token weighs the same however the batch is split. Under DDP, gradients are
    synchronized only on the last micro-step. loss_fn(model, batch) returns a micro-batch's summed loss
    and count_fn(batch) its number of targets; finetune.py and rlhf.py pass their own.
    """
    raw_model = unwrap(model)
    n_local = sum(count_fn(b).to(runtime.device, torch.float32) for b in batches)
    n_global = all_reduce_sum(n_local.clone(), runtime)
    # DDP averages gradients over ranks; multiplying by world_size turns that average into the sum.
    scale = runtime.world_size / n_global.clamp(min=1)
    loss_total = torch.zeros((), device=runtime.device)
    aux_total = torch.zeros((), device=runtime.device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with sync_gradients(model, last):
            with autocast(runtime):
                loss_sum = loss_fn(model, batch)
            loss = loss_sum * scale
            if raw_model.aux_loss is not None:
                aux = raw_model.aux_loss / len(batches)
                loss = loss + aux
                aux_total += aux.detach()
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_total += loss_sum.detach().float()
    grad_norm, skipped = clip_and_step(raw_model, optimizers, grad_clip, scaler)
    loss_total = all_reduce_sum(loss_total, runtime) / n_global.clamp(min=1)
    aux_total = all_reduce_sum(aux_total, runtime) / runtime.world_size
    return StepResult(loss_total.item(), grad_norm, int(n_global.item()), skipped, aux_total.item())


def sync_gradients(model, enabled):
    """Context for one micro-step: skip DDP's gradient all-reduce unless enabled (set before the forward)."""
    if isinstance(model, DDP) and not enabled:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def clip_and_step(model, optimizers, grad_clip, scaler=None):
    """Unscale (fp16), clip, and step every optimizer; skip the update when the gradient is not finite.

    Returns (gradient norm before clipping, skipped). The norm is of the true, unscaled gradients.
    """
    if scaler is not None:
        for optimizer in optimizers:
            scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the norm as a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    skipped = not torch.isfinite(grad_norm).item()
    if scaler is not None:
        for optimizer in optimizers:
            scaler.step(optimizer)     # skips the update itself when it found inf/NaN gradients
        scaler.update()
    elif not skipped:
        for optimizer in optimizers:
            optimizer.step()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return grad_norm.item(), skipped


def unwrap(model):
    """The plain GPT module inside DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def shard_model(model, runtime):
    """FSDP2: shard each block, then the root (embeddings, final norm, head), over all processes. With
    bfloat16/float16, parameters are gathered in that dtype and gradients reduced in float32."""
    if not runtime.distributed:
        raise ValueError("--fsdp shards over several processes; start the run with torchrun --nproc_per_node N")
    policy = MixedPrecisionPolicy(param_dtype=runtime.dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def parameters_finite(model, runtime):
    """True when no rank holds a NaN or inf parameter (each rank checks its own shard under FSDP)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    bad = sum(int(not torch.isfinite(p).all()) for p in local)
    return all_reduce_sum(torch.tensor(float(bad), device=runtime.device), runtime).item() == 0


@torch.no_grad()
def evaluate(model, data, runtime, batch_size, max_tokens, byte_lengths):
    """Validation loss (nats per token) and bits per byte over the fixed validation windows."""
    model.eval()
    totals = torch.zeros(3, device=runtime.device, dtype=torch.float64)   # loss sum, targets, target bytes
    for inputs, targets in data.val_batches(batch_size, max_tokens, runtime.rank, runtime.world_size):
        with autocast(runtime):
            _, loss_sum = model(inputs, targets, reduction="sum")
        totals += torch.stack([loss_sum.double(), torch.tensor(targets.numel(), device=runtime.device, dtype=torch.float64),
                               byte_lengths[targets].sum().double()])
    all_reduce_sum(totals, runtime)
    model.train()
    loss = (totals[0] / totals[1]).item()
    bits_per_byte = (totals[0] / math.log(2) / totals[2]).item()
    return loss, bits_per_byte


# ---------------------------------------------------------------------------------------------------
# Checkpoints and logs


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(runtime):
    """Every rank's RNG state, gathered on all ranks (rank 0 saves them)."""
    if not runtime.distributed:
        return [rng_state()]
    states = [None] * runtime.world_size
    dist.all_gather_object(states, rng_state())
    return states


def gather_full_state(model, optimizers):
    """The full model and optimizer state dicts, keyed by parameter name, on rank 0 (other ranks get empty ones).

    Sharded (FSDP2) and replicated runs both save full tensors gathered to rank 0, so every checkpoint is
    a plain model.pt that one process loads, and a run can resume with or without --fsdp. The cost is
    one host holding the whole state while saving, which is fine at the sizes this project trains;
    torch.distributed.checkpoint's sharded format would remove that limit but not load as a plain file.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizers, options=options)
    return model_state, optimizer_state


def save_checkpoint(run_dir, step, model_state, config, tokenizer_file, train_state=None, keep_last=0):
    """Write run_dir/step-NNNNNN atomically: files go to a temporary folder that is renamed into place, then
    checkpoints older than the newest keep_last are deleted. Call on the main process only."""
    run_dir = Path(run_dir)
    final = run_dir / f"step-{step:06d}"
    tmp = run_dir / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_checkpoint_files(tmp, model_state, config)
    shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
        with open(tmp / "train_state.pt", "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # the same step saved again (a resumed run)
        remove_checkpoint(final)
    os.rename(tmp, final)
    fd = os.open(run_dir, os.O_RDONLY)
    os.fsync(fd)   # make the rename itself durable
    os.close(fd)
    if keep_last:
        steps = sorted(run_dir.glob("step-*"), key=lambda p: int(p.name.removeprefix("step-")))
        for old in steps[:-keep_last]:
            remove_checkpoint(old)
    return final


def remove_checkpoint(path):
    """Rename a checkpoint out of sight first, so a crash mid-delete never leaves a partial step-* folder."""
    hidden = path.with_name(".old-" + path.name)
    shutil.rmtree(hidden, ignore_errors=True)
    os.rename(path, hidden)
    shutil.rmtree(hidden)


def load_train_state(checkpoint_dir, device="cpu"):
    path = Path(checkpoint_dir) / "train_state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: this checkpoint cannot resume training (it has no optimizer state)")
    return load_tensor_file(path, device)


class RunLog:
    """Print progress lines on the main process and append the same numbers to log.jsonl."""

    def __init__(self, run_dir, runtime):
        self.runtime = runtime
        self.path = Path(run_dir) / "log.jsonl"

    def write(self, record, line=None):
        if not self.runtime.is_main:
            return
        if line:
            print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def format_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------------------------------------------
# Pretraining


def resolve_settings(cfg, model_args, given):
    """Apply --resume: the saved run's settings, overridden by the flags given now. Model settings that
    differ from the checkpoint's are an error. Returns (cfg, model_args, checkpoint dir or None)."""
    if not cfg.resume:
        return cfg, model_args, None
    run_dir = Path(cfg.resume)
    checkpoint = find_checkpoint(run_dir)
    saved_path = run_dir / "run.json"
    if not saved_path.is_file():
        raise FileNotFoundError(f"{saved_path} not found; --resume takes a run folder written by train.py")
    saved = json.loads(saved_path.read_text())
    for name, value in saved["model"].items():
        if name in given and model_args.get(name) != value:
            raise ValueError(f"--resume {run_dir}: the run has {name}={value!r} but --{name.replace('_', '-')} "
                             f"is {model_args[name]!r}; drop the flag, or start a new run with --run-name")
    model_args = {k: v for k, v in saved["model"].items() if k != "vocab_size"}
    train_values = {**saved["train"], **{k: v for k, v in asdict(cfg).items() if k in given}}
    train_values["resume"] = cfg.resume
    return TrainConfig(**train_values), model_args, checkpoint


def prepare_run_dir(cfg, data_dir, runtime):
    """Pick the run folder; refuse to overwrite an existing run unless asked. On resume, delete the
    temporary folders a crash may have left behind mid-save."""
    run_dir = Path(cfg.resume) if cfg.resume else Path(cfg.out_dir) / (cfg.run_name or data_dir.name)
    tok.check_output_path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} exists and is not a folder; choose another --run-name or --out-dir")
    if not cfg.resume and run_dir.exists() and any(run_dir.iterdir()) and not cfg.overwrite:
        raise ValueError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                         "pick another --run-name, or pass --overwrite to replace it")
    if runtime.is_main and run_dir.exists():
        if not cfg.resume:
            shutil.rmtree(run_dir)
        for leftover in [*run_dir.glob(".tmp-step-*"), *run_dir.glob(".old-step-*")]:
            shutil.rmtree(leftover)
    return run_dir


def pretrain(cfg, model_args, given):
    cfg, model_args, resume_from = resolve_settings(cfg, model_args, given)
    check_train_config(cfg)
    GPTConfig(vocab_size=1, **model_args)   # checks the model flags before any tokenizing (the vocabulary comes later)
    runtime = setup_runtime(cfg.device, cfg.dtype, cfg.seed, cfg.threads)

    # Data and tokenizer
    data_dir = prepare_token_data(cfg, runtime)
    tokenizer = tok.load_tokenizer(str(data_dir / "tokenizer.json"))
    model_config = GPTConfig(vocab_size=tokenizer.vocab_size, **model_args)
    data = TokenData(data_dir, model_config.context_len, runtime.device)
    if resume_from is not None:
        _, saved_config = read_checkpoint_config(resume_from)
        if saved_config["tokenizer"]["hash"] != data.meta["tokenizer_hash"]:
            raise ValueError(f"{data_dir} was made by a different tokenizer than the checkpoint in {resume_from}; "
                             "resume with the run's own data")

    # Batch geometry
    tokens_per_micro = cfg.batch_size * model_config.context_len
    total = cfg.total_batch_tokens or tokens_per_micro * runtime.world_size
    if total % (tokens_per_micro * runtime.world_size):
        raise ValueError(f"--total-batch-tokens {total} is not a multiple of world size {runtime.world_size} x "
                         f"--batch-size {cfg.batch_size} x --context-len {model_config.context_len} = "
                         f"{tokens_per_micro * runtime.world_size}; pick a multiple of it")
    grad_accum = total // (tokens_per_micro * runtime.world_size)

    # Model, optimizer, state
    model = GPT(model_config).to(runtime.device)
    torch.manual_seed(cfg.seed + runtime.rank)   # dropout masks differ between ranks
    if cfg.fsdp:
        shard_model(model, runtime)
    optimizers = build_optimizers(model, cfg, runtime.device.type)
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.dtype == torch.float16 else None
    start_step = 0
    if resume_from is not None:
        # Every rank reads the checkpoint, so on several nodes the run folder must be on a shared filesystem.
        state = load_tensor_file(resume_from / "model.pt")
        try:
            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        except (RuntimeError, KeyError) as e:
            raise ValueError(f"{resume_from / 'model.pt'} does not match the run's model config ({str(e).splitlines()[0]})") from None
        train_state = load_train_state(resume_from)
        set_optimizer_state_dict(model, optimizers, train_state["optimizer"], options=StateDictOptions(full_state_dict=True))
        if scaler is not None and train_state.get("scaler"):
            scaler.load_state_dict(train_state["scaler"])
        start_step = train_state["step"]
        if start_step >= cfg.max_steps:
            raise ValueError(f"{resume_from} is at step {start_step}, so there is nothing to train up to --max-steps "
                             f"{cfg.max_steps}; pass a larger --max-steps to continue")
        rng_states = train_state["rng"]
        set_rng_state(rng_states[runtime.rank] if runtime.rank < len(rng_states) else rng_states[0])
    run_dir = prepare_run_dir(cfg, data_dir, runtime)
    train_model = torch.compile(model) if cfg.compile else model
    if runtime.distributed and not cfg.fsdp:
        train_model = DDP(train_model, device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None)

    byte_lengths = torch.tensor([len(b) for b in tokenizer.token_bytes], device=runtime.device)
    flops_per_token = model.flops_per_token(model_config.context_len)
    peak_flops = measure_matmul_peak(runtime.device, runtime.dtype)
    settings = {"train": asdict(cfg), "model": asdict(model_config), "data": str(data_dir),
                "world_size": runtime.world_size, "grad_accum": grad_accum}
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / ".run.json.tmp"
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
        os.replace(tmp, run_dir / "run.json")
    print0(runtime, f"run {run_dir} | data {data_dir} ({len(data.train):,} train / {len(data.val):,} val tokens, "
                    f"tokenizer {tokenizer.kind}, vocab {tokenizer.vocab_size})")
    print0(runtime, f"model: {model.num_params():,} parameters ({model.num_params(active=True):,} active), "
                    f"{flops_per_token / 1e6:.1f} MFLOPs per token | {model_config.n_layer} layers, width "
                    f"{model_config.n_embd}, {model_config.n_head} heads ({model_config.n_kv_head} kv), {model_config.pos}, "
                    f"{model_config.norm}/{model_config.norm_placement}, {model_config.mlp}")
    processes = f"{runtime.world_size} process" + ("es" if runtime.world_size > 1 else "")
    print0(runtime, f"batch: {total:,} tokens per step = {processes} x {grad_accum} micro-steps x "
                    f"{cfg.batch_size} sequences x {model_config.context_len} tokens | {cfg.max_steps} steps = "
                    f"{total * cfg.max_steps / 1e6:.1f}M tokens")
    print0(runtime, f"device {runtime.device}, {str(runtime.dtype).removeprefix('torch.')}, "
                    f"measured matmul peak {peak_flops / 1e12:.2f} TFLOP/s | optimizer {cfg.optimizer}, lr {cfg.lr:g}"
                    f"{f' (Muon matrices {cfg.muon_lr:g})' if cfg.optimizer == 'muon' else ''}, "
                    f"{cfg.schedule} schedule, warmup {cfg.warmup_steps}" + (f", resuming at step {start_step}" if start_step else ""))

    log = RunLog(run_dir, runtime)
    config_record = {"model": asdict(model_config), "stage": "train", "data": str(data_dir),
                     "tokenizer": {"kind": tokenizer.kind, "hash": tokenizer.hash, "file": "tokenizer.json"}}

    def checkpoint(step):
        if not parameters_finite(model, runtime):
            raise ValueError(f"the parameters hold NaN or inf at step {step}, so no checkpoint was written; "
                             "resume from the last checkpoint with a lower --lr")
        rng_states = gather_rng_states(runtime)
        model_state, optimizer_state = gather_full_state(model, optimizers)
        if runtime.is_main:
            train_state = {"step": step, "optimizer": optimizer_state,
                           "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_states}
            save_checkpoint(run_dir, step, model_state, {**config_record, "step": step}, data_dir / "tokenizer.json",
                            train_state, cfg.keep_last)
        if runtime.distributed:
            dist.barrier()

    # Training loop
    bad_steps = 0
    window_start, window_tokens = time.perf_counter(), 0
    step_times = []
    for step in range(start_step, cfg.max_steps):
        set_lr(optimizers, lr_multiplier(step, cfg))
        step_start = time.perf_counter()
        batches = [data.train_batch(cfg.seed, step, runtime.rank * grad_accum + i, cfg.batch_size) for i in range(grad_accum)]
        result = train_step(train_model, batches, optimizers, runtime, cfg.grad_clip, scaler)
        step_times.append(time.perf_counter() - step_start)
        window_tokens += total

        bad_steps = bad_steps + 1 if result.skipped else 0
        if bad_steps >= cfg.max_bad_steps:
            raise ValueError(f"{bad_steps} consecutive steps had a non-finite loss or gradient (step {step + 1}); "
                             "lower --lr, then resume from the last checkpoint")

        done = step + 1
        if done % cfg.log_interval == 0 or done == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / elapsed
            mfu = flops_per_token * tokens_per_s / (peak_flops * runtime.world_size)
            recent = step_times[-cfg.log_interval:]
            left = (cfg.max_steps - done) * sum(recent) / len(recent)
            record = {"step": done, "loss": result.loss, "lr": optimizers[0].param_groups[0]["lr"],
                      "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu,
                      "skipped": result.skipped, "train_seconds": sum(step_times), "time": time.time()}
            extra = ""
            if model.balance_loss is not None:
                record["moe_balance"] = model.balance_loss.item()
                extra = f" | moe balance {record['moe_balance']:.3f}"
            log.write(record, f"step {done:>6}/{cfg.max_steps} | loss {result.loss:.4f} | lr {record['lr']:.2e} | "
                              f"grad {result.grad_norm:.3f} | {tokens_per_s / 1e3:.1f}k tok/s | MFU {100 * mfu:.1f}% | "
                              f"{format_seconds(left)} left{extra}" + (" | skipped (non-finite)" if result.skipped else ""))
            window_start, window_tokens = time.perf_counter(), 0

        if (cfg.eval_interval and done % cfg.eval_interval == 0) or done == cfg.max_steps:
            val_loss, val_bpb = evaluate(train_model, data, runtime, cfg.batch_size, cfg.eval_tokens, byte_lengths)
            log.write({"step": done, "val_loss": val_loss, "val_bpb": val_bpb, "train_seconds": sum(step_times),
                       "time": time.time()},
                      f"step {done:>6} | val loss {val_loss:.4f} | val bits/byte {val_bpb:.4f}")
            window_start = time.perf_counter()
        if (cfg.ckpt_interval and done % cfg.ckpt_interval == 0) or done == cfg.max_steps:
            checkpoint(done)
            window_start = time.perf_counter()

    # A sharded model needs every rank in each forward, so under FSDP all ranks generate; rank 0 prints.
    if cfg.sample_tokens and (runtime.is_main or cfg.fsdp):
        prompt = torch.tensor([[tokenizer.eot_id]], device=runtime.device)
        with autocast(runtime):
            out = model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=50)
        print0(runtime, "\n--- sample ---\n" + tokenizer.decode(out[0, 1:].tolist()) + "\n--------------")
    shutdown_runtime(runtime)
    return run_dir


def main(argv=None):
    tok.run_command(pretrain, *parse_args(argv))


if __name__ == "__main__":
    main()
