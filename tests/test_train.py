"""Training runtime: token-normalized accumulation, clipping with a GradScaler, precision, resume, DDP, CLI."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from model import GPT, GPTConfig, IGNORE_INDEX
from conftest import ROOT, assert_clean_error

TINY = ["--context-len", "32", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "4",
        "--sample-tokens", "0", "--eval-tokens", "256", "--log-interval", "5", "--warmup-steps", "2", "--device", "cpu",
        "--dtype", "float32"]


def run_script(script, args, cwd, env=None, nproc=None):
    command = [sys.executable, str(ROOT / script), *args]
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(29500 + os.getpid() % 1000), str(ROOT / script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=full_env, timeout=600)


def tiny_model(**overrides):
    torch.manual_seed(0)
    config = GPTConfig(**{**dict(vocab_size=32, context_len=12, n_layer=2, n_head=2, n_embd=16), **overrides})
    return GPT(config)


def masked_batch(counts, seq_len=12, vocab=32):
    """Sequences whose last `count` targets are scored and the rest are IGNORE_INDEX."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, vocab, (len(counts), seq_len), generator=generator)
    targets = torch.randint(0, vocab, (len(counts), seq_len), generator=generator)
    for row, count in enumerate(counts):
        targets[row, : seq_len - count] = IGNORE_INDEX
    return inputs, targets


def sgd_update(model, batches, grad_clip=0.0, scaler=None, loss_fn=train.lm_loss_sum):
    """Run one train_step with SGD at lr 1, so the change of every parameter is minus its gradient."""
    runtime = train.Runtime()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    result = train.train_step(model, batches, [optimizer], runtime, grad_clip=grad_clip, scaler=scaler, loss_fn=loss_fn)
    grads = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    return result, grads


# ---------------------------------------------------------------------------------------------------
# Gradient accumulation (case C11)

COUNTS = [12, 3, 7, 1, 12, 5, 9, 2]


@pytest.mark.parametrize("micro_batch", [2, 1])
def test_accumulation_matches_full_batch(micro_batch):
    inputs, targets = masked_batch(COUNTS)
    full_result, full_grads = sgd_update(tiny_model(), [(inputs, targets)])
    batches = [(inputs[i: i + micro_batch], targets[i: i + micro_batch]) for i in range(0, 8, micro_batch)]
    split_result, split_grads = sgd_update(tiny_model(), batches)
    assert split_result.n_targets == sum(COUNTS)
    assert split_result.loss == pytest.approx(full_result.loss, abs=1e-6)
    for name, grad in full_grads.items():
        assert torch.allclose(split_grads[name], grad, atol=1e-6), name


def test_accumulated_loss_is_token_weighted_mean():
    inputs, targets = masked_batch(COUNTS)
    model = tiny_model()
    with torch.no_grad():
        _, expected = model(inputs, targets)   # mean over every scored target
    result, _ = sgd_update(model, [(inputs[i: i + 1], targets[i: i + 1]) for i in range(8)])
    assert result.loss == pytest.approx(expected.item(), abs=1e-6)


def test_micro_batch_without_targets_gives_finite_gradients():
    inputs, targets = masked_batch([12, 0])
    result, grads = sgd_update(tiny_model(), [(inputs[:1], targets[:1]), (inputs[1:], targets[1:])])
    assert result.n_targets == 12
    assert not result.skipped
    assert all(torch.isfinite(g).all() for g in grads.values())


# ---------------------------------------------------------------------------------------------------
# Clipping after unscaling (case C12)


def test_grad_scaler_clips_unscaled_gradients():
    inputs, targets = masked_batch(COUNTS)

    def large_loss(model, batch):   # a gradient norm above max_norm, so clipping changes the step
        return 5 * train.lm_loss_sum(model, batch)

    plain_result, plain_grads = sgd_update(tiny_model(), [(inputs, targets)], 1.0, loss_fn=large_loss)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled_result, scaled_grads = sgd_update(tiny_model(), [(inputs, targets)], 1.0, scaler, large_loss)
    assert plain_result.grad_norm > 1.0, "the test needs a gradient that clipping changes"
    assert scaled_result.grad_norm == pytest.approx(plain_result.grad_norm, rel=1e-5)
    for name, grad in plain_grads.items():
        assert torch.allclose(scaled_grads[name], grad, atol=1e-6), name


