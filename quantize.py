"""Weight quantization: int8, int4 and NF4 with packed storage, and quantized linear layers.

    python quantize.py --ckpt out/tinyshakespeare-char --method nf4 --out out/tinyshakespeare-char-nf4
    python quantize.py --ckpt out/tinyshakespeare-char --method int4 --group-size 32 --gptq --eval

Reads a checkpoint directory (or a run folder, whose newest checkpoint is used) and prints the bytes of
the quantized weights against float32 and bfloat16. With --out it writes a quantized checkpoint
directory (model.pt of plain tensors, config.json with a "quantization" section, tokenizer.json) that
sample.py loads like any other. With --eval it prints the validation loss and bits per byte of the
float and the quantized model. For QLoRA, `quantize_tensor` and `dequantize_tensor` (method "nf4") and the
frozen `QuantizedLinear`, which an adapter wraps, are the public pieces.
"""
import argparse
import copy
import fnmatch
import io
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import tokenizer as tok
from model import (GPT, GPTConfig, clean_state_dict, load_checkpoint, load_tensor_file, read_checkpoint_config,
                   write_checkpoint_files)

# int8: symmetric absmax with one scale per output channel. int4: a scale and an integer zero-point per group
# (asymmetric). int4-sym: symmetric absmax per group. nf4: 4-bit NormalFloat with an absmax per block.
METHODS = ("int8", "int4", "int4-sym", "nf4")
DOUBLE_QUANT_BLOCK = 256

# The 16 NF4 levels of QLoRA (Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1], eight on the
# positive side and seven on the negative side, so that 0 is exactly representable.
NF4_LEVELS = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                           0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])
NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


def check_method(method, block_size):
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "int8" and block_size <= 0:
        raise ValueError(f"{method} needs a positive group or block size, got {block_size}")


# ---------------------------------------------------------------------------------------------------
# Packing: two 4-bit codes per byte


def pack_int4(codes):
    """Pack signed 4-bit codes (values in -8..7) two per byte: element 2i goes in the low nibble (bits 0-3),
    element 2i+1 in the high nibble (bits 4-7), each in two's complement. An odd length is padded with 0."""
    codes = codes.flatten().to(torch.int8).view(torch.uint8) & 0xF   # two's complement nibbles
    if codes.numel() % 2:
        codes = torch.cat((codes, codes.new_zeros(1)))
    return codes[0::2] | (codes[1::2] << 4)


def unpack_int4(packed, length):
    """Inverse of pack_int4: the first `length` signed codes as int8."""
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten()[:length]
    return (nibbles.to(torch.int8) ^ 8) - 8                    # sign-extend: 8..15 become -8..-1


# ---------------------------------------------------------------------------------------------------
# Round-to-nearest on blocks: scales, codes and their inverse


def to_blocks(values, block_size):
    """Split a flat tensor into rows of block_size, zero-padding the last one: (n_blocks, block_size)."""
    n_blocks = math.ceil(values.numel() / block_size)
    return F.pad(values, (0, n_blocks * block_size - values.numel())).view(n_blocks, block_size)


def block_params(blocks, method):
    """Scale and zero-point (None for symmetric methods) of each row of blocks (..., k), shaped (..., 1)."""
    if method == "int4":
        # The range [min, max] is widened to include 0, which then gets an integer code (the zero-point),
        # so 0.0 is reconstructed exactly.
        low = blocks.amin(-1, keepdim=True).clamp(max=0)
        high = blocks.amax(-1, keepdim=True).clamp(min=0)
        scale = (high - low) / 15
        zero = (-low / safe_scale(scale)).round() - 8         # the code of 0.0, in -8..7
        return scale, zero
    absmax = blocks.abs().amax(-1, keepdim=True)
    return absmax / {"int8": 127, "int4-sym": 7, "nf4": 1}[method], None


