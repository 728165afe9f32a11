"""The transformer: a GPT decoder whose architecture is chosen by one dataclass.

Positions (learned, sinusoidal, RoPE, ALiBi, none), norms (LayerNorm, RMSNorm, DyT, none; pre- or
post-norm), attention (MHA/GQA/MQA, QK-norm, sliding window) and MLPs (GELU, SwiGLU, ReLU², Mixture of
Experts) are all options of `GPTConfig`. Attention runs through `F.scaled_dot_product_attention`, with a
`KVCache` for incremental decoding. A checkpoint is a directory holding `model.pt` (a plain state dict)
and `config.json`; `save_checkpoint` and `load_checkpoint` read and write it. This file imports nothing
from the project; train.py, sample.py and the other stages build on it.
"""
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value are not scored (PyTorch's cross_entropy default)

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
NORMS = ("layernorm", "rmsnorm", "dyt", "none")
MLPS = ("gelu", "swiglu", "relu2")


@dataclass
class GPTConfig:
    vocab_size: int = 72
    context_len: int = 256          # tokens the model is trained on; learned positions stop here
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0              # 0 means n_head (MHA); 1 is MQA; in between is GQA
    n_embd: int = 128
    pos: str = "rope"
    rope_base: float = 10000.0
    norm: str = "rmsnorm"
    norm_placement: str = "pre"     # "pre": x + f(norm(x)); "post": norm(x + f(x))
    dyt_alpha: float = 0.5          # initial alpha of DyT
    qk_norm: bool = False
    window: int = 0                 # sliding-window size in tokens; 0 means full causal attention
    window_pattern: str = ""        # per-layer pattern, repeated: "L" sliding window, "G" global; "" = all L
    mlp: str = "gelu"
    mlp_hidden: int = 0             # 0: 4 * n_embd, or 8/3 * n_embd rounded up to a multiple of 64 for SwiGLU
    n_expert: int = 0               # 0: dense MLPs; else a Mixture of Experts with this many experts
    moe_top_k: int = 2
    moe_every: int = 1              # MoE in every k-th layer (layers k-1, 2k-1, ...); the others stay dense
    moe_capacity_factor: float = 0.0  # 0: no token dropping
    moe_shared_expert: bool = False
    moe_aux_coef: float = 0.01      # weight of the load-balancing loss
    moe_z_coef: float = 0.0         # weight of the router z-loss
    tie_embeddings: bool = True
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        self.validate()

    def validate(self):
        """Raise ValueError naming the first setting that cannot build a model."""
        def check(ok, message):
            if not ok:
                raise ValueError(message)
        for name in ("vocab_size", "context_len", "n_layer", "n_head", "n_embd"):
            check(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
        check(self.pos in POSITIONS, f"unknown position scheme {self.pos!r}; choose one of {', '.join(POSITIONS)}")
        check(self.norm in NORMS, f"unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        check(self.norm_placement in ("pre", "post"), f"norm placement {self.norm_placement!r} must be pre or post")
        check(self.mlp in MLPS, f"unknown MLP {self.mlp!r}; choose one of {', '.join(MLPS)}")
        check(self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        check(0 < self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0,
              f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        check(self.pos != "rope" or (self.n_embd // self.n_head) % 2 == 0, "RoPE needs an even head dimension")
        check(self.pos != "sinusoidal" or self.n_embd % 2 == 0, "sinusoidal positions need an even n_embd")
        check(self.window >= 0, f"window={self.window} must be 0 (full attention) or positive")
        check(self.mlp_hidden >= 0, f"mlp_hidden={self.mlp_hidden} must be 0 (the default size) or positive")
        check(self.rope_base > 0, f"rope_base={self.rope_base} must be positive")
        check(set(self.window_pattern) <= {"L", "G"}, f"window pattern {self.window_pattern!r} may hold only L and G")
        check(not self.window_pattern or self.window > 0, f"window pattern {self.window_pattern!r} needs a window size > 0")
        check(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        check(self.n_expert >= 0 and self.moe_every >= 1, "n_expert must be >= 0 and moe_every >= 1")
        if self.n_expert:
            check(1 <= self.moe_top_k <= self.n_expert, f"moe_top_k={self.moe_top_k} must be in 1..n_expert")
            check(self.moe_capacity_factor >= 0, "moe_capacity_factor must be >= 0")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def layer_window(self, layer):
        """Sliding-window size of one layer (0 means full attention)."""
        if not self.window or not self.window_pattern:
            return self.window
        return self.window if self.window_pattern[layer % len(self.window_pattern)] == "L" else 0

    def is_moe_layer(self, layer):
        return self.n_expert > 0 and (layer + 1) % self.moe_every == 0

    def hidden_size(self):
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            # LLaMA's choice: two thirds of 4d, so three matrices cost what two 4d ones do.
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    @classmethod
    def from_dict(cls, values):
        """Build a config from a saved dict; fields missing there (older checkpoints) take their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}: the checkpoint is from a newer version")
        return cls(**values)


# ---------------------------------------------------------------------------------------------------
# Positions


def sinusoidal_table(pos, dim):
    """Sinusoidal position encodings (Vaswani et al. 2017): PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)
    angles = pos.float()[..., None] * inv_freq             # (..., T, dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # (..., T, dim), sin/cos interleaved


def rope_cos_sin(pos, head_dim, base):
    """Rotation angles of RoPE (Su et al. 2021) for the given positions: cos and sin of shape (..., T, head_dim/2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angles = pos.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate the two halves of each head's vector by the position angle (the GPT-NeoX/LLaMA layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)                    # (B, H, T, head_dim/2) each
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


def alibi_slopes(n_head):
    """Per-head ALiBi slopes (Press et al. 2022): a geometric series from 2^(-8/n); for a head count that is not a
    power of two, the slopes of the next lower power of two plus every other slope of twice that."""
    def power_of_two_slopes(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    closest = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two_slopes(closest)
    if closest < n_head:
        slopes += power_of_two_slopes(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes)


# ---------------------------------------------------------------------------------------------------
# Norms


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al. 2025, "Transformers without Normalization"): gamma * tanh(alpha * x) + beta,
    with one learnable scalar alpha and per-channel gamma and beta."""

    def __init__(self, dim, alpha=0.5):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return self.weight * torch.tanh(self.alpha * x) + self.bias


def make_norm(config):
    dim = config.n_embd
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, bias=config.bias)
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    if config.norm == "dyt":
        return DyT(dim, config.dyt_alpha)
    return nn.Identity()


# ---------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of the tokens seen so far, one entry per layer, for incremental decoding.

    Tokens are indexed 0, 1, ... in the order they were fed. `key_valid` (B, total) marks real tokens, so
    left padding in a batch is never attended to; `n_valid` (B,) counts each row's real tokens, which gives
    the position of the next one. A sliding-window layer keeps only its last `window - 1` keys.
    """

    def __init__(self, n_layer):
        self.keys = [None] * n_layer
        self.values = [None] * n_layer
        self.start = [0] * n_layer      # token index of each layer's first cached key
        self.seq_len = 0                # tokens fed so far
        self.key_valid = None           # (B, seq_len) bool
        self.n_valid = None             # (B,) long

    def append(self, layer, k, v, window):
        """Add this call's keys and values to a layer; return everything the new queries may attend to."""
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        key_start = self.start[layer]
        keep = k.size(2) if not window else min(k.size(2), window - 1)
        self.keys[layer], self.values[layer] = k[:, :, k.size(2) - keep:], v[:, :, v.size(2) - keep:]
        self.start[layer] = key_start + k.size(2) - keep
        return k, v, key_start

    def reorder(self, index):
        """Keep (or repeat) batch rows, e.g. when some sequences finish or beams are picked."""
        self.keys = [k[index] if k is not None else None for k in self.keys]
        self.values = [v[index] if v is not None else None for v in self.values]
        self.key_valid, self.n_valid = self.key_valid[index], self.n_valid[index]


def attention_bias(q_index, k_index, window, key_valid, slopes):
    """Build the SDPA attention mask: causal, optionally banded to the window, with padded keys removed.

    q_index (Tq,) and k_index (Tk,) are token indices, so the mask stays right when queries are the last
    rows of a longer sequence (the KV cache case, where `is_causal=True` would align top-left instead).
    Returns a bool mask (True = attend) of shape (B or 1, 1, Tq, Tk), or with ALiBi slopes a float bias
    of shape (B or 1, H, Tq, Tk).
    """
    distance = q_index[:, None] - k_index[None, :]        # (Tq, Tk)
    allowed = distance >= 0
    if window:
        allowed &= distance < window
    allowed = allowed[None, None]                          # (1, 1, Tq, Tk)
    if key_valid is not None:
        # A padding query attends to itself only, so no row is empty (an empty row gives NaN).
        allowed = (allowed & key_valid[:, None, None, :]) | (distance == 0)
    if slopes is None:
        return allowed
    bias = -slopes.to(q_index.device)[:, None, None] * distance.float()  # (H, Tq, Tk)
    return bias.masked_fill(~allowed, float("-inf"))


# ---------------------------------------------------------------------------------------------------
# Attention and MLPs


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.window = config.layer_window(layer)
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.head_dim, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if config.qk_norm else None
        self.register_buffer("slopes", alibi_slopes(config.n_head) if config.pos == "alibi" else None, persistent=False)

    def forward(self, x, rope, q_index, kv_cache, key_valid):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                                     self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        key_start = 0
        if kv_cache is not None:
            k, v, key_start = kv_cache.append(self.layer, k, v, self.window)
            if key_valid is not None:
                key_valid = kv_cache.key_valid[:, key_start:]

        # Fast paths need no explicit mask: a whole sequence under plain causal attention, and one new
        # token that may see every cached key.
        simple = not self.window and key_valid is None and self.slopes is None
        causal = simple and k.size(2) == T
        if simple and (causal or T == 1):
            mask = None
        else:
            k_index = torch.arange(key_start, key_start + k.size(2), device=x.device)
            mask = attention_bias(q_index, k_index, self.window, key_valid, self.slopes)
        dropout = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head   # query head h reads kv head h // (n_head / n_kv_head)
        if x.device.type == "cpu" and q.dtype == torch.bfloat16:
            # On CPU, torch 2.13's bfloat16 attention backward is about 3x slower than float32's
            # (bench.py throughput), so attention alone runs in float32 there.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal,
                                                   dropout_p=dropout, enable_gqa=gqa).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)              # (B, T, n_embd)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        hidden = config.hidden_size()
        self.fc = nn.Linear(config.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x, token_mask=None):
        h = self.fc(x)
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:  # SwiGLU (Shazeer 2020): silu(x W) * (x V)
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.proj(h)


class MoE(nn.Module):
    """A Mixture of Experts MLP: a softmax router sends each token to its top-k experts.

    The top-k gates are renormalised to sum to one. Tokens are sorted by expert and each expert runs once
    on its tokens. With a capacity factor, an expert takes at most ceil(factor * tokens * k / E) tokens,
    earliest first; a token dropped by all its experts gets a zero output, so the block's residual passes it
    through unchanged. After each forward, `aux_loss` holds the weighted load-balancing loss (plus z-loss)
    to add to the training loss, and `balance_loss` the unweighted balance term for logging.
    """

    def __init__(self, config):
        super().__init__()
        self.n_expert, self.top_k = config.n_expert, config.moe_top_k
        self.capacity_factor = config.moe_capacity_factor
        self.aux_coef, self.z_coef = config.moe_aux_coef, config.moe_z_coef
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.n_expert))
        self.shared_expert = MLP(config) if config.moe_shared_expert else None
        self.aux_loss = self.balance_loss = None

    def forward(self, x, token_mask=None):
        B, T, C = x.shape
        x_flat = x.reshape(-1, C)                              # (N, C)
        n_tokens = x_flat.size(0)
        valid = torch.ones(n_tokens, dtype=torch.bool, device=x.device) if token_mask is None else token_mask.reshape(-1)

        router_logits = self.router(x_flat).float()             # (N, E)
        probs = router_logits.softmax(dim=-1)
        gates, experts = probs.topk(self.top_k, dim=-1)         # (N, k)
        gates = gates / gates.sum(dim=-1, keepdim=True)

        # One row per (token, expert) assignment, grouped by expert; the stable sort keeps token order
        # inside each expert, so the capacity limit keeps the earliest tokens.
        token_ids = torch.arange(n_tokens, device=x.device).repeat_interleave(self.top_k)
        expert_ids, gate_values = experts.reshape(-1), gates.reshape(-1)
        keep = valid[token_ids]
        token_ids, expert_ids, gate_values = token_ids[keep], expert_ids[keep], gate_values[keep]
        order = torch.sort(expert_ids, stable=True).indices
        token_ids, expert_ids, gate_values = token_ids[order], expert_ids[order], gate_values[order]
        counts = torch.bincount(expert_ids, minlength=self.n_expert)   # tokens routed to each expert

        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * int(valid.sum()) * self.top_k / self.n_expert)
            first_row = torch.cumsum(counts, 0) - counts
            rank_in_expert = torch.arange(len(expert_ids), device=x.device) - first_row[expert_ids]
            kept = rank_in_expert < capacity
            token_ids, expert_ids, gate_values = token_ids[kept], expert_ids[kept], gate_values[kept]
        kept_counts = torch.bincount(expert_ids, minlength=self.n_expert).tolist()

        out = torch.zeros_like(x_flat)
        # Every expert runs, even on zero tokens, so all parameters join the graph and DDP sees them used.
        for expert, rows in zip(self.experts, torch.split(torch.arange(len(token_ids), device=x.device), kept_counts)):
            tokens = token_ids[rows]
            y = expert(x_flat[tokens]) * gate_values[rows, None].to(x.dtype)
            out.index_add_(0, tokens, y.to(out.dtype))
        if self.shared_expert is not None:
            out = out + self.shared_expert(x_flat)

        # Load balancing (Switch Transformer, Fedus et al. 2021): E * sum_i f_i * P_i, where f_i is the
        # fraction of assignments routed to expert i (before capacity drops) and P_i its mean router
        # probability; both over real tokens only. It is 1.0 when routing is uniform.
        n_valid = valid.sum().clamp(min=1)
        fraction = counts.float() / (n_valid * self.top_k)
        mean_prob = (probs * valid[:, None]).sum(0) / n_valid
        self.balance_loss = self.n_expert * (fraction * mean_prob).sum()
        self.aux_loss = self.aux_coef * self.balance_loss
        if self.z_coef:
            # Router z-loss (Zoph et al. 2022): keeps router logits small.
            z = (torch.logsumexp(router_logits, dim=-1).square() * valid).sum() / n_valid
            self.aux_loss = self.aux_loss + self.z_coef * z
        return out.view(B, T, C)


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.post_norm = config.norm_placement == "post"
        self.norm1, self.norm2 = make_norm(config), make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp = MoE(config) if config.is_moe_layer(layer) else MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, q_index, kv_cache, key_valid, token_mask):
        if self.post_norm:  # the original Transformer: normalize after each residual add
            x = self.norm1(x + self.dropout(self.attn(x, rope, q_index, kv_cache, key_valid)))
            return self.norm2(x + self.dropout(self.mlp(x, token_mask)))
        x = x + self.dropout(self.attn(self.norm1(x), rope, q_index, kv_cache, key_valid))
        return x + self.dropout(self.mlp(self.norm2(x), token_mask))


