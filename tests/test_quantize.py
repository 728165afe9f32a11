"""Quantization: NF4 levels and error, int4 packing, int8 and zero-point grids, GPTQ, quantized models and checkpoints, CLI."""
import json
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import quantize
import sample
import tokenizer as tok
import train
from conftest import ROOT, assert_clean_error
from model import GPT, GPTConfig, clean_state_dict, write_checkpoint_files

CASE_NF4_LEVELS = [-1, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0,
                   0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1]


def round_trip(x, method, block_size=64, double_quant=False):
    state = quantize.quantize_tensor(x, method, block_size, double_quant)
    return quantize.dequantize_tensor(state, x.shape, method, block_size)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# NF4 (case C18)


def test_nf4_levels_exact():
    assert torch.equal(quantize.NF4_LEVELS, torch.tensor(CASE_NF4_LEVELS, dtype=torch.float32))


def test_nf4_levels_are_normal_quantiles():
    """QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1) between 0.5 and 0.9677083, plus 0,
    divided by the largest."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat((positive, torch.zeros(1, dtype=torch.float64), negative)).sort().values
    levels = levels / levels.max()
    assert torch.allclose(quantize.NF4_LEVELS.double(), levels, atol=1e-7)


@pytest.mark.parametrize("absmax", [1.0, 0.37, 2.5e-3, 41.0])
def test_nf4_levels_round_trip_exactly(absmax):
    x = quantize.NF4_LEVELS * absmax                              # one block of 16 holding every level
    assert torch.equal(round_trip(x, "nf4", block_size=16), x)
    shuffled = x.repeat(4)[torch.randperm(64, generator=torch.Generator().manual_seed(1))]
    assert torch.equal(round_trip(shuffled, "nf4", block_size=64), shuffled)


def test_nf4_error_on_standard_normal():
    x = randn(1024, 1024)
    error = (round_trip(x, "nf4", 64) - x).abs().mean().item()
    assert error == pytest.approx(0.0728, abs=0.0005)


def test_nf4_error_rises_smoothly_with_block_size():
    x = randn(1024, 1024, seed=1)
    errors = [(round_trip(x, "nf4", block) - x).abs().mean().item() for block in (64, 128, 256, 512, 1024, 2048, 4096)]
    for smaller, larger in zip(errors, errors[1:]):
        assert smaller < larger, errors
        assert larger / smaller < 1.1, errors      # no jump: each doubling adds a few percent


def test_nf4_ragged_length_and_zero_block():
    x = randn(1000)                  # 15 full blocks of 64 and one of 40
    x[64:128] = 0.0                  # the second block is all zeros
    y = round_trip(x, "nf4", 64)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert torch.equal(y[64:128], torch.zeros(64))
    assert (y - x).abs().max() <= x.abs().max() * 0.2


def test_double_quant_scale_error_within_half_step():
    x = randn(300, 256, seed=2)                     # 1,200 blocks: the last scale block is partial
    state = quantize.quantize_tensor(x, "nf4", 64, double_quant=True)
    exact = quantize.quantize_tensor(x, "nf4", 64)["scale"]
    scales = quantize.dequantize_scales(state, exact.numel())
    step = state["scale_scale"].repeat_interleave(256)[: exact.numel()]
    assert state["scale_code"].dtype == torch.int8
    assert ((scales - exact).abs() <= step / 2 + 1e-7).all()
    nf4_error = (round_trip(x, "nf4", 64) - x).abs().mean()
    double_error = (round_trip(x, "nf4", 64, double_quant=True) - x).abs().mean()
    assert double_error == pytest.approx(nf4_error.item(), rel=0.01)


# ---------------------------------------------------------------------------------------------------
# int4 packing (case C19)


@pytest.mark.parametrize("length", [16, 15, 1, 1001])
def test_pack_round_trip_every_value(length):
    codes = torch.arange(-8, 8).repeat(length // 16 + 1)[:length]
    codes = codes[torch.randperm(length, generator=torch.Generator().manual_seed(length))]
    packed = quantize.pack_int4(codes)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (length + 1) // 2
    assert torch.equal(quantize.unpack_int4(packed, length), codes.to(torch.int8))


def test_nibble_order():
    """Element 2i goes in the low nibble, element 2i+1 in the high one, in two's complement."""
    assert quantize.pack_int4(torch.tensor([1, 2])).tolist() == [0x21]
    assert quantize.pack_int4(torch.tensor([-1, 3, -8, 7])).tolist() == [0x3F, 0x78]
    assert quantize.pack_int4(torch.tensor([5])).tolist() == [0x05]