def safe_scale(scale):
    """Replace zero scales by 1, so an all-zero block gets code 0 instead of NaN."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def encode(values, scale, zero, method):
    """Round values (..., k) to the nearest code of the grid given by scale (and zero), each (..., 1)."""
    scaled = values / safe_scale(scale)
    if method == "nf4":
        return torch.bucketize(scaled, NF4_MIDPOINTS.to(values.device)) - 8   # nearest level's index - 8
    if method == "int4":
        return (scaled.round() + zero).clamp(-8, 7)
    top = 127 if method == "int8" else 7
    return scaled.round().clamp(-top, top)


def decode(codes, scale, zero, method):
    """Map codes (..., k) back to values on the grid given by scale (and zero), each (..., 1)."""
    if method == "nf4":
        return NF4_LEVELS.to(codes.device)[codes.long() + 8] * scale
    if method == "int4":
        return (codes.float() - zero) * scale
    return codes.float() * scale


def double_quantize(scale):
    """Quantize float32 block scales to int8 in blocks of 256 (QLoRA's double quantization).

    The scales are all positive, so their mean is subtracted first and the int8 codes cover both signs.
    """
    offset = scale.mean()
    centered = to_blocks(scale - offset, DOUBLE_QUANT_BLOCK)             # (n_blocks / 256, 256)
    scale_scale, _ = block_params(centered, "int8")
    codes = encode(centered, scale_scale, None, "int8").flatten()[:scale.numel()]
    return {"scale_code": codes.to(torch.int8), "scale_scale": scale_scale.flatten(), "scale_offset": offset}


def dequantize_scales(state, n_blocks):
    """Rebuild the float32 block scales from double_quantize's dict."""
    codes = to_blocks(state["scale_code"].float(), DOUBLE_QUANT_BLOCK)
    return (codes * state["scale_scale"][:, None]).flatten()[:n_blocks] + state["scale_offset"]


# ---------------------------------------------------------------------------------------------------
# Whole tensors: quantize to a dict of plain tensors, and back


def quantize_tensor(weight, method="nf4", block_size=64, double_quant=False, hessian=None):
    """Quantize a weight (out, in) block-wise by round-to-nearest, or with GPTQ when the Hessian of its
    layer's inputs (in, in) is given.

    Blocks run over the weight flattened row by row. When in_features is a multiple of block_size, each
    block is therefore a group of one output channel's weights. int8 always uses one block per output channel.
    Returns a dict of plain tensors: "qweight" (int8 codes, or uint8 with two 4-bit codes per byte, see
    pack_int4), "scale" (float32 per block) or with double_quant "scale_code", "scale_scale" and
    "scale_offset", and for int4 the packed zero-points "zero".
    """
    check_method(method, block_size)
    block_size = weight.shape[-1] if method == "int8" else block_size
    if hessian is None:
        blocks = to_blocks(weight.detach().float().flatten(), block_size)   # (n_blocks, block_size)
        scale, zero = block_params(blocks, method)
        codes = encode(blocks, scale, zero, method)
    else:
        codes, scale, zero = gptq(weight, hessian, method, block_size)

    state = {"qweight": codes.to(torch.int8).flatten() if method == "int8" else pack_int4(codes)}
    state.update(double_quantize(scale.flatten()) if double_quant else {"scale": scale.flatten()})
    if zero is not None:
        state["zero"] = pack_int4(zero)
    return state


def dequantize_tensor(state, shape, method="nf4", block_size=64):
    """Rebuild the float32 weight of the given shape from quantize_tensor's dict."""
    n = math.prod(shape)
    block_size = shape[-1] if method == "int8" else block_size
    n_blocks = math.ceil(n / block_size)
    codes = state["qweight"] if method == "int8" else unpack_int4(state["qweight"], n_blocks * block_size)
    scale = state["scale"] if "scale" in state else dequantize_scales(state, n_blocks)
    zero = unpack_int4(state["zero"], n_blocks)[:, None] if "zero" in state else None
    weight = decode(codes.view(n_blocks, block_size), scale[:, None], zero, method)
    return weight.flatten()[:n].view(shape)


# ---------------------------------------------------------------------------------------------------
# GPTQ


def gptq(weight, hessian, method, group_size, damp=0.01):
    """Quantize weight (out, in) with GPTQ (Frantar et al. 2023) instead of rounding each weight to nearest.

    Columns are quantized left to right. After each column, its rounding error is spread over the columns not
    yet quantized through the inverse Hessian of the layer's inputs, so the output error on the calibration
    inputs is minimized rather than the weight error.

    hessian (in, in) is X^T X of the inputs X (any positive scale). A group's scale comes from its weights
    as updated when the loop reaches it. Returns (codes, scale, zero) in quantize_tensor's block layout.
    NOTE: the paper's lazy batched updates and act-order are left out; this is the plain column loop.
    """
    W = weight.detach().float().clone()                               # (out, in), updated in place
    out_features, in_features = W.shape
    if in_features % group_size:
        raise ValueError(f"GPTQ needs the group size ({group_size}) to divide in_features ({in_features})")
    H = hessian.detach().float().clone()
    dead = H.diagonal() == 0          # inputs that were always zero: any weight there gives the same output
    H[dead, dead] = 1
    H += damp * H.diagonal().mean() * torch.eye(in_features, device=H.device)
    # Upper Cholesky factor of H^-1: row i contains the weights that update the later columns.
    H_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros_like(W)
    scales, zeros = [], []
    for i in range(in_features):
        if i % group_size == 0:
            scale, zero = block_params(W[:, i:i + group_size], method)   # (out, 1) each
            scales.append(scale)
            zeros.append(zero)
        codes[:, i:i + 1] = encode(W[:, i:i + 1], scale, zero, method)
        error = (W[:, i:i + 1] - decode(codes[:, i:i + 1], scale, zero, method)) / H_inv[i, i]   # (out, 1)
        W[:, i + 1:] -= error * H_inv[i, i + 1:]

    codes = codes.view(-1, group_size)                 # block b is row b // n_groups, group b % n_groups
    scale = torch.cat(scales, dim=1).view(-1, 1)
    zero = torch.cat(zeros, dim=1).view(-1, 1) if zeros[0] is not None else None
    return codes, scale, zero


@torch.no_grad()
def collect_hessians(model, layer_names, batches):
    """Sum X^T X of the inputs X of each named linear layer over the calibration batches of (inputs, _).

    NOTE: all layers see the float model's activations, in one pass. The paper quantizes layer by layer and
    feeds each layer the outputs of the layers already quantized.
    """
    hessians = {}

    def record(name):
        def hook(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].size(-1)).float()     # (tokens, in)
            hessians[name] = hessians.get(name, 0) + x.T @ x
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in layer_names]
    for inputs, _ in batches:
        model(inputs)
    for handle in handles:
        handle.remove()
    return hessians