@pytest.mark.parametrize("use_scaler", [True, False])
def test_infinite_gradient_skips_step(use_scaler):
    model = tiny_model()
    inputs, targets = masked_batch(COUNTS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if use_scaler else None

    def poisoned_loss(model, batch):
        return train.lm_loss_sum(model, batch) * float("inf")

    result = train.train_step(model, [(inputs, targets)], [optimizer], train.Runtime(), 1.0, scaler, loss_fn=poisoned_loss)
    assert result.skipped
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    if use_scaler:
        assert scaler.get_scale() == 512.0


# ---------------------------------------------------------------------------------------------------
# Optimizer and schedule


def test_tied_weight_in_one_optimizer_group():
    model = tiny_model(tie_embeddings=True)
    optimizers = train.build_optimizers(model, train.TrainConfig(), "cpu")
    groups = [g for o in optimizers for g in o.param_groups]
    holders = [g for g in groups if any(p is model.wte.weight for p in g["params"])]
    assert len(holders) == 1
    assert holders[0]["weight_decay"] > 0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_weight_decay_only_on_matrices():
    model = tiny_model(bias=True, norm="layernorm")
    optimizer, = train.build_optimizers(model, train.TrainConfig(optimizer="adamw", weight_decay=0.1), "cpu")
    decayed, plain = optimizer.param_groups
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert all(p.dim() < 2 for p in plain["params"])
    assert plain["weight_decay"] == 0.0


def test_muon_takes_block_matrices():
    model = tiny_model()
    adamw, muon = train.build_optimizers(model, train.TrainConfig(optimizer="muon"), "cpu")
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in muon_params) == (param.dim() == 2 and name.startswith("blocks.")), name


@pytest.mark.parametrize("schedule", ["cosine", "constant", "wsd"])
def test_lr_schedule_shapes(schedule):
    cfg = train.TrainConfig(schedule=schedule, max_steps=100, warmup_steps=10, min_lr_ratio=0.1, decay_frac=0.2)
    values = [train.lr_multiplier(s, cfg) for s in range(100)]
    assert values[0] == pytest.approx(0.1)
    assert values[9] == pytest.approx(1.0)
    if schedule == "constant":
        assert values[99] == 1.0
    else:
        assert values[99] == pytest.approx(0.1)
    if schedule == "wsd":
        assert values[79] == 1.0
        assert values[81] < 1.0