# ---------------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context_len, config.n_embd) if config.pos == "learned" else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        # Post-norm blocks already end in a norm, so only pre-norm models get a final one.
        self.norm_f = make_norm(config) if config.norm_placement == "pre" else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.aux_loss = None      # MoE auxiliary loss of the last forward (None for dense models)
        self.balance_loss = None  # mean unweighted MoE balance loss of the last forward, for logging
        self.apply(self._init_weights)
        # Residual projections start smaller, by depth, so the residual stream's variance does not grow
        # with the number of layers (GPT-2, Radford et al. 2019).
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, kv_cache=None, pad_mask=None, reduction="mean"):
        """Run the model on token ids idx (B, T).

        Returns (logits (B, T, vocab_size), loss). loss is None without targets, else the cross-entropy over
        targets that are not IGNORE_INDEX: their mean, or their sum with reduction="sum" (so a caller can
        normalize by tokens across micro-batches and ranks). pad_mask (B, T) marks real tokens as True;
        left padding keeps every row's positions starting at 0. With a kv_cache the tokens continue the
        cached sequence. MoE auxiliary losses are not added to loss: they are left in `self.aux_loss`.
        """
        B, T = idx.shape
        start = kv_cache.seq_len if kv_cache is not None else 0
        q_index = torch.arange(start, start + T, device=idx.device)  # token indices of this call

        if kv_cache is not None and (pad_mask is not None or kv_cache.key_valid is not None):
            if kv_cache.key_valid is None:   # the cached tokens came without padding
                kv_cache.key_valid = torch.ones(B, start, dtype=torch.bool, device=idx.device)
                kv_cache.n_valid = torch.full((B,), start, dtype=torch.long, device=idx.device)
            valid = torch.ones(B, T, dtype=torch.bool, device=idx.device) if pad_mask is None else pad_mask.bool()
            pos = (kv_cache.n_valid[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)   # (B, T)
            kv_cache.key_valid = torch.cat((kv_cache.key_valid, valid), 1)
            kv_cache.n_valid = kv_cache.n_valid + valid.sum(1)
            key_valid = None if bool(kv_cache.key_valid.all()) else kv_cache.key_valid
        elif pad_mask is not None:
            pos = (pad_mask.long().cumsum(1) - 1).clamp(min=0)
            key_valid = pad_mask.bool()
        else:
            pos, key_valid = q_index, None   # (T,), the same for every row

        x = self.wte(idx)                                        # (B, T, n_embd)
        if self.config.pos == "learned":
            last_pos = start + T - 1 if pos.dim() == 1 else int(pos.max())
            if last_pos >= self.config.context_len:
                raise ValueError(f"position {last_pos} is beyond context_len={self.config.context_len} "
                                 "of a model with learned positions; shorten the input")
            x = x + self.wpe(pos)
        elif self.config.pos == "sinusoidal":
            x = x + sinusoidal_table(pos, self.config.n_embd).to(x.dtype)
        rope = None
        if self.config.pos == "rope":
            cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_base)
            rope = (cos[:, None], sin[:, None]) if pos.dim() == 2 else (cos, sin)  # broadcast over heads
        x = self.dropout(x)

        token_mask = pad_mask.bool() if pad_mask is not None else None
        for block in self.blocks:
            x = block(x, rope, q_index, kv_cache, key_valid, token_mask)
        x = self.norm_f(x)
        logits = self.lm_head(x)                                 # (B, T, vocab_size)
        if kv_cache is not None:
            kv_cache.seq_len += T

        moe_layers = [block.mlp for block in self.blocks if isinstance(block.mlp, MoE)]
        if moe_layers:
            self.aux_loss = sum(m.aux_loss for m in moe_layers)
            self.balance_loss = sum(m.balance_loss.detach() for m in moe_layers) / len(moe_layers)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction=reduction)
        return logits, loss

    def new_kv_cache(self):
        return KVCache(self.config.n_layer)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=None, pad_mask=None,
                 generator=None, on_token=None):
        """Continue the prompts idx (B, T) by up to max_new_tokens tokens, using the KV cache.

        Prompts of different lengths are left-padded, with pad_mask (B, T) True on real tokens. A row that
        emits eos_id keeps emitting it, and generation stops when every row has. When the sequence
        outgrows context_len, the cache is rebuilt from the last context_len // 2 tokens, so the model
        never sees more context than it was trained on. on_token(ids (B,)) is called after each step and
        ends generation by returning True. Returns (B, T + new) ids.
        """
        B = idx.size(0)
        tokens = idx
        valid = torch.ones_like(idx, dtype=torch.bool) if pad_mask is None else pad_mask.bool()
        padded = not bool(valid.all())   # without padding, decoding takes the mask-free fast path
        kv_cache = self.new_kv_cache()
        logits, _ = self(tokens, kv_cache=kv_cache, pad_mask=valid if padded else None)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            next_ids = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)   # (B,)
            if eos_id is not None:
                next_ids = torch.where(done, torch.full_like(next_ids, eos_id), next_ids)
                done |= next_ids == eos_id
            tokens = torch.cat((tokens, next_ids[:, None]), dim=1)
            valid = torch.cat((valid, torch.ones_like(valid[:, :1])), dim=1)
            stop = on_token(next_ids) if on_token is not None else False
            if stop or bool(done.all()):
                break
            if kv_cache.seq_len >= self.config.context_len:
                keep = self.config.context_len // 2
                kv_cache = self.new_kv_cache()
                logits, _ = self(tokens[:, -keep:], kv_cache=kv_cache, pad_mask=valid[:, -keep:] if padded else None)
            else:
                logits, _ = self(next_ids[:, None], kv_cache=kv_cache)
        return tokens

    # -----------------------------------------------------------------------------------------------
    # Sizes and cost

    def num_params(self, active=False):
        """Parameter count, shared (tied) tensors counted once. active=True counts only what one token uses:
        the top-k experts of each MoE layer instead of all of them."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for block in self.blocks:
                if isinstance(block.mlp, MoE):
                    per_expert = sum(p.numel() for p in block.mlp.experts[0].parameters())
                    total -= (block.mlp.n_expert - block.mlp.top_k) * per_expert
        return total

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix (Chowdhery et al.
        2022): 6 per active matrix weight (the output head included, embedding lookups not) plus
        12 * n_embd * attended length per layer for the attention scores and their weighted sum."""
        seq_len = seq_len or self.config.context_len
        embeddings = {"wte.weight", "wpe.weight"}
        matrix_params = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and n not in embeddings)
        if self.config.tie_embeddings:
            matrix_params += self.lm_head.weight.numel()  # the head is a matmul even when it shares the embedding
        for block in self.blocks:
            if isinstance(block.mlp, MoE):  # only top_k experts run per token
                per_expert = sum(p.numel() for p in block.mlp.experts[0].parameters() if p.dim() == 2)
                matrix_params -= (block.mlp.n_expert - block.mlp.top_k) * per_expert
        attention = sum(12 * self.config.n_embd * min(seq_len, self.config.layer_window(layer) or seq_len)
                        for layer in range(self.config.n_layer))
        return 6 * matrix_params + attention