def calibration_hessians(model, data, names, n_tokens, batch_size):
    """GPTQ Hessians of the named linear layers, from at least n_tokens tokens of fixed training windows
    of data (a train.TokenData)."""
    n_batches = math.ceil(n_tokens / (batch_size * model.config.context_len))
    batches = [data.train_batch(0, 0, i, batch_size) for i in range(n_batches)]
    linear_names = [name for name in names if isinstance(model.get_submodule(name), nn.Linear)]
    return collect_hessians(model, linear_names, batches)


# ---------------------------------------------------------------------------------------------------
# Quantized layers


class QuantizedLinear(nn.Module):
    """A frozen replacement for nn.Linear that stores its weight quantized and dequantizes it, block by
    block, in every forward. Everything is a buffer, so nothing here is trained: QLoRA adds its adapter
    around this layer. The buffers are quantize_tensor's dict, plus "bias" when the layer has one."""

    def __init__(self, in_features, out_features, bias=False, method="nf4", block_size=64, double_quant=False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method, self.block_size, self.double_quant = method, block_size, double_quant
        self.store(quantize_tensor(torch.zeros(out_features, in_features), method, block_size, double_quant))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, module, method="nf4", block_size=64, double_quant=False, hessian=None):
        """Quantize an nn.Linear (or nn.Embedding, for QuantizedEmbedding); hessian switches on GPTQ."""
        out_features, in_features = module.weight.shape
        bias = getattr(module, "bias", None)
        layer = cls(in_features, out_features, bias is not None, method, block_size, double_quant)
        layer.store(quantize_tensor(module.weight, method, block_size, double_quant, hessian))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer.to(module.weight.device)

    def store(self, state):
        for name, tensor in state.items():
            self.register_buffer(name, tensor)

    def dequantize_weight(self):
        """Dequantize the weight to float32 (out_features, in_features)."""
        state = {name: tensor for name, tensor in self.named_buffers(recurse=False) if name != "bias"}
        return dequantize_tensor(state, (self.out_features, self.in_features), self.method, self.block_size)

    def forward(self, x):
        return F.linear(x, self.dequantize_weight().to(x.dtype), self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}"


