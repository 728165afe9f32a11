"""Tests of model.py against independent references: attention written out as an explicit softmax, the
published formulas for positions, norms, MLPs and MoE losses, and naive per-token loops.

Every GPT here is tiny (vocab 48, width 16, 1-2 layers, 4 heads, float32). `make_model` adds noise of
std 0.3 to every initialized parameter, because at the default init (std 0.02) attention is nearly uniform
and a wrong mask or position shifts the logits by less than the tolerances used below.
"""
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (
    GPT,
    IGNORE_INDEX,
    MLP,
    Block,
    DyT,
    GPTConfig,
    MoE,
    alibi_slopes,
    apply_rope,
    attention_bias,
    clean_state_dict,
    find_checkpoint,
    load_checkpoint,
    rope_cos_sin,
    sinusoidal_table,
    write_checkpoint_files,
)

VOCAB = 48
TINY = dict(vocab_size=VOCAB, context_len=32, n_layer=2, n_head=4, n_embd=16)
POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "none"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run this module's tiny matmuls on one intra-op thread, then restore the previous count. With another
    process busy on one core of a 2-core machine, the default two threads made this file about 15x slower
    (73 s against 5 s, torch 2.13 CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_config(**overrides):
    return GPTConfig(**{**TINY, **overrides})


def perturb(module, seed=0, std=0.3):
    """Add Gaussian noise to every parameter, so no weight keeps its init value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(std * torch.randn(param.shape, generator=generator))
    return module


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return perturb(GPT(make_config(**overrides)), seed).eval()


def random_tokens(*shape, seed=0):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def causal_allowed(n_query, n_key, window=0, query_offset=0):
    """Build a bool mask (n_query, n_key) cell by cell, True where query i (token index query_offset + i) may
    attend to key j."""
    rows = []
    for i in range(n_query):
        q = query_offset + i
        rows.append([j <= q and (window == 0 or q - j < window) for j in range(n_key)])
    return torch.tensor(rows)


def softmax_attention(q, k, v, allowed, bias=None):
    """Compute scaled dot-product attention step by step: q (B, H, Tq, D), k and v (B, H, Tk, D), allowed (Tq, Tk)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))   # (B, H, Tq, Tk)
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ v


def alibi_slopes_by_hand(n_head):
    """Compute ALiBi slopes by the rule of Press et al. 2022: 2^(-8i/n) for i = 1..n when n is a power of two.
    Otherwise take the slopes of the largest power of two below n, then the odd-numbered slopes (i = 1, 3, 5, ...)
    of twice that power of two, as many as are missing."""
    closest = 1
    while closest * 2 <= n_head:
        closest *= 2
    slopes = [2.0 ** (-8.0 * i / closest) for i in range(1, closest + 1)]
    odd_exponents = range(1, 2 * closest + 1, 2)
    slopes += [2.0 ** (-8.0 * i / (2 * closest)) for i in odd_exponents][: n_head - closest]
    return torch.tensor(slopes)