# ---------------------------------------------------------------------------------------------------
# Sampling one token


def sample_next_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Pick the next token ids (B,) from logits (B, V).

    temperature 0 (or top_k 1) is greedy decoding. top_k keeps the k most likely tokens; top_p keeps the
    smallest set of most likely tokens whose probability reaches top_p, the token that crosses the
    threshold included; ties are broken by the lower token id, so the kept set is deterministic.
    """
    if not temperature >= 0:   # NaN fails this comparison too
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy decoding)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        probs, order = torch.sort(logits.softmax(dim=-1), dim=-1, descending=True, stable=True)
        mass_before = probs.cumsum(dim=-1) - probs
        # The 1e-6 slack keeps float rounding from admitting a token that starts exactly at top_p.
        drop_sorted = mass_before >= top_p - 1e-6
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------------
# Checkpoints: a directory with model.pt (plain tensors) and config.json


def clean_state_dict(model):
    """The model's state dict without the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes."""
    cleaned = {}
    for key, value in model.state_dict().items():
        key = key.replace("_orig_mod.", "")
        cleaned[key.removeprefix("module.")] = value
    return cleaned


def write_checkpoint_files(directory, state_dict, config):
    """Write model.pt and config.json into an existing directory, flushed to disk before returning."""
    directory = Path(directory)
    torch.save(state_dict, directory / "model.pt")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("model.pt", "config.json"):
        with open(directory / name, "rb") as f:
            os.fsync(f.fileno())