class QuantizedEmbedding(QuantizedLinear):
    """An embedding table (num_embeddings, embedding_dim) stored like QuantizedLinear's weight.
    NOTE: each forward dequantizes the whole table; gathering only the looked-up rows would be faster."""

    def forward(self, idx):
        return F.embedding(idx, self.dequantize_weight())


def select_layers(model, layers):
    """Names of the nn.Linear and nn.Embedding modules that match a pattern of `layers` (fnmatch, so
    "blocks.*" is every linear layer inside the blocks). Raises ValueError for a pattern that matches none."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, (nn.Linear, nn.Embedding)) and any(fnmatch.fnmatchcase(name, p) for p in layers)]
    for pattern in layers:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"layer pattern {pattern!r} matches no linear or embedding layer; "
                             "use names such as blocks.*, blocks.0.mlp.fc, lm_head or wte")
    return names


def quantize_model(model, method="nf4", block_size=64, double_quant=False, layers=("blocks.*",), hessians=None):
    """Replace the layers that select_layers picks by quantized ones, in place. hessians maps layer names
    to GPTQ Hessians, and the layers without one are rounded to nearest. Returns the names replaced.

    With tied embeddings, quantizing lm_head leaves wte a float embedding, and the other way round.
    """
    check_method(method, block_size)
    hessians = hessians or {}
    names = select_layers(model, layers)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        module = model.get_submodule(name)
        kind = QuantizedEmbedding if isinstance(module, nn.Embedding) else QuantizedLinear
        quantized = kind.from_float(module, method, block_size, double_quant, hessians.get(name))
        setattr(model.get_submodule(parent_name), child_name, quantized)
    return names


def load_any_checkpoint(path, device="cpu"):
    """Load a float or a quantized checkpoint directory (or a run folder). Returns (model, config dict)."""
    directory, config = read_checkpoint_config(path)
    settings = config.get("quantization")
    if settings is None:
        return load_checkpoint(path, device)
    model = GPT(GPTConfig.from_dict(config["model"]))
    # Quantizing the random initial weights only creates buffers of the right shapes; the saved ones replace them.
    block_size = settings.get("block_size", settings.get("group_size", 0))
    try:
        quantize_model(model, settings["method"], block_size, settings.get("double_quant", False), settings["layers"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{directory / 'config.json'}: the quantization settings do not fit its model ({e}); "
                         "quantize the float checkpoint again") from None
    state = load_tensor_file(directory / "model.pt")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{directory / 'model.pt'} does not match the quantization in its config.json: "
                         f"{str(e).splitlines()[-1].strip()}") from None
    return model.to(device), config


# ---------------------------------------------------------------------------------------------------
# Sizes and quality


def memory_bytes(modules):
    """Bytes of the parameters and buffers of the given modules, each shared tensor counted once."""
    tensors = {t.data_ptr(): t.numel() * t.element_size()
               for m in modules for t in [*m.parameters(), *m.buffers()]}
    return sum(tensors.values())


def disk_bytes(state_dict):
    """Bytes of model.pt as torch.save writes this state dict."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.tell()