def sinusoidal_by_hand(n_positions, dim):
    """Build the sinusoidal table of Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), and PE[p, 2i+1]
    is the cosine of the same angle."""
    table = torch.zeros(n_positions, dim)
    for p in range(n_positions):
        for i in range(dim // 2):
            angle = p / 10000 ** (2 * i / dim)
            table[p, 2 * i] = math.sin(angle)
            table[p, 2 * i + 1] = math.cos(angle)
    return table


def rope_by_hand(x, positions, base):
    """Rotate dimension pairs (i, i + D/2) of x (B, H, T, D) by angle position * base^(-2i/D)."""
    out = x.clone()
    half = x.size(-1) // 2
    for t, p in enumerate(positions):
        for i in range(half):
            angle = torch.tensor(p * base ** (-2.0 * i / x.size(-1)))
            a, b = x[:, :, t, i], x[:, :, t, i + half]
            out[:, :, t, i] = a * angle.cos() - b * angle.sin()
            out[:, :, t, i + half] = a * angle.sin() + b * angle.cos()
    return out


def rms_norm_by_hand(x, weight, eps=1e-6):
    return x / torch.sqrt(x.square().mean(dim=-1, keepdim=True) + eps) * weight


def linear_by_hand(x, layer):
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


def attention_by_hand(attn, x, pos="none", rope_base=10000.0, window=0):
    """Compute one Attention module's output from its qkv and proj weights, with an explicit softmax."""
    B, T, C = x.shape
    H, n_kv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    qkv = linear_by_hand(x, attn.qkv)
    q = qkv[..., : H * D].reshape(B, T, H, D).permute(0, 2, 1, 3)
    k = qkv[..., H * D: (H + n_kv) * D].reshape(B, T, n_kv, D).permute(0, 2, 1, 3)
    v = qkv[..., (H + n_kv) * D:].reshape(B, T, n_kv, D).permute(0, 2, 1, 3)
    if attn.q_norm is not None:
        q = rms_norm_by_hand(q, attn.q_norm.weight)
        k = rms_norm_by_hand(k, attn.k_norm.weight)
    if pos == "rope":
        q, k = rope_by_hand(q, range(T), rope_base), rope_by_hand(k, range(T), rope_base)

    kv_head_of = [h // (H // n_kv) for h in range(H)]
    k, v = k[:, kv_head_of], v[:, kv_head_of]
    bias = None
    if pos == "alibi":
        slopes = alibi_slopes_by_hand(H)
        bias = torch.tensor([[[-float(slopes[h]) * (i - j) for j in range(T)] for i in range(T)] for h in range(H)])
    y = softmax_attention(q, k, v, causal_allowed(T, T, window), bias)
    return linear_by_hand(y.permute(0, 2, 1, 3).reshape(B, T, C), attn.proj)


def run_attention(attn, x, pos="none", rope_base=10000.0):
    T = x.size(1)
    rope = rope_cos_sin(torch.arange(T), attn.head_dim, rope_base) if pos == "rope" else None
    return attn(x, rope, torch.arange(T), None, None)


def close(actual, expected, tol):
    """Return whether every element agrees within an absolute tolerance."""
    return (actual - expected).abs().max().item() <= tol


# ---------------------------------------------------------------------------------------------------
# KV cache and causal masks


def logits_in_pieces(model, idx, sizes, kv_cache):
    """Feed idx through the KV cache in consecutive chunks of the given sizes; return the joined logits."""
    pieces, start = [], 0
    for size in sizes:
        logits, _ = model(idx[:, start:start + size], kv_cache=kv_cache)
        pieces.append(logits)
        start += size
    return torch.cat(pieces, dim=1)


SPLITS = {"prefill4-decode1": [4, 1, 1, 1, 1, 1, 1], "chunks4-3-3": [4, 3, 3]}
WINDOWS = {"full": {}, "window3": dict(window=3), "window3-LG": dict(window=3, window_pattern="LG")}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("pos", POSITIONS)
def test_kv_cache_matches_full_forward(pos, n_kv_head, window, split):
    model = make_model(pos=pos, n_kv_head=n_kv_head, **WINDOWS[window])
    idx = random_tokens(2, 10)
    with torch.no_grad():
        full, _ = model(idx)
        kv_cache = model.new_kv_cache()
        cached = logits_in_pieces(model, idx, SPLITS[split], kv_cache)

    assert kv_cache.seq_len == 10
    assert cached.shape == full.shape
    assert close(cached, full, 1e-5), f"max error {(cached - full).abs().max().item():.2e}"


@pytest.mark.parametrize("split", SPLITS)
def test_kv_cache_matches_full_forward_moe(split):
    # The model has no capacity limit, because with one the tokens an expert keeps depend on how many tokens
    # arrive in the same call.
    model = make_model(pos="rope", n_kv_head=2, n_expert=4, moe_top_k=2, moe_shared_expert=True)
    idx = random_tokens(2, 10)
    with torch.no_grad():
        full, _ = model(idx)
        cached = logits_in_pieces(model, idx, SPLITS[split], model.new_kv_cache())

    assert close(cached, full, 1e-5)


def test_causal_mask_decode_one_query():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 7, 8).unbind(0)
    reference = softmax_attention(q, k, v, causal_allowed(7, 7))

    mask = attention_bias(torch.tensor([6]), torch.arange(7), 0, None, None)
    decoded = F.scaled_dot_product_attention(q[:, :, 6:], k, v, attn_mask=mask)

    assert decoded.shape == (1, 2, 1, 8)
    assert close(decoded, reference[:, :, 6:], 1e-6)


def test_causal_mask_chunk_after_cached_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 7, 8).unbind(0)
    reference = softmax_attention(q, k, v, causal_allowed(7, 7))

    # Queries 4-6 against the 4 cached keys 0-3 plus their own 3 keys.
    mask = attention_bias(torch.arange(4, 7), torch.arange(7), 0, None, None)
    chunk = F.scaled_dot_product_attention(q[:, :, 4:], k, v, attn_mask=mask)
    top_left = F.scaled_dot_product_attention(q[:, :, 4:], k, v, is_causal=True)

    assert close(chunk, reference[:, :, 4:], 1e-6)
    # With is_causal=True, SDPA aligns the mask top-left, so query 4 would attend to key 0 only. This case
    # detects that mistake.
    assert not close(top_left, reference[:, :, 4:], 1e-3)


