"""Evaluation: multiple-choice scoring (case C14), strided perplexity, bits per byte, readers, answers,
one process against two, and the eval.py command line on bad input."""
import bz2
import json
import math
import os
import re
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import eval as evaluation
import sample
import tokenizer as tok
from model import GPT, GPTConfig, clean_state_dict, write_checkpoint_files
from train import Runtime

ROOT = Path(__file__).resolve().parent.parent
HELLASWAG = Path("eval_mc/hellaswag/hellaswag_val_full.txt.bz2")


class BigramStub(torch.nn.Module):
    """A model whose next-token log-probabilities depend only on the current token: table[idx]."""

    def __init__(self, table, context_len):
        super().__init__()
        self.table = table
        self.config = SimpleNamespace(context_len=context_len)

    def forward(self, idx, targets=None, kv_cache=None, pad_mask=None, reduction="mean"):
        assert idx.size(1) <= self.config.context_len, "the model was given more tokens than its context"
        return self.table[idx], None


def rule_table(vocab_size, rules):
    """Log-probability table: rules[prev][next] fixes log p(next | prev); the rest of each row is uniform."""
    table = torch.full((vocab_size, vocab_size), -math.log(vocab_size), dtype=torch.float64)
    for prev, fixed in rules.items():
        rest = 1.0 - sum(math.exp(lp) for lp in fixed.values())
        table[prev] = math.log(rest / (vocab_size - len(fixed)))
        for nxt, lp in fixed.items():
            table[prev, nxt] = lp
    return table.float()


def small_bpe():
    """Byte-level BPE whose only merges are " a" and " b", so a space belongs to the letter after it."""
    return tok.BPETokenizer([bytes([b]) for b in range(256)] + [b" a", b" b"], tok.GPT2_PATTERN)


# ---------------------------------------------------------------------------------------------------
# Multiple choice (case C14)


def c14_setup():
    tokenizer = small_bpe()
    a, b, x = tokenizer.encode(" a")[0], tokenizer.encode(" b")[0], ord("x")
    rules = {x: {a: -1.0, b: -0.5}, a: {a: -1.0}, b: {b: -0.5}}
    return tokenizer, BigramStub(rule_table(tokenizer.vocab_size, rules), context_len=32)


def test_choice_sum_and_length_normalized_disagree():
    tokenizer, model = c14_setup()
    example = evaluation.Example("x", [" a a", " b b b b b b"], label=0)
    (ll_a, bytes_a), (ll_b, bytes_b) = evaluation.score_choices(model, tokenizer, [example])[0]
    assert ll_a == pytest.approx(-2.0, abs=1e-5)    # 2 tokens at -1.0
    assert ll_b == pytest.approx(-3.0, abs=1e-5)    # 6 tokens at -0.5
    assert (bytes_a, bytes_b) == (3, 11)            # the separating space is not counted
    assert evaluation.pick_endings([(ll_a, bytes_a), (ll_b, bytes_b)]) == (0, 1)


def test_choice_reports_acc_and_acc_norm():
    tokenizer, model = c14_setup()
    examples = [evaluation.Example("x", [" a a", " b b b b b b"], label=0)]
    args = SimpleNamespace(limit=0, shots=None, seed=0, batch_size=4)
    task = evaluation.TASKS["hellaswag"]
    rows, skipped = evaluation.run_task(model, tokenizer, task, None, examples, None, args, Runtime())
    assert {row["metric"]: row["value"] for row in rows} == {"acc": 1.0, "acc_norm": 0.0}
    assert skipped == 0


def test_choice_scores_only_ending_tokens():
    tokenizer, model = c14_setup()
    # Under the stub every context token costs log(1/vocab_size); scoring any of them would change the sums.
    example = evaluation.Example("yyy x", [" a a", " b b b b b b"], label=0)
    scores = evaluation.score_choices(model, tokenizer, [example])[0]
    assert [ll for ll, _ in scores] == pytest.approx([-2.0, -3.0], abs=1e-5)


def test_choice_space_belongs_to_ending():
    tokenizer = small_bpe()
    a, x = tokenizer.encode(" a")[0], ord("x")
    assert evaluation.encode_choice(tokenizer, "x", " a a") == ([x, a, a], 2)
    # A context that ends in the space gives the same tokens: they come from encoding the joined text.
    assert evaluation.encode_choice(tokenizer, "x ", "a a") == ([x, a, a], 2)
    assert evaluation.encode_choice(tokenizer, "", " a") == ([tokenizer.eot_id, a], 1)