def reference_dequantize(layer, group_size):
    """Dequantize a 4-bit QuantizedLinear with plain Python loops over the packed bytes."""
    def nibbles(packed):
        values = []
        for byte in packed.tolist():
            for nibble in (byte & 0xF, byte >> 4):
                values.append(nibble - 16 if nibble >= 8 else nibble)
        return values
    codes = nibbles(layer.qweight)
    zeros = nibbles(layer.zero) if layer.method == "int4" else None
    weight = []
    for i in range(layer.out_features * layer.in_features):
        block = i // group_size
        zero = zeros[block] if zeros is not None else 0
        weight.append((codes[i] - zero) * layer.scale[block].item())
    return torch.tensor(weight).view(layer.out_features, layer.in_features)


@pytest.mark.parametrize("method", ["int4", "int4-sym"])
def test_int4_linear_matches_dequantized_reference(method):
    torch.manual_seed(0)
    linear = nn.Linear(40, 12, bias=True)
    layer = quantize.QuantizedLinear.from_float(linear, method, block_size=16)
    x = randn(3, 5, 40)
    expected = F.linear(x, reference_dequantize(layer, 16), linear.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert (layer.dequantize_weight() - linear.weight).abs().max() < 0.2 * linear.weight.abs().max()


# ---------------------------------------------------------------------------------------------------
# int8 and zero-points


def test_int8_error_within_half_scale():
    w = randn(8, 50) * torch.logspace(-3, 1, 8)[:, None]      # rows of very different magnitude
    state = quantize.quantize_tensor(w, "int8")
    scale = state["scale"][:, None]                            # one scale per output channel
    assert state["qweight"].dtype == torch.int8
    assert torch.allclose(scale[:, 0], w.abs().amax(1) / 127)
    error = (quantize.dequantize_tensor(state, w.shape, "int8") - w).abs()
    assert (error <= scale / 2 * (1 + 1e-6)).all()


def test_int8_grid_values_round_trip_exactly():
    steps = torch.tensor([2.0 ** -10, 2.0 ** -3, 1.0, 8.0])[:, None]
    codes = torch.randint(-127, 128, (4, 30), generator=torch.Generator().manual_seed(3))
    codes[:, 0] = 127                                          # the absmax sits on the grid's end
    w = codes * steps
    assert torch.equal(round_trip(w, "int8"), w)


def test_zero_point_maps_zero_exactly():
    w = torch.tensor([[0.0, 0.31, -0.07, 0.0, 1.3, -0.4, 0.0, 0.9],      # both signs
                      [0.0, 0.2, 0.5, 0.0, 0.75, 0.3, 0.1, 0.0],          # all >= 0
                      [-2.0, 0.0, -0.3, -1.1, 0.0, -0.6, -0.2, 0.0]])     # all <= 0
    state = quantize.quantize_tensor(w, "int4", 8)
    assert state["zero"].dtype == torch.uint8
    y = quantize.dequantize_tensor(state, w.shape, "int4", 8)
    assert torch.equal(y[w == 0], torch.zeros(int((w == 0).sum())))
    assert (y - w).abs().max() <= (w.amax(1).clamp(min=0) - w.amin(1).clamp(max=0)).max() / 15 / 2 + 1e-6


@pytest.mark.parametrize("method", list(quantize.METHODS))
@pytest.mark.parametrize("value", [0.0, 3.0, -0.25])
def test_constant_groups_are_finite(method, value):
    w = torch.full((4, 32), value)
    for double_quant in (False, True):
        y = round_trip(w, method, 16, double_quant)
        assert torch.isfinite(y).all()
        assert torch.allclose(y, w, atol=1e-6), (method, value, double_quant)


def test_bad_method_and_block_size_raise():
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize.quantize_tensor(torch.ones(4, 4), "int3")
    with pytest.raises(ValueError, match="positive"):
        quantize.quantize_tensor(torch.ones(4, 4), "nf4", 0)


# ---------------------------------------------------------------------------------------------------
# GPTQ


@pytest.mark.parametrize("method", list(quantize.METHODS))
def test_gptq_identity_hessian_equals_rounding(method):
    w = randn(24, 64, seed=4)
    rtn = quantize.quantize_tensor(w, method, 16)
    gptq = quantize.quantize_tensor(w, method, 16, hessian=torch.eye(64))
    assert rtn.keys() == gptq.keys()
    for name in rtn:
        assert torch.equal(rtn[name], gptq[name]), name


@pytest.mark.parametrize("method", list(quantize.METHODS))
def test_gptq_output_error_at_most_rounding(method):
    """On correlated inputs X = Z A, GPTQ's output error ||X (W_q - W)^T|| is no larger than rounding's."""
    z, a = randn(2048, 64, seed=5), randn(64, 64, seed=6)
    x = z @ (torch.eye(64) + 0.8 * a)                  # strongly correlated features
    w = randn(32, 64, seed=7)
    rtn = quantize.dequantize_tensor(quantize.quantize_tensor(w, method, 16), w.shape, method, 16)
    gptq_state = quantize.quantize_tensor(w, method, 16, hessian=x.T @ x)
    gptq = quantize.dequantize_tensor(gptq_state, w.shape, method, 16)
    rtn_error = (x @ (rtn - w).T).norm()
    gptq_error = (x @ (gptq - w).T).norm()
    assert gptq_error <= rtn_error, (gptq_error, rtn_error)


def test_gptq_needs_group_dividing_width():
    with pytest.raises(ValueError, match="divide"):
        quantize.quantize_tensor(randn(4, 40), "int4", 16, hessian=torch.eye(40))


# ---------------------------------------------------------------------------------------------------
# Quantized models


def tiny_model(**overrides):
    torch.manual_seed(0)
    config = dict(vocab_size=48, context_len=32, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**config, **overrides})).eval()