ATTENTION_CASES = {
    "mha": dict(n_kv_head=4),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "gqa-bias": dict(n_kv_head=2, bias=True),
    "rope": dict(n_kv_head=2, pos="rope"),
    "rope-base100": dict(n_kv_head=4, pos="rope", rope_base=100.0),
    "alibi": dict(n_kv_head=2, pos="alibi"),
    "qk-norm": dict(n_kv_head=2, qk_norm=True),
    "qk-norm-rope": dict(n_kv_head=4, qk_norm=True, pos="rope"),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_matches_explicit_softmax(case):
    overrides = {"pos": "none", **ATTENTION_CASES[case]}
    model = make_model(**overrides)
    attn = model.blocks[0].attn
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    base = overrides.get("rope_base", 10000.0)

    with torch.no_grad():
        y = run_attention(attn, x, overrides["pos"], base)
        expected = attention_by_hand(attn, x, overrides["pos"], base)

    assert close(y, expected, 1e-5), f"max error {(y - expected).abs().max().item():.2e}"


MODEL_POSITIONS = {
    "learned": dict(pos="learned"),
    "sinusoidal": dict(pos="sinusoidal"),
    "rope": dict(pos="rope"),
    "rope-base100": dict(pos="rope", rope_base=100.0),
    "alibi": dict(pos="alibi"),
    "none": dict(pos="none"),
}


@pytest.mark.parametrize("case", MODEL_POSITIONS)
def test_model_forward_matches_hand_composition(case):
    overrides = MODEL_POSITIONS[case]
    model = make_model(n_layer=1, n_kv_head=2, **overrides)
    block, T = model.blocks[0], 9
    idx = random_tokens(2, T)

    with torch.no_grad():
        logits, _ = model(idx)
        x = model.wte.weight[idx]
        if case == "learned":
            x = x + model.wpe.weight[:T]
        elif case == "sinusoidal":
            x = x + sinusoidal_by_hand(T, 16)
        h = x + attention_by_hand(block.attn, rms_norm_by_hand(x, block.norm1.weight), overrides["pos"],
                                  overrides.get("rope_base", 10000.0))
        h = h + mlp_by_hand(block.mlp, rms_norm_by_hand(h, block.norm2.weight), "gelu")
        expected = rms_norm_by_hand(h, model.norm_f.weight) @ model.lm_head.weight.T

    assert close(logits, expected, 1e-5), f"max error {(logits - expected).abs().max().item():.2e}"


@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("pos", ["none", "alibi"])
def test_sliding_window_matches_banded_mask(pos, window):
    model = make_model(pos=pos, n_kv_head=2, window=window)
    attn = model.blocks[0].attn
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        y = run_attention(attn, x, pos)
        banded = attention_by_hand(attn, x, pos, window=window)
        full = attention_by_hand(attn, x, pos, window=0)

    assert attn.window == window
    assert close(y, banded, 1e-5)
    assert not close(y, full, 1e-3)


@pytest.mark.parametrize("window", [10, 32])
@pytest.mark.parametrize("pos", POSITIONS)
def test_sliding_window_covering_context_equals_full(pos, window):
    idx = random_tokens(2, 10)
    with torch.no_grad():
        windowed, _ = make_model(pos=pos, window=window)(idx)
        full, _ = make_model(pos=pos, window=0)(idx)

    assert close(windowed, full, 1e-6)


def test_window_pattern_assigns_layers():
    config = make_config(n_layer=4, window=3, window_pattern="LG")

    assert [config.layer_window(layer) for layer in range(4)] == [3, 0, 3, 0]
    assert [block.attn.window for block in GPT(config).blocks] == [3, 0, 3, 0]


# ---------------------------------------------------------------------------------------------------
# Grouped-query attention and tied embeddings


def test_gqa_matches_repeated_mha():
    gqa = make_model(n_head=4, n_kv_head=2)
    mha = GPT(make_config(n_head=4, n_kv_head=4)).eval()
    D, C = 4, 16

    def repeat_kv_rows(kv_head_of):
        state = gqa.state_dict()
        for i in range(2):
            weight = state[f"blocks.{i}.attn.qkv.weight"]
            q, k, v = weight[: 4 * D], weight[4 * D: 6 * D], weight[6 * D:]
            k = torch.cat([k[h * D:(h + 1) * D] for h in kv_head_of])
            v = torch.cat([v[h * D:(h + 1) * D] for h in kv_head_of])
            state[f"blocks.{i}.attn.qkv.weight"] = torch.cat((q, k, v))
        return state

    idx = random_tokens(2, 10)
    with torch.no_grad():
        expected, _ = gqa(idx)
        mha.load_state_dict(repeat_kv_rows([h // 2 for h in range(4)]))
        repeated, _ = mha(idx)
        mha.load_state_dict(repeat_kv_rows([h % 2 for h in range(4)]))
        interleaved, _ = mha(idx)
        kv_cache = gqa.new_kv_cache()
        gqa(idx, kv_cache=kv_cache)

    assert gqa.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 2) * D, C)
    assert close(repeated, expected, 1e-6)
    assert not close(interleaved, expected, 1e-3), "the head mapping h % 2 should give other logits"
    assert kv_cache.keys[0].shape == (2, 2, 10, D)
    assert kv_cache.values[1].shape == (2, 2, 10, D)


def count_unique_parameters(model):
    seen = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = param.numel()
    return sum(seen.values())


def test_tied_embeddings_stay_one_tensor(tmp_path):
    model = make_model(tie_embeddings=True)
    assert model.lm_head.weight is model.wte.weight

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx, targets = random_tokens(2, 8, seed=1), random_tokens(2, 8, seed=2)
    before = model.wte.weight.detach().clone()
    for _ in range(3):
        _, loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.lm_head.weight is model.wte.weight
    assert not torch.equal(model.wte.weight, before)

    write_checkpoint_files(tmp_path, clean_state_dict(model), {"model": asdict(model.config)})
    loaded, _ = load_checkpoint(tmp_path)
    assert loaded.lm_head.weight is loaded.wte.weight
    assert torch.equal(loaded.wte.weight, model.wte.weight)


@pytest.mark.parametrize("tie", [True, False])
def test_num_params_counts_tied_weight_once(tie):
    model = GPT(make_config(tie_embeddings=tie))
    C, V, L, hidden = 16, VOCAB, 2, 64
    per_block = 2 * C + (C * 3 * C) + C * C + 2 * C * hidden   # two RMSNorms, qkv, proj, MLP fc and proj
    by_hand = V * C + L * per_block + C + (0 if tie else V * C)

    assert model.num_params() == count_unique_parameters(model)
    assert model.num_params() == by_hand


# ---------------------------------------------------------------------------------------------------
# Left padding


def padded_batch():
    """Build two rows: 7 real tokens, and 3 left pads (random ids) followed by 4 real tokens."""
    long_row, short_row = random_tokens(7, seed=1), random_tokens(4, seed=2)
    pads = random_tokens(3, seed=3)
    idx = torch.stack((long_row, torch.cat((pads, short_row))))
    pad_mask = torch.tensor([[True] * 7, [False] * 3 + [True] * 4])
    next_tokens = random_tokens(2, 1, seed=4)
    return long_row, short_row, idx, pad_mask, next_tokens


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("pos", POSITIONS)
def test_left_padding_matches_row_alone(pos, window):
    model = make_model(pos=pos, n_kv_head=2, window=window)
    long_row, short_row, idx, pad_mask, _ = padded_batch()
    with torch.no_grad():
        logits, _ = model(idx, pad_mask=pad_mask)
        long_alone, _ = model(long_row[None])
        short_alone, _ = model(short_row[None])

    assert close(logits[0], long_alone[0], 1e-5)
    assert close(logits[1, 3:], short_alone[0], 1e-5)


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("pos", POSITIONS)
def test_left_padding_cache_and_decode(pos, window):
    model = make_model(pos=pos, n_kv_head=2, window=window)
    long_row, short_row, idx, pad_mask, next_tokens = padded_batch()
    with torch.no_grad():
        kv_cache = model.new_kv_cache()
        prefill, _ = model(idx, kv_cache=kv_cache, pad_mask=pad_mask)
        step, _ = model(next_tokens, kv_cache=kv_cache)
        long_alone, _ = model(torch.cat((long_row, next_tokens[0]))[None])
        short_alone, _ = model(torch.cat((short_row, next_tokens[1]))[None])

    assert close(prefill[0], long_alone[0, :7], 1e-5)
    assert close(prefill[1, 3:], short_alone[0, :4], 1e-5)
    assert close(step[0, 0], long_alone[0, 7], 1e-5)
    assert close(step[1, 0], short_alone[0, 4], 1e-5)


def test_padding_tokens_get_finite_logits():
    model = make_model(pos="alibi", window=3)
    _, _, idx, pad_mask, _ = padded_batch()
    with torch.no_grad():
        logits, _ = model(idx, pad_mask=pad_mask)

    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------
# Positions and norms


@pytest.mark.parametrize("n_head", [4, 6, 8, 12])
def test_alibi_slopes_match_press_formula(n_head):
    assert close(alibi_slopes(n_head), alibi_slopes_by_hand(n_head), 1e-7)


def test_alibi_slopes_six_heads_values():
    expected = torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3])

    assert close(alibi_slopes(6), expected, 1e-7)