def find_checkpoint(path):
    """Resolve a checkpoint directory: the path itself if it holds model.pt, else the newest complete
    `step-*` checkpoint inside it (a training run's output folder)."""
    path = Path(path)
    if (path / "model.pt").is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found; pass a run folder such as out/<run> or a checkpoint directory")
    candidates = sorted((p for p in path.glob("step-*") if (p / "model.pt").is_file() and (p / "config.json").is_file()),
                        key=lambda p: int(p.name.removeprefix("step-")) if p.name.removeprefix("step-").isdigit() else -1)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint in {path}: it has no model.pt and no step-* checkpoint folder")
    return candidates[-1]


def read_checkpoint_config(path):
    directory = find_checkpoint(path)
    try:
        config = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / 'config.json'} is not valid JSON ({e}); the checkpoint is damaged") from None
    if "model" not in config:
        raise ValueError(f"{directory / 'config.json'} has no 'model' section; it is not a model checkpoint")
    return directory, config


def load_tensor_file(path, device="cpu"):
    """torch.load with weights_only=True (tensors and plain containers only, so no code runs), raising
    ValueError for a truncated or foreign file."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises RuntimeError, pickle errors and others for damaged files
        raise ValueError(f"{path} could not be read ({type(e).__name__}); the checkpoint is damaged or not a torch file") from None


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint directory (or a run folder's newest checkpoint). Returns (model, config dict)."""
    directory, config = read_checkpoint_config(path)
    model = GPT(GPTConfig.from_dict(config["model"]))
    state = load_tensor_file(directory / "model.pt", device)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first_line = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ValueError(f"{directory / 'model.pt'} does not match its config.json: {first_line}") from None
    return model.to(device), config
