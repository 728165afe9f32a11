"""Crash safety: SIGKILL at random moments, checkpoint writes included, never leaves a checkpoint that
resume picks up half-written, and the resumed run finishes."""
import random
import signal
import subprocess
import sys
import time

import torch

import tokenizer as tok
from conftest import ROOT
from model import find_checkpoint, load_checkpoint

KEEP_LAST = 2
MAX_STEPS = 60
# A wide model makes each checkpoint take a good share of every step, so kills often land mid-write.
ARGS = ["--context-len", "32", "--n-layer", "2", "--n-head", "4", "--n-embd", "192", "--batch-size", "2",
        "--sample-tokens", "0", "--eval-tokens", "64", "--eval-interval", "0", "--log-interval", "5",
        "--device", "cpu", "--dtype", "float32", "--max-steps", str(MAX_STEPS), "--ckpt-interval", "1", "--keep-last", str(KEEP_LAST)]


def start(args, cwd):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(run_dir, process, after_step, timeout=60):
    """Wait until the run has saved a checkpoint newer than after_step (so it is training, not starting)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name.removeprefix("step-")) for p in run_dir.glob("step-*")]
        if steps and max(steps) > after_step:
            return
        if process.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError(f"no new checkpoint appeared; stderr: {process.stderr.read() if process.poll() is not None else ''}")


def check_visible_checkpoints(run_dir):
    """Every step-* folder is complete and loadable; there are at most keep_last + 1 of them (the newest
    is renamed into place before the oldest is pruned). Returns the newest step."""
    steps = sorted(int(p.name.removeprefix("step-")) for p in run_dir.glob("step-*"))
    assert 1 <= len(steps) <= KEEP_LAST + 1, steps
    for step in steps:
        folder = run_dir / f"step-{step:06d}"
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.pt", "tokenizer.json", "train_state.pt"]
        torch.load(folder / "train_state.pt", weights_only=True)
    newest = find_checkpoint(run_dir)
    assert newest.name == f"step-{steps[-1]:06d}"
    load_checkpoint(newest)
    return steps[-1]


def test_sigkill_then_resume(tmp_path, data_dir):
    text_file = tmp_path / "text.txt"
    text_file.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:30000])
    tok.encode_corpus(tok.build_char_tokenizer([text_file]), [str(text_file)], tmp_path / "tokens")
    run_dir = tmp_path / "out" / "crash"
    rng = random.Random(0)

    process = start(["--data", str(tmp_path / "tokens"), "--run-name", "crash", *ARGS], tmp_path)
    last_step = kills = 0
    while kills < 6 and last_step < MAX_STEPS:   # a fast machine may reach the end in fewer kills
        wait_for_checkpoint(run_dir, process, last_step)
        time.sleep(rng.uniform(0.05, 0.6))
        process.send_signal(signal.SIGKILL)
        process.wait()
        step = check_visible_checkpoints(run_dir)
        assert step > last_step
        last_step, kills = step, kills + 1
        process = start(["--resume", str(run_dir)], tmp_path)

    assert kills >= 3
    assert process.wait(timeout=300) == 0, process.stderr.read()
    assert check_visible_checkpoints(run_dir) == MAX_STEPS
    assert len(list(run_dir.glob("step-*"))) == KEEP_LAST
    assert not list(run_dir.glob(".*-step-*"))