def test_alibi_bias_is_linear_in_distance():
    slopes = alibi_slopes_by_hand(4)
    bias = attention_bias(torch.arange(5), torch.arange(5), 0, None, slopes)

    assert bias.shape[-3:] == (4, 5, 5)
    for h in range(4):
        for i in range(5):
            for j in range(5):
                value = bias[0, h, i, j].item()
                if j <= i:
                    assert value == pytest.approx(-slopes[h].item() * (i - j), abs=1e-7), (h, i, j)
                else:
                    assert value == float("-inf"), (h, i, j)


def test_attention_bias_masks_padded_keys():
    key_valid = torch.tensor([[False, False, True, True]])
    allowed = attention_bias(torch.arange(4), torch.arange(4), 0, key_valid, None)[0, 0]
    expected = torch.tensor([
        [True, False, False, False],   # a padding query attends to itself only, so its row is not empty
        [False, True, False, False],
        [False, False, True, False],
        [False, False, True, True],
    ])

    assert torch.equal(allowed, expected)


def test_sinusoidal_table_matches_formula():
    positions, dim = torch.arange(12), 16
    table = sinusoidal_table(positions, dim)

    assert table.shape == (12, dim)
    assert close(table, sinusoidal_by_hand(12, dim), 1e-6)


def test_rope_matches_pairwise_rotation():
    x = torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    positions = [0, 1, 2, 5, 9, 30]
    cos, sin = rope_cos_sin(torch.tensor(positions), 8, 500.0)

    assert close(apply_rope(x, cos, sin), rope_by_hand(x, positions, 500.0), 1e-5)


def test_dyt_matches_formula():
    dyt = DyT(16, alpha=0.7)
    assert dyt.alpha.item() == pytest.approx(0.7)
    assert torch.equal(dyt.weight, torch.ones(16))
    assert torch.equal(dyt.bias, torch.zeros(16))

    perturb(dyt)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    expected = dyt.weight * torch.tanh(dyt.alpha * x) + dyt.bias
    assert close(dyt(x), expected, 1e-6)


def test_dyt_alpha_comes_from_config():
    model = GPT(make_config(norm="dyt", dyt_alpha=0.25))

    assert model.blocks[0].norm1.alpha.item() == pytest.approx(0.25)
    assert model.norm_f.alpha.item() == pytest.approx(0.25)


def block_input():
    return torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))


def block_call(block, x):
    return block(x, None, torch.arange(x.size(1)), None, None, None)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "dyt"])
def test_pre_norm_block_composition(norm):
    model = make_model(norm=norm, norm_placement="pre")
    block, x, q_index = model.blocks[0], block_input(), torch.arange(6)
    with torch.no_grad():
        h = x + block.attn(block.norm1(x), None, q_index, None, None)
        expected = h + block.mlp(block.norm2(h))
        actual = block_call(block, x)

    assert close(actual, expected, 1e-6)
    assert not isinstance(model.norm_f, nn.Identity)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "dyt"])
def test_post_norm_block_composition(norm):
    model = make_model(norm=norm, norm_placement="post")
    block, x, q_index = model.blocks[0], block_input(), torch.arange(6)
    with torch.no_grad():
        h = block.norm1(x + block.attn(x, None, q_index, None, None))
        expected = block.norm2(h + block.mlp(h))
        actual = block_call(block, x)

    assert close(actual, expected, 1e-6)
    assert isinstance(model.norm_f, nn.Identity)


def test_layernorm_bias_follows_config():
    assert GPT(make_config(norm="layernorm", bias=False)).norm_f.bias is None
    assert GPT(make_config(norm="layernorm", bias=True)).norm_f.bias is not None