# Largest logit change allowed, relative to the largest float32 logit, on the random tiny MoE model below with
# groups of 16. The bounds are about three times the measured change (int8 0.11%, int4 1.8%, int4-sym 2.1%,
# nf4 2.5%), so a wrong scale, zero-point or code fails them.
LOGIT_TOLERANCE = {"int8": 0.004, "int4": 0.06, "int4-sym": 0.06, "nf4": 0.07}


@pytest.mark.parametrize("method", list(quantize.METHODS))
def test_quantized_logits_close_to_float(method):
    model = tiny_model(mlp="swiglu", n_expert=4, moe_top_k=2, bias=True)
    idx = torch.randint(0, 48, (2, 20), generator=torch.Generator().manual_seed(0))
    float_logits, _ = model(idx)
    names = quantize.quantize_model(model, method, 16)
    logits, _ = model(idx)
    assert len(names) == 2 * (2 + 1 + 4 * 2)         # qkv, proj; router; fc and proj of 4 experts
    change = (logits - float_logits).abs().max() / float_logits.abs().max()
    assert 0 < change < LOGIT_TOLERANCE[method], change


def test_default_layers_leave_embeddings_and_head():
    model = tiny_model()
    names = quantize.quantize_model(model, "nf4")
    assert names == [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    assert type(model.wte) is nn.Embedding
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.wte.weight
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, nn.Linear) for m in model.blocks.modules())


def test_quantized_tied_head_keeps_float_embedding():
    model = tiny_model()
    embedding = model.wte.weight.detach().clone()
    idx = torch.tensor([[1, 5, 9, 2]])
    float_logits, _ = model(idx)
    quantize.quantize_model(model, "int8", layers=["lm_head"])
    assert isinstance(model.lm_head, quantize.QuantizedLinear)
    assert torch.equal(model.wte.weight, embedding)
    logits, _ = model(idx)
    assert torch.allclose(logits, float_logits, atol=0.01 * float_logits.abs().max().item())


def test_quantized_embedding_looks_up_dequantized_rows():
    model = tiny_model(pos="learned")
    quantize.quantize_model(model, "int8", layers=["wte", "wpe"])
    assert isinstance(model.wte, quantize.QuantizedEmbedding)
    idx = torch.tensor([[3, 0, 47]])
    assert torch.equal(model.wte(idx), model.wte.dequantize_weight()[idx])
    assert type(model.lm_head) is nn.Linear          # the head kept the float tied weight


def test_layer_pattern_matching_nothing_raises():
    with pytest.raises(ValueError, match="blocks.9"):
        quantize.quantize_model(tiny_model(), "nf4", layers=["blocks.9.*"])