def size_report(float_model, quantized_model, names):
    """Bytes of the quantized layers and of the whole model, in memory and on disk, for float32, bfloat16
    and the quantized model. Returns {row name: (layers in memory, model in memory, model.pt on disk)}."""
    float_layers = [float_model.get_submodule(name) for name in names]
    weights = sum(m.weight.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
                  for m in float_layers)
    float_state = clean_state_dict(float_model)
    bf16_state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in float_state.items()}
    float_bytes = memory_bytes([float_model])
    return {"float32": (4 * weights, float_bytes, disk_bytes(float_state)),
            "bfloat16": (2 * weights, float_bytes // 2, disk_bytes(bf16_state)),
            "quantized": (memory_bytes(quantized_model.get_submodule(n) for n in names),
                          memory_bytes([quantized_model]), disk_bytes(clean_state_dict(quantized_model)))}


def token_data(config, folder, device):
    """Open the token files of the checkpoint's training data (or of `folder`) and check their tokenizer."""
    import train   # imported here so that sample.py, which loads quantized checkpoints, does not load the trainer
    folder = Path(folder or config.get("data", ""))
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"token folder {folder} not found (no meta.json); pass --data with the folder "
                                "the checkpoint was trained on, e.g. data/tokens/tinyshakespeare-char")
    data = train.TokenData(folder, config["model"]["context_len"], torch.device(device))
    if data.meta["tokenizer_hash"] != config["tokenizer"]["hash"]:
        raise ValueError(f"{folder} was tokenized by a different tokenizer than the checkpoint; pass its own --data")
    return data


def bits_per_byte(model, data, tokenizer, batch_size, max_tokens):
    """Compute the validation loss (nats per token) and bits per byte as train.py reports them."""
    import train
    device = next(model.parameters()).device
    byte_lengths = torch.tensor([len(b) for b in tokenizer.token_bytes], device=device)
    return train.evaluate(model, data, train.Runtime(device=device), batch_size, max_tokens, byte_lengths)