# ---------------------------------------------------------------------------------------------------
# MLPs


def mlp_by_hand(mlp, x, kind):
    h = linear_by_hand(x, mlp.fc)
    if kind == "gelu":
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    elif kind == "relu2":
        h = torch.where(h > 0, h, torch.zeros_like(h)) ** 2
    else:
        half = h.size(-1) // 2
        gate, up = h[..., :half], h[..., half:]
        h = gate * torch.sigmoid(gate) * up
    return linear_by_hand(h, mlp.proj)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["gelu", "swiglu", "relu2"])
def test_mlp_matches_formula(kind, bias):
    mlp = perturb(MLP(make_config(mlp=kind, bias=bias)))
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert close(mlp(x), mlp_by_hand(mlp, x, kind), 1e-5)


@pytest.mark.parametrize("n_embd, hidden", [(16, 64), (32, 128), (72, 192), (96, 256), (100, 320)])
def test_swiglu_hidden_size_rounds_to_64(n_embd, hidden):
    mlp = MLP(GPTConfig(vocab_size=VOCAB, n_head=2, n_embd=n_embd, mlp="swiglu"))

    assert mlp.fc.out_features == 2 * hidden
    assert mlp.proj.in_features == hidden


@pytest.mark.parametrize("kind", ["gelu", "relu2"])
def test_dense_hidden_size_default(kind):
    mlp = MLP(make_config(mlp=kind))

    assert mlp.fc.out_features == 64
    assert mlp.proj.in_features == 64


def test_mlp_hidden_overrides_default():
    mlp = MLP(make_config(mlp="swiglu", mlp_hidden=24))

    assert mlp.fc.out_features == 48
    assert mlp.proj.in_features == 24


# ---------------------------------------------------------------------------------------------------
# Mixture of Experts


def make_moe(seed=0, **overrides):
    torch.manual_seed(seed)
    return perturb(MoE(make_config(n_expert=4, moe_top_k=2, **overrides)), seed)


def set_router_columns(moe, columns):
    """Set a router weight that reads only the first len(columns) input channels. Column c gives the logits of
    a token whose input is the one-hot vector e_c."""
    with torch.no_grad():
        moe.router.weight.zero_()
        for c, logits in enumerate(columns):
            moe.router.weight[:, c] = torch.tensor(logits)


def one_hot_tokens(channels):
    return F.one_hot(torch.tensor(channels), 16).float()[None]   # (1, N, 16)


def balance_loss_by_hand(probs, chosen, n_expert, top_k):
    """Compute E * sum_i f_i * P_i (Fedus et al. 2021) from router probabilities (N, E) and chosen experts per token."""
    counts = torch.zeros(n_expert)
    for experts in chosen:
        for e in experts:
            counts[e] += 1
    fraction = counts / (len(chosen) * top_k)
    return n_expert * (fraction * probs.mean(dim=0)).sum()


def test_moe_balanced_routing_loss_one():
    moe = make_moe()
    eps = 1e-3   # near-uniform probabilities; eps only breaks the top-2 tie
    pairs = [(0, 1), (2, 3), (0, 2), (1, 3)]
    set_router_columns(moe, [[eps if e in pair else 0.0 for e in range(4)] for pair in pairs])
    x = one_hot_tokens([t % 4 for t in range(16)])   # each pair gets 4 tokens, each expert 8 assignments

    moe(x)
    probs = (x[0] @ moe.router.weight.T).softmax(dim=-1)
    by_hand = balance_loss_by_hand(probs, [pairs[t % 4] for t in range(16)], 4, 2)

    assert moe.balance_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert by_hand.item() == pytest.approx(1.0, abs=1e-6)
    assert moe.aux_loss.item() == pytest.approx(0.01 * 1.0, abs=1e-8)


def test_moe_collapsed_routing_balance_above_one():
    moe = make_moe()
    set_router_columns(moe, [[2.0, 2.0, 0.0, 0.0]])
    x = one_hot_tokens([0] * 16)

    moe(x)
    probs = (x[0] @ moe.router.weight.T).softmax(dim=-1)
    by_hand = balance_loss_by_hand(probs, [(0, 1)] * 16, 4, 2)   # 2 * (P_0 + P_1), about 1.76

    assert moe.balance_loss.item() == pytest.approx(by_hand.item(), abs=1e-6)
    assert moe.balance_loss.item() > 1.5


def test_moe_balance_loss_ignores_masked_padding():
    moe = make_moe()
    pairs = [(0, 1), (2, 3), (0, 2), (1, 3), (0, 1)]
    set_router_columns(moe, [[0.3 if e in pair else 0.0 for e in range(4)] for pair in pairs[:4]] + [[5.0, 5.0, 0, 0]])
    real = [t % 4 for t in range(12)] + [0, 0, 1, 2]
    x_real = one_hot_tokens(real)
    x_padded = one_hot_tokens([4] * 5 + real)   # 5 left pads that would all route to experts 0 and 1
    token_mask = torch.tensor([[False] * 5 + [True] * 16])

    moe(x_real)
    unpadded = moe.balance_loss.item()
    out = moe(x_padded, token_mask)
    padded = moe.balance_loss.item()
    moe(x_padded)
    pads_counted = moe.balance_loss.item()

    assert padded == pytest.approx(unpadded, abs=1e-6)
    assert pads_counted != pytest.approx(unpadded, abs=1e-3)
    assert torch.equal(out[0, :5], torch.zeros(5, 16))