def test_quantized_layer_passes_gradients_to_inputs():
    """QLoRA trains adapters around a frozen quantized layer: the input gets a gradient, the layer has no parameters."""
    layer = quantize.QuantizedLinear.from_float(nn.Linear(64, 8), "nf4", double_quant=True)
    x = randn(4, 64).requires_grad_()
    layer(x).sum().backward()
    assert list(layer.parameters()) == []
    assert torch.allclose(x.grad, layer.dequantize_weight().sum(0).expand(4, -1), atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Checkpoints and the command line


def run_quantize(args, cwd):
    command = [sys.executable, str(ROOT / "quantize.py"), *args]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, data_dir):
    """A checkpoint as train.py writes it, of a 2-layer char model trained for 150 steps on the first 200,000
    characters of Tiny Shakespeare, so that its greedy choices have clear margins."""
    folder = tmp_path_factory.mktemp("quantize")
    text_file = folder / "shakespeare.txt"
    text_file.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:200000])
    tokenizer = tok.train_tokenizer("char", [text_file.read_text()])
    tok.encode_corpus(tokenizer, [str(text_file)], folder / "tokens")
    data = train.TokenData(folder / "tokens", 64, torch.device("cpu"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_len=64, n_layer=2, n_head=2, n_embd=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # a model this small gains nothing from more threads, which stall on a busy CPU
    try:
        for step in range(150):
            train.train_step(model, [data.train_batch(0, step, 0, 16)], [optimizer], train.Runtime())
    finally:
        torch.set_num_threads(threads)
    checkpoint = folder / "tiny"
    checkpoint.mkdir()
    config = {"model": asdict(model.config), "stage": "train", "data": str(folder / "tokens"),
              "tokenizer": {"kind": tokenizer.kind, "hash": tokenizer.hash, "file": "tokenizer.json"}}
    write_checkpoint_files(checkpoint, clean_state_dict(model), config)
    shutil.copyfile(folder / "tokens" / "tokenizer.json", checkpoint / "tokenizer.json")
    return checkpoint


def test_cli_writes_loadable_int8_checkpoint(trained_checkpoint, tmp_path):
    out = tmp_path / "tiny-int8"
    result = run_quantize(["--ckpt", str(trained_checkpoint), "--method", "int8", "--out", str(out), "--eval",
                           "--eval-tokens", "4096"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "val bits/byte" in result.stdout
    assert {"float32", "bfloat16", "int8"} <= {line.split()[0] for line in result.stdout.splitlines() if line}

    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["method"] == "int8"
    assert config["quantization"]["layers"][0] == "blocks.0.attn.qkv"
    assert (out / "tokenizer.json").is_file()
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["blocks.0.attn.qkv.qweight"].dtype == torch.int8

    float_model, tokenizer, _ = sample.load_model_and_tokenizer(trained_checkpoint)
    model, _, _ = sample.load_model_and_tokenizer(out)
    assert isinstance(model.blocks[0].mlp.fc, quantize.QuantizedLinear)
    float_text = sample.generate_text(float_model, tokenizer, ["ROMEO:"], 20, temperature=0.0, stop_at_eot=False)
    text = sample.generate_text(model, tokenizer, ["ROMEO:"], 20, temperature=0.0, stop_at_eot=False)
    assert text == float_text


def test_saved_nf4_checkpoint_matches_memory(trained_checkpoint, tmp_path):
    out = tmp_path / "tiny-nf4"
    result = run_quantize(["--ckpt", str(trained_checkpoint), "--double-quant", "--layers", "blocks.*,lm_head",
                           "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert (config["method"], config["block_size"], config["double_quant"]) == ("nf4", 64, True)
    assert "lm_head" in config["layers"]

    model, _ = quantize.load_any_checkpoint(trained_checkpoint)
    quantize.quantize_model(model, "nf4", 64, True, ["blocks.*", "lm_head"])
    loaded, _ = quantize.load_any_checkpoint(out)
    assert type(loaded.wte) is nn.Embedding
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_cli_bad_inputs(trained_checkpoint, tmp_path):
    quantized = tmp_path / "already-nf4"
    quantize.main(["--ckpt", str(trained_checkpoint), "--out", str(quantized)])
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("untouched")
    ckpt = ["--ckpt", str(trained_checkpoint)]
    cases = [
        (ckpt + ["--method", "int3"], "int3"),
        (ckpt + ["--method", "int4", "--group-size", "0"], "group"),
        (ckpt + ["--block-size", "-64"], "block"),
        (["--ckpt", str(tmp_path / "missing")], "missing"),
        (["--ckpt", str(quantized), "--out", str(tmp_path / "again")], "already quantized"),
        (ckpt + ["--out", str(existing)], "already exists"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    quantized_files = {p.name: p.read_bytes() for p in quantized.iterdir()}
    for args, needle in cases:
        if "--out" not in args:
            args = args + ["--out", str(tmp_path / "new")]
        assert_clean_error(run_quantize(args, tmp_path), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert (existing / "keep.txt").read_text() == "untouched"
    assert {p.name: p.read_bytes() for p in quantized.iterdir()} == quantized_files


@pytest.mark.parametrize("args, needle", [
    (["--layers", "blocks.7.*"], "blocks.7"),
    (["--group-size", "many"], "group-size"),
    (["--eval", "--data", "no-such-folder"], "no-such-folder"),
])
def test_cli_rejects_bad_values(trained_checkpoint, tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as exit_info:
        quantize.main(["--ckpt", str(trained_checkpoint), "--out", str(tmp_path / "new"), *args])
    assert exit_info.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:"), lines
    assert needle in lines[0], lines
    assert not (tmp_path / "new").exists()


def test_help_documents_every_flag():
    parser = quantize.build_parser()
    assert "--double-quant" in parser.format_help()
    for action in parser._actions:
        if action.dest != "help":
            assert "default" in action.help or "required" in action.help, action.option_strings