def test_choice_normalizes_per_byte_not_per_token():
    tokenizer = small_bpe()
    a, b, x, bang = tokenizer.encode(" a")[0], tokenizer.encode(" b")[0], ord("x"), ord("!")
    rules = {x: {a: -1.0, b: -0.8}, a: {a: -1.0}, b: {bang: -0.8}, bang: {bang: -0.8}}
    model = BigramStub(rule_table(tokenizer.vocab_size, rules), context_len=32)
    # " a a": 2 tokens, 3 bytes, -2.0.  " b!!!!": 5 tokens, 5 bytes, -4.0.
    # Per token B wins (-0.8 > -1.0); per byte A wins (-0.667 > -0.8).
    example = evaluation.Example("x", [" a a", " b!!!!"], label=0)
    scores = evaluation.score_choices(model, tokenizer, [example])[0]
    assert [ll for ll, _ in scores] == pytest.approx([-2.0, -4.0], abs=1e-4)
    assert evaluation.pick_endings(scores) == (0, 0)


def test_choice_padding_changes_nothing():
    tokenizer, model = c14_setup()
    short = evaluation.Example("x", [" a a", " b b b b b b"], label=0)
    long = evaluation.Example("x" * 20, [" a" * 9, " b"], label=1)
    alone = evaluation.score_choices(model, tokenizer, [short], batch_size=1)
    batched = evaluation.score_choices(model, tokenizer, [long, short, long], batch_size=6)
    assert batched[1] == alone[0]


def test_choice_matches_unbatched_reference_on_gpt():
    tokenizer = small_bpe()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_len=48, n_layer=2, n_head=2, n_embd=32,
                          pos="learned")).eval()
    examples = [evaluation.Example("x" * n, [" a" * (n % 4 + 1), " b b", " a b!"], label=0) for n in (1, 7, 30)]

    def reference(context, ending):
        """Log-likelihood of the ending's tokens from one unpadded forward pass."""
        n_context = len(tokenizer.encode(context))
        ids = torch.tensor([tokenizer.encode(context + ending)])
        with torch.no_grad():
            log_probs = model(ids[:, :-1])[0].log_softmax(-1)[0]
        targets = ids[0, 1:]
        return log_probs[torch.arange(len(targets)), targets][n_context - 1:].sum().item()

    for batch_size in (1, 5, 9):
        scores = evaluation.score_choices(model, tokenizer, examples, batch_size=batch_size)
        for example, example_scores in zip(examples, scores):
            expected = [reference(example.context, ending) for ending in example.endings]
            assert [ll for ll, _ in example_scores] == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# Perplexity and bits per byte


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_strided_perplexity_equals_full_sequence(stride):
    generator = torch.Generator().manual_seed(0)
    vocab_size = 11
    table = torch.randn(vocab_size, vocab_size, generator=generator).log_softmax(-1)
    tokens = torch.randint(vocab_size, (23,), generator=generator).numpy()
    full_nll = -table[tokens[:-1], tokens[1:]].double().mean().item()
    model = BigramStub(table, context_len=8)
    result = evaluation.evaluate_tokens(model, tokens, [1] * vocab_size, stride=stride, batch_size=4)
    assert result["n"] == 22
    assert result["perplexity"] == pytest.approx(math.exp(full_nll), rel=1e-6)


@pytest.mark.parametrize("n_tokens, context_len, stride", [(23, 8, 1), (23, 8, 3), (23, 8, 8), (5, 8, 3), (100, 16, 7)])
def test_sliding_windows_score_each_target_once(n_tokens, context_len, stride):
    scored = []
    for start, end, n_scored in evaluation.sliding_windows(n_tokens, context_len, stride):
        assert 0 <= start < end <= n_tokens - 1
        assert end - start <= context_len
        new_targets = list(range(end - n_scored, end))
        scored += new_targets
        for target in new_targets:  # each target has at least context_len - stride tokens before it (or all of them)
            assert target - start + 1 >= min(target + 1, context_len - stride + 1)
    assert scored == list(range(n_tokens - 1))