@pytest.mark.parametrize("loss_name", ["balance_loss", "output"])
def test_moe_router_gets_gradient(loss_name):
    moe = make_moe()
    x = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))

    out = moe(x)
    loss = moe.balance_loss if loss_name == "balance_loss" else out.square().sum()
    loss.backward()

    assert moe.router.weight.grad is not None
    assert moe.router.weight.grad.abs().sum() > 0


def test_moe_z_loss_matches_formula():
    moe = make_moe(moe_z_coef=1e-3, moe_aux_coef=0.02)
    x = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))

    moe(x)
    logits = x[0] @ moe.router.weight.T
    z = torch.log(torch.exp(logits).sum(dim=-1)).square().mean()

    assert moe.aux_loss.item() == pytest.approx(0.02 * moe.balance_loss.item() + 1e-3 * z.item(), rel=1e-5)


def route_all_to_experts_0_and_1(block):
    """Make every token of a pre-norm RMSNorm block pick experts 0 and 1. Channel 0 of the residual stays
    positive because attention writes nothing into it, and the router reads only channel 0."""
    with torch.no_grad():
        block.attn.proj.weight[0] = 0
        block.mlp.router.weight.zero_()
        block.mlp.router.weight[:, 0] = torch.tensor([5.0, 4.0, 0.0, 0.0])
        block.norm2.weight.abs_()


def test_moe_capacity_drops_pass_through_residual():
    config = make_config(n_layer=1, n_expert=4, moe_top_k=2, moe_capacity_factor=1.0)
    torch.manual_seed(0)
    block = perturb(Block(config, 0)).eval()
    route_all_to_experts_0_and_1(block)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    x[..., 0] = 3.0

    with torch.no_grad():
        residual = x + block.attn(block.norm1(x), None, torch.arange(8), None, None)
        out = block_call(block, x)

    # capacity = ceil(1.0 * 16 tokens * 2 / 4 experts) = 8, so experts 0 and 1 keep the first 8 tokens
    # (row 0) and drop row 1 entirely.
    assert torch.equal(out[1], residual[1])
    assert not close(out[0], residual[0], 1e-3)


def moe_by_hand(moe, x, capacity=None):
    """Route token by token: top-k experts by router probability, gates renormalized to sum to one, and
    each expert taking only its first `capacity` assignments in token order."""
    x_flat = x.reshape(-1, x.size(-1))
    probs = (x_flat @ moe.router.weight.T).softmax(dim=-1)
    out = torch.zeros_like(x_flat)
    load = [0] * moe.n_expert
    n_dropped = 0
    for t in range(x_flat.size(0)):
        ranked = sorted(range(moe.n_expert), key=lambda e: -probs[t, e].item())[: moe.top_k]
        total = sum(probs[t, e] for e in ranked)
        for e in ranked:
            if capacity is not None and load[e] >= capacity:
                n_dropped += 1
                continue
            load[e] += 1
            out[t] += probs[t, e] / total * moe.experts[e](x_flat[t])
        if moe.shared_expert is not None:
            out[t] += moe.shared_expert(x_flat[t])
    return out.view_as(x), n_dropped


@pytest.mark.parametrize("capacity_factor, capacity", [(0.0, None), (0.5, 4), (1.0, 8)])
@pytest.mark.parametrize("shared", [False, True])
def test_moe_matches_per_token_loop(capacity_factor, capacity, shared):
    moe = make_moe(moe_capacity_factor=capacity_factor, moe_shared_expert=shared)
    with torch.no_grad():
        moe.router.weight.mul_(10)   # uneven routing, so a capacity limit drops tokens
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        out = moe(x)
        expected, n_dropped = moe_by_hand(moe, x, capacity)

    assert close(out, expected, 1e-5)
    if capacity == 4:
        assert n_dropped > 0, "the capacity case should drop at least one assignment"


def test_single_expert_equals_dense_mlp():
    dense = make_model(n_layer=1)
    moe_model = GPT(make_config(n_layer=1, n_expert=1, moe_top_k=1)).eval()
    state = {key.replace("mlp.", "mlp.experts.0."): value for key, value in dense.state_dict().items()}
    state["blocks.0.mlp.router.weight"] = moe_model.blocks[0].mlp.router.weight.detach()
    moe_model.load_state_dict(state)
    idx = random_tokens(2, 10)

    with torch.no_grad():
        expected, _ = dense(idx)
        actual, _ = moe_model(idx)

    assert close(actual, expected, 1e-6)


def test_moe_active_params_count_top_k():
    config = make_config(n_layer=2, n_kv_head=2, n_expert=4, moe_top_k=2, moe_every=2,
                         moe_shared_expert=True, bias=True)
    model = GPT(config)
    C, V, hidden, qkv_rows = 16, VOCAB, 64, (4 + 2 * 2) * 4
    mlp = C * hidden + hidden + hidden * C + C
    attention = C * qkv_rows + qkv_rows + C * C + C
    norms = 2 * C                                 # two RMSNorms, weight only
    dense_block = norms + attention + mlp
    moe_block = norms + attention + 4 * C + mlp   # router, plus the shared expert
    embedding_and_final_norm = V * C + C

    assert isinstance(model.blocks[1].mlp, MoE)
    assert isinstance(model.blocks[0].mlp, MLP)
    assert model.num_params() == count_unique_parameters(model)
    assert model.num_params() == embedding_and_final_norm + dense_block + moe_block + 4 * mlp
    assert model.num_params(active=True) == embedding_and_final_norm + dense_block + moe_block + 2 * mlp


