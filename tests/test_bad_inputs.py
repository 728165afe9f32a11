"""Bad-input catalogue: each malformed input makes a command exit non-zero with one `error:` line, no
traceback, and no change to any file that existed before."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

import tokenizer as tok
from conftest import ROOT, assert_clean_error

TINY = ["--context-len", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--batch-size", "2",
        "--sample-tokens", "0", "--eval-tokens", "64", "--device", "cpu",
        "--dtype", "float32"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, data_dir):
    """A folder with valid inputs to damage: text, token files, a trained checkpoint and its run."""
    root = tmp_path_factory.mktemp("bad-inputs")
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()[:20000]
    (root / "text.txt").write_text(text)
    char = tok.build_char_tokenizer([root / "text.txt"])
    char.save(root / "char.json")
    tok.encode_corpus(char, [str(root / "text.txt")], root / "tokens")
    tok.encode_corpus(tok.ByteTokenizer(), [str(root / "text.txt")], root / "byte-tokens")

    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(root / "tokens"), *TINY,
                             "--max-steps", "2", "--run-name", "run"], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, str(ROOT / "quantize.py"), "--ckpt", "out/run", "--out", "nf4-ckpt"],
                            cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (root / "empty.txt").write_text("")
    (root / "empty-folder").mkdir()
    (root / "a-file").write_text("not a folder")
    (root / "existing.json").write_text("{}")
    (root / "truncated.json").write_text(json.dumps(char.to_dict())[:200])
    (root / "wrong-fields.json").write_text(json.dumps({"kind": "bpe", "pattern": "x"}))
    (root / "prompts-binary.txt").write_bytes(b"\xff\xfe\x00bad")

    hellaswag = {"ctx": "A man sits down.", "endings": ["He eats.", "He sleeps.", "He runs.", "He sings."], "label": 1}
    (root / "bad-line.jsonl").write_text(json.dumps(hellaswag) + "\n{broken\n")
    (root / "no-endings.jsonl").write_text(json.dumps({"ctx": "A man sits down.", "label": 0}) + "\n")
    (root / "label-text.jsonl").write_text(json.dumps({**hellaswag, "label": "second"}) + "\n")
    piqa = {"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Eat the lid."}
    (root / "piqa.jsonl").write_text(json.dumps(piqa) + "\n" + json.dumps(piqa) + "\n")
    (root / "piqa-labels.lst").write_text("0\n")
    (root / "gsm8k.jsonl").write_text(json.dumps({"question": "How many?", "answer": 12}) + "\n")
    return root


def damaged_copy(workspace, name, damage):
    """Copy the trained checkpoint to a new folder and apply damage(folder) to it."""
    folder = workspace / name
    if not folder.exists():
        shutil.copytree(workspace / "out" / "run" / "step-000002", folder)
        damage(folder)
    return folder


def truncate_model(folder):
    data = (folder / "model.pt").read_bytes()
    (folder / "model.pt").write_bytes(data[: len(data) // 3])


def break_config_json(folder):
    (folder / "config.json").write_text("{not json")


def change_n_layer(folder):
    config = json.loads((folder / "config.json").read_text())
    config["model"]["n_layer"] = 3
    (folder / "config.json").write_text(json.dumps(config))


def drop_tokenizer(folder):
    (folder / "tokenizer.json").unlink()


def swap_tokenizer(folder):
    tok.ByteTokenizer().save(folder / "tokenizer.json")


def truncate_quantized_model(folder):
    shutil.rmtree(folder)
    shutil.copytree(folder.parent / "nf4-ckpt", folder)
    truncate_model(folder)


def truncate_tokens(folder):
    shutil.copytree(folder.parent / "tokens", folder, dirs_exist_ok=True)
    data = (folder / "train.bin").read_bytes()
    (folder / "train.bin").write_bytes(data[:101])


def snapshot(root):
    """Hash of every file under root, so a test can tell that nothing changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# (name, script, arguments, text the error line must contain, damage to apply first or None)