# ---------------------------------------------------------------------------------------------------
# End to end through the command line


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory, data_dir):
    """Char-level token files of the first 60,000 characters of Tiny Shakespeare."""
    import tokenizer as tok
    folder = tmp_path_factory.mktemp("tokens")
    text_file = folder / "shakespeare.txt"
    text_file.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:60000])
    tokenizer = tok.train_tokenizer("char", [text_file.read_text()])
    tok.encode_corpus(tokenizer, [str(text_file)], folder / "char")
    return folder / "char"


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(tmp_path, token_dir):
    """20 steps straight equal 10 steps, a stop, and 10 more in a new process (dropout on, so RNG state counts)."""
    args = ["--data", str(token_dir), *TINY, "--max-steps", "20", "--log-interval", "1", "--dropout", "0.1",
            "--ckpt-interval", "10", "--run-name", "straight"]
    straight = run_script("train.py", args, tmp_path)
    assert straight.returncode == 0, straight.stderr

    # Stop the run at step 10: keep its step-10 checkpoint and the log up to there.
    split = tmp_path / "out" / "split"
    split.mkdir()
    shutil.copytree(tmp_path / "out" / "straight" / "step-000010", split / "step-000010")
    shutil.copy(tmp_path / "out" / "straight" / "run.json", split / "run.json")
    resumed = run_script("train.py", ["--resume", str(split)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 10" in resumed.stdout

    losses = {r["step"]: r["loss"] for r in read_log(tmp_path / "out" / "straight") if "loss" in r and r["step"] > 10}
    resumed_losses = {r["step"]: r["loss"] for r in read_log(split) if "loss" in r}
    assert resumed_losses == losses
    a = torch.load(tmp_path / "out" / "straight" / "step-000020" / "model.pt", weights_only=True)
    b = torch.load(split / "step-000020" / "model.pt", weights_only=True)
    for name in a:
        assert torch.equal(a[name], b[name]), name


DDP_CHECK = """
import sys, torch
sys.path.insert(0, {root!r})
import train
from model import GPT, GPTConfig
runtime = train.setup_runtime("cpu", "float32", seed=0)
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=72, context_len=32, n_layer=2, n_head=2, n_embd=32))
data = train.TokenData({data!r}, 32, runtime.device)
accum = {accum}
batches = [data.train_batch(7, 3, runtime.rank * accum + i, 2) for i in range(accum)]
if runtime.distributed:
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
else:
    wrapped = model
before = {{n: p.detach().clone() for n, p in model.named_parameters()}}
result = train.train_step(wrapped, batches, [torch.optim.SGD(model.parameters(), lr=1.0)], runtime, grad_clip=0.0)
if runtime.is_main:
    grads = {{n: before[n] - p.detach() for n, p in model.named_parameters()}}
    torch.save({{"loss": result.loss, "n": result.n_targets, "grads": grads}}, {out!r})
train.shutdown_runtime(runtime)
"""


def test_ddp_matches_single_process_accumulation(tmp_path, token_dir):
    outputs = {}
    for nproc, accum in ((2, 2), (1, 4)):
        out = tmp_path / f"result-{nproc}.pt"
        script = tmp_path / f"check_{nproc}.py"
        script.write_text(DDP_CHECK.format(root=str(ROOT), data=str(token_dir), accum=accum, out=str(out)))
        if nproc == 1:
            result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        else:
            result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                     "--master_port", str(29500 + os.getpid() % 1000), str(script)],
                                    capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[nproc] = torch.load(out, weights_only=True)
    assert outputs[1]["n"] == outputs[2]["n"] == 4 * 2 * 32
    assert outputs[2]["loss"] == pytest.approx(outputs[1]["loss"], abs=1e-6)
    for name, grad in outputs[1]["grads"].items():
        assert torch.allclose(outputs[2]["grads"][name], grad, atol=1e-6), name


def test_torchrun_training_runs(tmp_path, token_dir):
    result = run_script("train.py", ["--data", str(token_dir), *TINY, "--max-steps", "4", "--total-batch-tokens", "512"],
                        tmp_path, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes x 2 micro-steps" in result.stdout
    assert (tmp_path / "out" / "char" / "step-000004" / "model.pt").is_file()


# ---------------------------------------------------------------------------------------------------
# Precision on CPU (case C13)


def test_bfloat16_first_loss_close_to_float32(tmp_path, token_dir):
    first_losses = {}
    for dtype in ("float32", "bfloat16"):
        result = run_script("train.py", ["--data", str(token_dir), *TINY, "--max-steps", "2", "--log-interval", "1",
                                         "--dtype", dtype, "--run-name", dtype], tmp_path)
        assert result.returncode == 0, result.stderr
        first_losses[dtype] = read_log(tmp_path / "out" / dtype)[0]["loss"]
        sampled = run_script("sample.py", ["--ckpt", str(tmp_path / "out" / dtype), "--dtype", dtype,
                                           "--max-new-tokens", "20", "--device", "cpu"], tmp_path)
        assert sampled.returncode == 0, sampled.stderr
    assert first_losses["bfloat16"] == pytest.approx(first_losses["float32"], rel=0.02)


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_float16_on_cpu_rejected_at_start(tmp_path, token_dir, script):
    args = ["--data", str(token_dir), *TINY, "--dtype", "float16"] if script == "train.py" else \
        ["--ckpt", str(tmp_path), "--dtype", "float16", "--device", "cpu"]
    result = run_script(script, args, tmp_path)
    assert_clean_error(result, "--dtype float16 needs a CUDA GPU")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_bad_training_inputs(tmp_path, token_dir):
    cases = [
        (["--data", str(tmp_path / "missing")], "missing"),
        (["--input", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--data", str(token_dir), *TINY, "--total-batch-tokens", "100"], "--total-batch-tokens"),
        (["--data", str(token_dir), *TINY, "--pos", "spiral"], "spiral"),
        (["--data", str(token_dir), *TINY, "--context-len", "100000"], "context"),
        (["--data", str(token_dir), *TINY, "--batch-size", "0"], "--batch-size"),
        (["--data", str(token_dir), *TINY, "--n-embd", "30", "--n-head", "4"], "n_embd=30"),
    ]
    for args, needle in cases:
        result = run_script("train.py", args, tmp_path)
        assert_clean_error(result, needle)
    assert not (tmp_path / "out").exists()


def test_consecutive_non_finite_steps_stop_run(tmp_path, token_dir):
    # A learning rate of 1e30 makes the first update blow up the weights, so every later gradient is NaN.
    result = run_script("train.py", ["--data", str(token_dir), *TINY, "--max-steps", "20", "--lr", "1e30",
                                     "--warmup-steps", "0", "--max-bad-steps", "3", "--log-interval", "1"], tmp_path)
    assert_clean_error(result, "3 consecutive steps")
    records = read_log(tmp_path / "out" / "char")
    assert [r["skipped"] for r in records] == [False, True, True]
    assert not list((tmp_path / "out" / "char").glob("step-*"))


def test_resume_rejects_other_model_config(tmp_path, token_dir):
    first = run_script("train.py", ["--data", str(token_dir), *TINY, "--max-steps", "2"], tmp_path)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "out" / "char"
    before = sorted(p.name for p in run_dir.iterdir())
    result = run_script("train.py", ["--resume", str(run_dir), "--n-layer", "3"], tmp_path)
    assert_clean_error(result, "n_layer")
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_existing_run_not_overwritten(tmp_path, token_dir):
    first = run_script("train.py", ["--data", str(token_dir), *TINY, "--max-steps", "2"], tmp_path)
    assert first.returncode == 0, first.stderr
    log_before = (tmp_path / "out" / "char" / "log.jsonl").read_bytes()
    again = run_script("train.py", ["--data", str(token_dir), *TINY, "--max-steps", "2"], tmp_path)
    assert_clean_error(again, "--resume")
    assert (tmp_path / "out" / "char" / "log.jsonl").read_bytes() == log_before


def test_main_command_on_shakespeare(tmp_path, data_dir):
    """The README's main command, shortened to a few steps, then sampling from its checkpoint."""
    (tmp_path / "data" / "tinyshakespeare").mkdir(parents=True)
    (tmp_path / "data" / "tinyshakespeare" / "input.txt").write_bytes((data_dir / "tinyshakespeare" / "input.txt").read_bytes())
    result = run_script("train.py", ["--max-steps", "3", "--eval-tokens", "2048", "--sample-tokens", "20"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "val bits/byte" in result.stdout
    assert "--- sample ---" in result.stdout
    sampled = run_script("sample.py", ["--max-new-tokens", "30", "--prompt", "ROMEO:"], tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("ROMEO:")