def test_moe_unused_experts_get_gradients():
    config = make_config(n_layer=1, n_expert=4, moe_top_k=2)
    torch.manual_seed(0)
    block = perturb(Block(config, 0))
    route_all_to_experts_0_and_1(block)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    x[..., 0] = 3.0

    block_call(block, x).square().sum().backward()

    for e in range(4):
        for name, param in block.mlp.experts[e].named_parameters():
            assert param.grad is not None, f"expert {e} {name} has no gradient"
    assert block.mlp.experts[0].fc.weight.grad.abs().sum() > 0
    assert block.mlp.experts[2].fc.weight.grad.abs().sum() == 0, "expert 2 should receive no token"


def test_model_aux_loss_sums_moe_layers():
    model = make_model(n_layer=2, n_expert=4, moe_top_k=2)
    model(random_tokens(2, 10))
    per_layer = [block.mlp.balance_loss.item() for block in model.blocks]

    assert model.aux_loss.item() == pytest.approx(0.01 * sum(per_layer), rel=1e-6)
    assert model.balance_loss.item() == pytest.approx(sum(per_layer) / 2, rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# Loss


def test_loss_matches_cross_entropy_by_hand():
    model = make_model()
    idx, targets = random_tokens(2, 6, seed=1), random_tokens(2, 6, seed=2)
    targets[0, :2] = IGNORE_INDEX
    targets[1, 5] = IGNORE_INDEX

    with torch.no_grad():
        logits, mean_loss = model(idx, targets)
        _, sum_loss = model(idx, targets, reduction="sum")
    terms = []
    for b in range(2):
        for t in range(6):
            if targets[b, t] != IGNORE_INDEX:
                row = logits[b, t]
                terms.append(torch.log(torch.exp(row).sum()) - row[targets[b, t]])

    assert len(terms) == 9
    assert mean_loss.item() == pytest.approx(sum(terms).item() / 9, rel=1e-5)
    assert sum_loss.item() == pytest.approx(sum(terms).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Checkpoints


CHECKPOINT_OPTIONS = {
    **{f"pos-{pos}": dict(pos=pos) for pos in POSITIONS},
    **{f"norm-{norm}": dict(norm=norm) for norm in ["layernorm", "rmsnorm", "dyt", "none"]},
    "post-norm": dict(norm_placement="post", norm="layernorm"),
    **{f"mlp-{kind}": dict(mlp=kind) for kind in ["gelu", "swiglu", "relu2"]},
    "moe": dict(n_expert=4, moe_top_k=2, moe_shared_expert=True, moe_capacity_factor=1.25),
    "qk-norm": dict(qk_norm=True),
    "window": dict(window=3, window_pattern="LG"),
    "gqa": dict(n_kv_head=2),
    "untied": dict(tie_embeddings=False),
    "bias": dict(bias=True),
}


def save(model, directory, config_dict=None):
    write_checkpoint_files(directory, clean_state_dict(model), config_dict or {"model": asdict(model.config)})


@pytest.mark.parametrize("option", CHECKPOINT_OPTIONS)
def test_checkpoint_round_trip_keeps_logits(option, tmp_path):
    model = make_model(**CHECKPOINT_OPTIONS[option])
    save(model, tmp_path)
    loaded, config_dict = load_checkpoint(tmp_path)
    idx = random_tokens(2, 10)

    with torch.no_grad():
        expected, _ = model(idx)
        actual, _ = loaded.eval()(idx)

    assert loaded.config == model.config
    assert config_dict["model"] == asdict(model.config)
    assert torch.equal(actual, expected)


class Wrapper(nn.Module):
    """A substitute for DDP (`.module`) or torch.compile (`._orig_mod`) that registers the model under one name."""

    def __init__(self, name, model):
        super().__init__()
        self.add_module(name, model)


@pytest.mark.parametrize("names", [["module"], ["_orig_mod"], ["module", "_orig_mod"], ["_orig_mod", "module"]])
def test_clean_state_dict_strips_wrapper_prefixes(names):
    model = GPT(make_config())
    wrapped = model
    for name in names:
        wrapped = Wrapper(name, wrapped)
    cleaned = clean_state_dict(wrapped)

    outermost_first = ".".join(reversed(names)) + "."
    assert all(key.startswith(outermost_first) for key in wrapped.state_dict())
    assert list(cleaned) == list(model.state_dict())
    assert all(cleaned[key].data_ptr() == value.data_ptr() for key, value in model.state_dict().items())


def test_truncated_model_file_raises(tmp_path):
    save(make_model(), tmp_path)
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(data[: len(data) // 2])

    with pytest.raises(ValueError, match="model.pt"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("n_layer", [1, 3])
def test_checkpoint_wrong_n_layer_raises(n_layer, tmp_path):
    model = make_model(n_layer=2)
    save(model, tmp_path, {"model": {**asdict(model.config), "n_layer": n_layer}})

    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(tmp_path)


def test_from_dict_fills_missing_fields(tmp_path):
    model = make_model()
    old = asdict(model.config)
    for newer_field in ("n_kv_head", "window_pattern", "qk_norm", "moe_z_coef", "dyt_alpha"):
        del old[newer_field]

    config = GPTConfig.from_dict(old)
    save(model, tmp_path, {"model": old})
    loaded, _ = load_checkpoint(tmp_path)

    assert config.n_kv_head == config.n_head
    assert config.window_pattern == ""
    assert config.qk_norm is False
    assert config == model.config
    assert torch.equal(loaded.wte.weight, model.wte.weight)


def test_find_checkpoint_picks_newest_complete_step(tmp_path):
    model = make_model()
    for step in ["step-000100", "step-000200", "step-000300"]:
        (tmp_path / step).mkdir()
        save(model, tmp_path / step)
    (tmp_path / "step-000300" / "config.json").unlink()   # an incomplete checkpoint is skipped

    assert find_checkpoint(tmp_path) == tmp_path / "step-000200"
    assert find_checkpoint(tmp_path / "step-000100") == tmp_path / "step-000100"


def test_find_checkpoint_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        find_checkpoint(tmp_path / "no-such-run")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_checkpoint(tmp_path)


def test_from_dict_rejects_unknown_field():
    with pytest.raises(ValueError, match="flash_attention"):
        GPTConfig.from_dict({**asdict(make_config()), "flash_attention": True})


# ---------------------------------------------------------------------------------------------------
# Config validation and cost


INVALID_CONFIGS = {
    "width-not-divisible": (dict(n_embd=30, n_head=4), "n_embd=30"),
    "kv-heads-not-dividing": (dict(n_head=4, n_kv_head=3), "n_kv_head=3"),
    "kv-heads-above-heads": (dict(n_head=4, n_kv_head=8), "n_kv_head=8"),
    "unknown-pos": (dict(pos="xpos"), "'xpos'"),
    "unknown-norm": (dict(norm="batchnorm"), "'batchnorm'"),
    "unknown-mlp": (dict(mlp="swish"), "'swish'"),
    "unknown-placement": (dict(norm_placement="sandwich"), "'sandwich'"),
    "top-k-above-experts": (dict(n_expert=2, moe_top_k=3), "moe_top_k=3"),
    "negative-window": (dict(window=-1), "window=-1"),
    "bad-window-pattern": (dict(window=3, window_pattern="LX"), "'LX'"),
    "dropout-one": (dict(dropout=1.0), "dropout=1.0"),
}


@pytest.mark.parametrize("case", INVALID_CONFIGS)
def test_invalid_config_raises_value_error(case):
    overrides, value = INVALID_CONFIGS[case]
    with pytest.raises(ValueError) as error:
        make_config(**overrides)

    assert value in str(error.value)


@pytest.mark.parametrize("use_cache", [False, True])
def test_learned_positions_beyond_context_raise(use_cache):
    model = make_model(pos="learned", context_len=8)
    idx = random_tokens(1, 9)
    with torch.no_grad():
        model(idx[:, :8])   # exactly context_len tokens is allowed
        if use_cache:
            kv_cache = model.new_kv_cache()
            model(idx[:, :8], kv_cache=kv_cache)
            with pytest.raises(ValueError, match="context_len=8"):
                model(idx[:, 8:], kv_cache=kv_cache)
        else:
            with pytest.raises(ValueError, match="context_len=8"):
                model(idx)


def dense_matrix_weights(C, V, L, hidden, qkv_rows):
    """Count the matrix weights one token multiplies by in a dense model: attention, MLP and the output head."""
    return L * (C * qkv_rows + C * C + 2 * C * hidden) + V * C


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_dense(tie):
    config = make_config(pos="learned", norm="layernorm", bias=True, n_kv_head=2, tie_embeddings=tie)
    model = GPT(config)
    C, V, L, T = 16, VOCAB, 2, 20
    matrix = dense_matrix_weights(C, V, L, hidden=64, qkv_rows=(4 + 2 * 2) * 4)

    assert model.flops_per_token(T) == 6 * matrix + 12 * L * C * T
    assert model.flops_per_token() == 6 * matrix + 12 * L * C * 32   # defaults to context_len


def test_flops_per_token_sliding_window():
    model = GPT(make_config(window=3, window_pattern="LG"))
    matrix = dense_matrix_weights(16, VOCAB, 2, hidden=64, qkv_rows=3 * 16)

    assert model.flops_per_token(20) == 6 * matrix + 12 * 16 * (3 + 20)


@pytest.mark.parametrize("bias", [False, True])
def test_flops_per_token_moe_active(bias):
    config = make_config(n_expert=4, moe_top_k=2, moe_shared_expert=True, bias=bias)
    model = GPT(config)
    C, V, L, T, hidden = 16, VOCAB, 2, 20, 64
    expert = 2 * C * hidden
    per_layer = C * 3 * C + C * C + 4 * C + 2 * expert + expert   # attention, router, 2 experts, shared
    matrix = L * per_layer + V * C

    # Biases are not matrix weights, and the 2 experts a token skips count nothing at all.
    assert model.flops_per_token(T) == 6 * matrix + 12 * L * C * T


@pytest.mark.parametrize("pos", ["learned", "rope", "alibi"])
def test_cache_without_padding_then_with_padding(pos):
    """A cache filled without a pad mask and continued with one gives the logits of full recompute."""
    model = make_model(pos=pos)
    idx = random_tokens(2, 12)
    with torch.no_grad():
        full, _ = model(idx)
        kv_cache = model.new_kv_cache()
        model(idx[:, :5], kv_cache=kv_cache)
        chunk, _ = model(idx[:, 5:9], kv_cache=kv_cache, pad_mask=torch.ones(2, 4, dtype=torch.bool))
        last, _ = model(idx[:, 9:], kv_cache=kv_cache)
    assert torch.allclose(chunk, full[:, 5:9], atol=1e-5)
    assert torch.allclose(last, full[:, 9:], atol=1e-5)


def test_generate_full_pad_mask_changes_nothing():
    model = make_model(pos="rope")
    prompt = random_tokens(2, 6)
    plain = model.generate(prompt, 10, temperature=0.0)
    masked = model.generate(prompt, 10, temperature=0.0, pad_mask=torch.ones(2, 6, dtype=torch.bool))
    assert torch.equal(plain, masked)