CASES = [
    # tokenizer.py
    ("tokenizer missing input", "tokenizer.py", ["train", "--kind", "char", "--input", "missing.txt", "--out", "t.json"], "missing.txt", None),
    ("tokenizer empty file", "tokenizer.py", ["train", "--kind", "char", "--input", "empty.txt", "--out", "t.json"], "empty", None),
    ("tokenizer folder without text", "tokenizer.py", ["train", "--kind", "char", "--input", "empty-folder", "--out", "t.json"], "no non-empty", None),
    ("tokenizer binary input for char", "tokenizer.py", ["train", "--kind", "char", "--input", "binary.txt", "--out", "t.json"], "UTF-8", None),
    ("tokenizer vocabulary too small", "tokenizer.py", ["train", "--kind", "bpe", "--vocab-size", "100", "--input", "text.txt", "--out", "t.json"], "too small", None),
    ("tokenizer negative vocabulary", "tokenizer.py", ["train", "--kind", "bpe", "--vocab-size", "-5", "--input", "text.txt", "--out", "t.json"], "-5", None),
    ("tokenizer unknown kind", "tokenizer.py", ["train", "--kind", "sentencepiece", "--input", "text.txt", "--out", "t.json"], "sentencepiece", None),
    ("tokenizer output exists", "tokenizer.py", ["train", "--kind", "char", "--input", "text.txt", "--out", "existing.json"], "--force", None),
    ("tokenizer output parent is a file", "tokenizer.py", ["train", "--kind", "char", "--input", "text.txt", "--out", "a-file/t.json"], "a-file", None),
    ("tokenizer truncated file", "tokenizer.py", ["encode", "--tokenizer", "truncated.json", "--input", "text.txt", "--out", "new-tokens"], "truncated.json", None),
    ("tokenizer file with wrong fields", "tokenizer.py", ["encode", "--tokenizer", "wrong-fields.json", "--input", "text.txt", "--out", "new-tokens"], "wrong-fields.json", None),
    ("tokenizer absurd validation fraction", "tokenizer.py", ["encode", "--tokenizer", "char.json", "--input", "text.txt", "--out", "new-tokens", "--val-fraction", "1.5"], "1.5", None),
    ("tokenizer encode over existing tokens", "tokenizer.py", ["encode", "--tokenizer", "char.json", "--input", "text.txt", "--out", "tokens"], "--force", None),
    # train.py
    ("train missing data folder", "train.py", ["--data", "missing-tokens", *TINY], "missing-tokens", None),
    ("train missing input", "train.py", ["--input", "missing.txt", *TINY], "missing.txt", None),
    ("train binary input for char", "train.py", ["--input", "binary.txt", *TINY], "UTF-8", None),
    ("train truncated token file", "train.py", ["--data", "short-tokens", *TINY], "train.bin", truncate_tokens),
    ("train zero batch size", "train.py", ["--data", "tokens", *TINY, "--batch-size", "0"], "--batch-size", None),
    ("train negative steps", "train.py", ["--data", "tokens", *TINY, "--max-steps", "-3"], "--max-steps", None),
    ("train absurd context", "train.py", ["--data", "tokens", *TINY, "--context-len", "100000000"], "context", None),
    ("train indivisible total batch", "train.py", ["--data", "tokens", *TINY, "--total-batch-tokens", "50"], "--total-batch-tokens", None),
    ("train non-integer flag", "train.py", ["--data", "tokens", *TINY, "--n-layer", "two"], "two", None),
    ("train unknown position scheme", "train.py", ["--data", "tokens", *TINY, "--pos", "spiral"], "spiral", None),
    ("train heads do not divide width", "train.py", ["--data", "tokens", *TINY, "--n-embd", "18", "--n-head", "4"], "n_embd=18", None),
    ("train float16 on CPU", "train.py", ["--data", "tokens", *TINY, "--dtype", "float16"], "float16", None),
    ("train output parent is a file", "train.py", ["--data", "tokens", *TINY, "--out-dir", "a-file/out"], "a-file", None),
    ("train existing run", "train.py", ["--data", "tokens", *TINY, "--run-name", "run"], "--resume", None),
    ("train resume missing run", "train.py", ["--resume", "out/missing"], "missing", None),
    ("train resume with other config", "train.py", ["--resume", "out/run", "--n-layer", "3"], "n_layer", None),
    ("train resume on other tokenizer's data", "train.py", ["--resume", "out/run", "--data", "byte-tokens"], "tokenizer", None),
    ("train resume at its last step", "train.py", ["--resume", "out/run"], "--max-steps", None),
    ("train beta1 above one", "train.py", ["--data", "tokens", *TINY, "--beta1", "1.5"], "--beta1", None),
    ("train NaN learning rate", "train.py", ["--data", "tokens", *TINY, "--lr", "nan"], "--lr nan", None),
    ("train negative MLP size", "train.py", ["--data", "tokens", *TINY, "--mlp-hidden", "-5"], "mlp_hidden=-5", None),
    ("train zero RoPE base", "train.py", ["--data", "tokens", *TINY, "--rope-base", "0"], "rope_base=0", None),
    ("train text file as data folder", "train.py", ["--data", "text.txt", *TINY], "--input", None),
    ("train window pattern without window", "train.py", ["--data", "tokens", *TINY, "--window-pattern", "LG"], "window", None),
    ("train bad model flag before tokenizing", "train.py", ["--input", "text.txt", *TINY, "--n-embd", "30", "--n-head", "4"], "n_embd=30", None),
    # sample.py
    ("sample missing checkpoint", "sample.py", ["--ckpt", "out/missing"], "missing", None),
    ("sample truncated model.pt", "sample.py", ["--ckpt", "truncated-ckpt"], "model.pt", truncate_model),
    ("sample config.json not JSON", "sample.py", ["--ckpt", "bad-config-ckpt"], "config.json", break_config_json),
    ("sample config does not match weights", "sample.py", ["--ckpt", "other-config-ckpt"], "does not match", change_n_layer),
    ("sample checkpoint without tokenizer", "sample.py", ["--ckpt", "no-tokenizer-ckpt"], "tokenizer.json", drop_tokenizer),
    ("sample negative temperature", "sample.py", ["--ckpt", "out/run", "--temperature", "-1"], "temperature", None),
    ("sample zero top-p", "sample.py", ["--ckpt", "out/run", "--top-p", "0"], "top-p", None),
    ("sample binary prompt file", "sample.py", ["--ckpt", "out/run", "--prompt-file", "prompts-binary.txt"], "prompts-binary.txt", None),
    ("sample zero new tokens", "sample.py", ["--ckpt", "out/run", "--max-new-tokens", "0"], "--max-new-tokens", None),
    ("sample NaN temperature", "sample.py", ["--ckpt", "out/run", "--temperature", "nan"], "--temperature nan", None),
    ("sample tokenizer of another run", "sample.py", ["--ckpt", "swapped-tokenizer-ckpt"], "tokenizer.json", swap_tokenizer),
    ("sample unavailable device", "sample.py", ["--ckpt", "out/run", "--device", "cuda"], "--device cuda", None),
    ("sample truncated quantized model.pt", "sample.py", ["--ckpt", "truncated-nf4-ckpt"], "model.pt", truncate_quantized_model),
    # eval.py
    ("eval arithmetic text over a file", "eval.py", ["--write-arith", "text.txt"], "already exists", None),
    ("eval unknown task", "eval.py", ["--ckpt", "out/run", "--tasks", "mmlu"], "mmlu", None),
    ("eval malformed JSONL line", "eval.py", ["--ckpt", "out/run", "--tasks", "hellaswag=bad-line.jsonl"], "bad-line.jsonl:2", None),
    ("eval missing field", "eval.py", ["--ckpt", "out/run", "--tasks", "hellaswag=no-endings.jsonl"], "'endings'", None),
    ("eval label of wrong type", "eval.py", ["--ckpt", "out/run", "--tasks", "hellaswag=label-text.jsonl"], "second", None),
    ("eval labels file length mismatch", "eval.py", ["--ckpt", "out/run", "--tasks", "piqa=piqa.jsonl"], "piqa-labels.lst", None),
    ("eval answer of wrong type", "eval.py", ["--ckpt", "out/run", "--tasks", "gsm8k=gsm8k.jsonl"], "gsm8k.jsonl:1", None),
    ("eval missing task data", "eval.py", ["--ckpt", "out/run", "--tasks", "hellaswag=missing.jsonl"], "missing.jsonl", None),
    ("eval checkpoint without tokenizer", "eval.py", ["--ckpt", "no-tokenizer-ckpt", "--tasks", "text=text.txt"], "tokenizer.json", drop_tokenizer),
    ("eval token file of other tokenizer", "eval.py", ["--ckpt", "out/run", "--tasks", "text=byte-tokens"], "tokenizer", None),
    ("eval zero batch size", "eval.py", ["--ckpt", "out/run", "--batch-size", "0"], "--batch-size", None),
    ("eval stride beyond context", "eval.py", ["--ckpt", "out/run", "--tasks", "text=text.txt", "--stride", "999"], "999", None),
    ("eval report parent is a file", "eval.py", ["--ckpt", "out/run", "--tasks", "text=text.txt", "--out", "a-file/eval.json"], "a-file", None),
    # quantize.py
    ("quantize unknown method", "quantize.py", ["--ckpt", "out/run", "--method", "int2"], "int2", None),
    ("quantize zero group size", "quantize.py", ["--ckpt", "out/run", "--method", "int4", "--group-size", "0"], "--group-size 0", None),
    ("quantize negative block size", "quantize.py", ["--ckpt", "out/run", "--method", "nf4", "--block-size", "-64"], "--block-size -64", None),
    ("quantize missing checkpoint", "quantize.py", ["--ckpt", "out/missing"], "missing", None),
    ("quantize truncated model.pt", "quantize.py", ["--ckpt", "truncated-ckpt"], "model.pt", truncate_model),
    ("quantize output exists", "quantize.py", ["--ckpt", "out/run", "--out", "empty-folder"], "empty-folder", None),
    ("quantize output parent is a file", "quantize.py", ["--ckpt", "out/run", "--out", "a-file/q"], "a-file", None),
    ("quantize unknown layer pattern", "quantize.py", ["--ckpt", "out/run", "--layers", "decoder.*"], "decoder.*", None),
    ("quantize already quantized", "quantize.py", ["--ckpt", "nf4-ckpt"], "already quantized", None),
    ("quantize int8 with double quantization", "quantize.py", ["--ckpt", "out/run", "--method", "int8", "--double-quant"], "--double-quant", None),
]


@pytest.mark.parametrize("name, script, args, needle, damage", CASES, ids=[c[0] for c in CASES])
def test_bad_input(workspace, name, script, args, needle, damage):
    if damage is not None:
        damaged_copy(workspace, args[args.index("--ckpt") + 1] if "--ckpt" in args else args[args.index("--data") + 1], damage)
    before = snapshot(workspace)
    result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=workspace, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_clean_error(result, needle)
    assert snapshot(workspace) == before