# ---------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    parser = tok.ArgumentParser(prog="quantize.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="float checkpoint directory or run folder (required)")
    parser.add_argument("--out", default="", help="new folder for the quantized checkpoint; it must not exist "
                                                  "(default: none, only print sizes)")
    parser.add_argument("--method", default="nf4", help=f"{', '.join(METHODS)}: int8 has one scale per output "
                                                        "channel, int4 a scale and zero-point per group (default: %(default)s)")
    parser.add_argument("--group-size", type=int, default=128, help="weights per scale for int4 and int4-sym (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=64, help="weights per absmax for nf4 (default: %(default)s)")
    parser.add_argument("--double-quant", action="store_true", help="quantize the block scales to int8 in blocks of 256 (default: off)")
    parser.add_argument("--layers", default="blocks.*", help="comma-separated name patterns of the linear and embedding "
                                                             "layers to quantize, e.g. 'blocks.*,lm_head' (default: %(default)s)")
    parser.add_argument("--gptq", action="store_true", help="GPTQ with calibration windows from the training split "
                                                            "instead of round-to-nearest (default: off)")
    parser.add_argument("--calib-tokens", type=int, default=16384, help="GPTQ calibration tokens (default: %(default)s)")
    parser.add_argument("--eval", action="store_true", help="print validation loss and bits per byte, float and quantized (default: off)")
    parser.add_argument("--data", default="", help="token folder for --eval and --gptq (default: the one in the checkpoint's config.json)")
    parser.add_argument("--eval-tokens", type=int, default=131072, help="validation tokens scored by --eval (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward in --eval and --gptq (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    return parser


def run(args):
    # Inputs are checked before the slow steps, and nothing is written unless quantization succeeds.
    for flag in ("group_size", "block_size", "calib_tokens", "eval_tokens", "batch_size"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is invalid; it must be positive")
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads} must be >= 0 (0: torch's default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    block_size = args.block_size if args.method == "nf4" else args.group_size
    check_method(args.method, block_size)
    if args.double_quant and args.method == "int8":
        raise ValueError("--double-quant quantizes the block scales of int4 and nf4; int8 has one scale per output "
                         "channel, so drop --double-quant")
    if args.device not in ("cpu", "cuda", "mps") or (args.device == "cuda" and not torch.cuda.is_available()) \
            or (args.device == "mps" and not torch.backends.mps.is_available()):
        raise ValueError(f"--device {args.device!r} is not available here; use --device cpu")
    source, config = read_checkpoint_config(args.ckpt)
    if "quantization" in config:
        raise ValueError(f"{source} is already quantized ({config['quantization']['method']}); "
                         f"quantize its float checkpoint {config.get('source', '')} instead")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists():
        raise FileExistsError(f"--out {out} already exists; choose a new folder or delete it first")
    tokenizer_file = source / config["tokenizer"].get("file", "tokenizer.json")
    tokenizer = tok.load_tokenizer(str(tokenizer_file))
    data = token_data(config, args.data, args.device) if args.eval or args.gptq else None
    model, _ = load_checkpoint(source, args.device)
    model.eval()
    layers = [pattern.strip() for pattern in args.layers.split(",") if pattern.strip()]
    names = select_layers(model, layers)

    hessians = calibration_hessians(model, data, names, args.calib_tokens, args.batch_size) if args.gptq else None
    quantized = copy.deepcopy(model)
    quantize_model(quantized, args.method, block_size, args.double_quant, layers, hessians)
    print_sizes(source, args, block_size, size_report(model, quantized, names))

    if out is not None:
        settings = {"method": args.method, "double_quant": args.double_quant, "gptq": args.gptq, "layers": names}
        if args.method != "int8":
            settings["block_size" if args.method == "nf4" else "group_size"] = block_size
        record = {**config, "stage": "quantize", "source": str(source), "quantization": settings,
                  "tokenizer": {**config["tokenizer"], "file": "tokenizer.json"}}
        save_quantized(out, quantized, record, tokenizer_file)
        print(f"wrote {out}")
    if args.eval:
        float_loss, float_bpb = bits_per_byte(model, data, tokenizer, args.batch_size, args.eval_tokens)
        loss, bpb = bits_per_byte(quantized, data, tokenizer, args.batch_size, args.eval_tokens)
        print(f"val loss {float_loss:.4f} -> {loss:.4f} | val bits/byte {float_bpb:.4f} -> {bpb:.4f} "
              f"({100 * (bpb / float_bpb - 1):+.2f}%)")


def print_sizes(source, args, block_size, sizes):
    grid = "one scale per output channel" if args.method == "int8" else f"{block_size} weights per scale"
    double_quant = ", double quantization" if args.double_quant else ""
    gptq_note = ", GPTQ" if args.gptq else ""
    print(f"{source}: {args.method}, {grid}{double_quant}{gptq_note}")
    print(f"{'bytes':<10} {'quantized layers':>17} {'whole model':>14} {'model.pt':>14}")
    for row, (layer_bytes, model_bytes, file_bytes) in sizes.items():
        print(f"{args.method if row == 'quantized' else row:<10} {layer_bytes:>17,} {model_bytes:>14,} {file_bytes:>14,}")
    layer_bytes = sizes["quantized"][0]
    print(f"quantized layers: {layer_bytes / sizes['float32'][0]:.3f}x float32, {layer_bytes / sizes['bfloat16'][0]:.3f}x bfloat16")


def save_quantized(out, model, config, tokenizer_file):
    """Write the checkpoint directory `out` through a temporary folder renamed into place, so a crash leaves
    no half-written checkpoint."""
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_checkpoint_files(tmp, clean_state_dict(model), config)
    shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
    os.rename(tmp, out)


def main(argv=None):
    tok.run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