def test_uniform_model_bits_per_byte(tmp_path):
    texts = {"a.txt": "héllo wörld, 日本語\n", "b.txt": "ça va? ✓\n"}
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    tokenizer = tok.CharTokenizer(sorted(set("".join(texts.values()))))
    tokens = evaluation.read_text_tokens(tmp_path, tokenizer)
    assert list(tokens).count(tokenizer.eot_id) == 2          # one after each file, as token files have
    vocab_size = tokenizer.vocab_size
    model = BigramStub(torch.zeros(vocab_size, vocab_size), context_len=8)
    byte_lengths = [len(b) for b in tokenizer.token_bytes]
    result = evaluation.evaluate_tokens(model, tokens, byte_lengths, stride=5)
    n_targets = len(tokens) - 1
    n_bytes = sum(len(text.encode("utf-8")) for text in texts.values()) - len("h".encode("utf-8"))
    assert result["n"] == n_targets
    assert result["bits_per_byte"] == pytest.approx(math.log2(vocab_size) * n_targets / n_bytes, rel=1e-6)
    assert result["perplexity"] == pytest.approx(vocab_size, rel=1e-5)


def test_token_folder_of_other_tokenizer_rejected(tmp_path):
    (tmp_path / "input.txt").write_text("abc abc\n")
    tok.encode_corpus(tok.ByteTokenizer(), [str(tmp_path / "input.txt")], tmp_path / "tokens")
    char_tokenizer = tok.CharTokenizer(sorted(set("abc \n")))
    with pytest.raises(ValueError, match="another tokenizer"):
        evaluation.read_text_tokens(tmp_path / "tokens", char_tokenizer)
    assert len(evaluation.read_text_tokens(tmp_path / "tokens" / "train.bin", tok.ByteTokenizer())) > 0


# ---------------------------------------------------------------------------------------------------
# Answers and the arithmetic task


@pytest.mark.parametrize("text, expected", [
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
    ("#### 1,000", "1000"),
    ("#### -3", "-3"),
    ("The answer is $18.00.", "18"),
    ("It costs $1,234.50 in total", "1234.5"),
    ("so the total is 0.50 dollars", "0.5"),
    ("5-3=2", "2"),
    ("The temperature fell to -7 degrees", "-7"),
    ("a range of 3,4 and 5", "5"),
    ("1,000,000 people", "1000000"),
    ("#### 42\n\nQuestion: There are 7 apples", "42"),
    ("#### \nso the answer is 12", "12"),
    ("it is −4 today", "-4"),
    ("no number here", None),
])
def test_extract_number(text, expected):
    assert evaluation.extract_number(text) == expected


def test_gsm8k_score_compares_numbers():
    assert evaluation.gsm8k_score(" She has 1,000.0 left.", " ... #### 1000") == 1.0
    assert evaluation.gsm8k_score(" She has 999 left.", " ... #### 1000") == 0.0
    assert evaluation.gsm8k_score(" no idea", " ... #### 0") == 0.0


@pytest.mark.parametrize("completion, answer, reward", [
    ("46", "46", 1.0), ("46\n12+3=15", "46", 1.0), (" 46 ", "46", 1.0), ("-22", "-22", 1.0),
    ("47", "46", 0.0), ("46 apples", "46", 0.0), ("", "46", 0.0), ("4 6", "46", 0.0),
])
def test_arithmetic_reward(completion, answer, reward):
    assert evaluation.arithmetic_reward(completion, answer) == reward


def test_arithmetic_training_text_excludes_eval_problems():
    text = evaluation.arithmetic_text(3000, digits=2, ops="+-*", seed=0)
    lines = text.splitlines()
    assert len(lines) == 3000
    training_prompts = set()
    for line in lines:
        a, op, b, answer = re.fullmatch(r"(\d+)([-+*])(\d+)=(-?\d+)", line).groups()
        assert len(a) <= 2
        assert len(b) <= 2
        assert int(answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        training_prompts.add(f"{a}{op}{b}=")
    heldout = evaluation.arithmetic_problems(300, digits=2, ops="+-*", seed=0)
    assert not training_prompts & {prompt for prompt, _ in heldout}
    assert evaluation.arithmetic_problems(5, 3, "*", seed=7) == evaluation.arithmetic_problems(5, 3, "*", seed=7)


def test_write_arith_command(tmp_path):
    out = tmp_path / "arith.txt"
    evaluation.main(["--write-arith", str(out), "--arith-train-problems", "50", "--arith-digits", "3"])
    assert len(out.read_text().splitlines()) == 50


def test_fewshot_never_includes_the_example():
    pool = [evaluation.Example(f"q{i}=", [f"a{i}"]) for i in range(6)]
    for index in range(6):
        prefix = evaluation.fewshot_prefix(pool, 5, seed=3, index=index, exclude_index=True, separator="\n")
        assert f"q{index}=" not in prefix
        assert len(prefix.splitlines()) == 5
        assert prefix == evaluation.fewshot_prefix(pool, 5, seed=3, index=index, exclude_index=True, separator="\n")
    with pytest.raises(ValueError, match="--shots 6"):
        evaluation.fewshot_prefix(pool, 6, seed=3, index=0, exclude_index=True, separator="\n")


def test_generate_text_stops_at_stop_texts():
    tokenizer = tok.CharTokenizer(list("\nabc"))
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_len=64, n_layer=1, n_head=2, n_embd=16)).eval()
    prompts = ["ab", "c"]
    free = sample.generate_text(model, tokenizer, prompts, 30, temperature=0.0, stop_at_eot=False)
    stops = [free[0][4:6], free[1][2:4]]
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    cut = sample.generate_text(model, tokenizer, prompts, 30, temperature=0.0, stop_at_eot=False, stop_texts=stops)
    for text, full in zip(cut, free):
        first_stop = min(full.index(s) for s in stops if s in full)
        assert text == full[:first_stop]
    assert len(calls) < 30   # generation ended once both rows had produced a stop text


# ---------------------------------------------------------------------------------------------------
# Readers


def test_hellaswag_text_and_jsonl_give_same_items(data_dir, tmp_path):
    items = evaluation.read_hellaswag(data_dir / HELLASWAG)
    assert len(items) == 10042
    with bz2.open(data_dir / HELLASWAG, "rt", encoding="utf-8") as f:
        lines = [next(f).rstrip("\n") for _ in range(30)]
    records = []
    for i in range(0, 30, 6):
        activity, context = lines[i].split(": ", 1)
        records.append({"activity_label": activity, "ctx": context, "endings": lines[i + 2: i + 6], "label": int(lines[i + 1])})
    jsonl = tmp_path / "hellaswag.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert evaluation.read_hellaswag(jsonl) == items[:5]
    assert items[0].label == 3
    assert items[0].endings[3] == " starts pulling up roofing on a roof."
    text = tmp_path / "first.txt"
    text.write_text("\n".join(lines) + "\n")
    assert evaluation.read_hellaswag(text) == items[:5]


def test_hellaswag_jsonl_markup_is_removed(tmp_path):
    record = {"activity_label": "Home", "ctx": "[header] How to paint a wall [title] Buy  paint.", "label": "1",
              "endings": ["[step] Open the can.", "Stir it."]}
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps(record) + "\n")
    [item] = evaluation.read_hellaswag(path)
    assert item == evaluation.Example("Home: How to paint a wall. Buy paint.", [" Open the can.", " Stir it."], 1)


def test_piqa_reader(data_dir):
    items = evaluation.read_piqa(data_dir / "eval_mc/piqa/valid.jsonl")
    assert len(items) == 1838
    assert items[0].context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert items[0].endings[0].startswith(" Provide the guinea pig")
    assert items[0].label == 0
    assert sum(item.label for item in items) == 928


def test_arc_reader(tmp_path):
    record = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]},
              "answerKey": "B"}
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert evaluation.read_arc(path) == [evaluation.Example("Question: Which is a gas?\nAnswer:", [" ice", " steam", " rock"], 1)]


# ---------------------------------------------------------------------------------------------------
# Command line: one process against two, and bad input


def write_checkpoint(directory, tokenizer=None):
    tokenizer = tokenizer or tok.ByteTokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_len=64, n_layer=2, n_head=2, n_embd=32))
    directory.mkdir(parents=True)
    tokenizer.save(directory / "tokenizer.json")
    config = {"model": asdict(model.config), "stage": "test",
              "tokenizer": {"kind": tokenizer.kind, "hash": tokenizer.hash, "file": "tokenizer.json"}}
    write_checkpoint_files(directory, clean_state_dict(model), config)
    return directory


def run_cli(args, tmp_path, launcher=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, str(ROOT / "eval.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(data_dir, tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    text = tmp_path / "text.txt"
    text.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text()[:3000])
    args = ["--ckpt", str(checkpoint), "--tasks", f"text={text},hellaswag={data_dir / HELLASWAG},arithmetic",
            "--limit", "7", "--arith-problems", "7", "--batch-size", "3", "--stride", "40"]
    single = run_cli(args + ["--out", "single.json"], tmp_path)
    assert single.returncode == 0, single.stderr
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    double = run_cli(args + ["--out", "double.json"], tmp_path, launcher)
    assert double.returncode == 0, double.stderr
    one = json.loads((tmp_path / "single.json").read_text())["results"]
    two = json.loads((tmp_path / "double.json").read_text())["results"]
    n_targets = 64 + 6 * 40   # --limit 7 keeps 7 windows: the first scores its 64 tokens, each later one 40
    assert [(r["task"], r["metric"], r["n"]) for r in one] == [
        ("text", "bits_per_byte", n_targets), ("text", "perplexity", n_targets), ("hellaswag", "acc", 7),
        ("hellaswag", "acc_norm", 7), ("arithmetic", "exact_match", 7)]
    assert one == two


def write_piqa(folder, items, labels):
    folder.mkdir(exist_ok=True)
    (folder / "valid.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (folder / "valid-labels.lst").write_text("".join(f"{label}\n" for label in labels))
    return folder / "valid.jsonl"


PIQA_ITEM = {"goal": "open a jar", "sol1": "twist the lid", "sol2": "bake the lid"}


def bad_gsm8k_line(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n{\"question\": oops}\n")
    return ["--tasks", f"gsm8k={path}"], "gsm.jsonl:2: invalid JSON"


def missing_field(tmp_path):
    item = {k: v for k, v in PIQA_ITEM.items() if k != "sol2"}
    return ["--tasks", f"piqa={write_piqa(tmp_path / 'piqa', [PIQA_ITEM, item], [0, 1])}"], "valid.jsonl:2: missing field 'sol2'"


def unknown_task(tmp_path):
    return ["--tasks", "text,squad"], "unknown task 'squad'"


def checkpoint_without_tokenizer(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    (checkpoint / "tokenizer.json").unlink()
    (tmp_path / "t.txt").write_text("some text\n")
    return ["--ckpt", str(checkpoint), "--tasks", f"text={tmp_path / 't.txt'}"], "has no tokenizer"


def labels_length_mismatch(tmp_path):
    return ["--tasks", f"piqa={write_piqa(tmp_path / 'piqa', [PIQA_ITEM] * 2, [0, 1, 1])}"], "has 3 labels but"


def arc_answer_not_a_choice(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps({"question": "q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "E"}) + "\n")
    return ["--tasks", f"arc={path}"], "arc.jsonl:1: label 'E'"


def hellaswag_cut_short(tmp_path):
    path = tmp_path / "hs.txt"
    path.write_text("ctx\n0\na\nb\nc\nd\nctx\n")
    return ["--tasks", f"hellaswag={path}"], "not a multiple of 6"


def missing_data_file(tmp_path):
    return ["--tasks", f"gsm8k={tmp_path / 'nope.jsonl'}"], "nope.jsonl not found"


def text_outside_char_vocabulary(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "ckpt", tok.CharTokenizer(sorted("abc \n")))
    (tmp_path / "t.txt").write_text("abc abd\n")
    return ["--ckpt", str(checkpoint), "--tasks", f"text={tmp_path / 't.txt'}"], "t.txt: character 'd'"


@pytest.mark.parametrize("case", [bad_gsm8k_line, missing_field, unknown_task, checkpoint_without_tokenizer,
                                  labels_length_mismatch, arc_answer_not_a_choice, hellaswag_cut_short,
                                  missing_data_file, text_outside_char_vocabulary])
def test_bad_input_gives_one_error_line(case, tmp_path):
    args, message = case(tmp_path)
    if "--ckpt" not in args:
        args += ["--ckpt", str(write_checkpoint(tmp_path / "good"))]
    result = run_cli(args + ["--out", "report.json"], tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert not (tmp_path / "report.json").exists()


def test_help_lists_every_task_and_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in evaluation.TASKS:
        assert f"\n  {name} " in text
    for flag in ("--ckpt", "--compare", "--tasks", "--limit", "--shots", "--stride", "--arith-digits", "--write-arith", "--out"):
        assert flag in text
