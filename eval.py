"""Evaluation: perplexity and bits per byte, multiple-choice and generative benchmarks, reports.

The last stage of llm-stages. It scores checkpoints written by train.py or any later stage:

    python eval.py --ckpt out/tinyshakespeare-char       # bits per byte on data/tokens/tinyshakespeare-char
    python eval.py --ckpt out/run --tasks text=novel.txt,hellaswag,piqa --limit 500
    python eval.py --compare out/a out/b --tasks gsm8k --limit 100     # several checkpoints in one table
    python eval.py --write-arith arith.txt && python train.py --input arith.txt   # learn the arithmetic task
    torchrun --nproc_per_node=4 eval.py --ckpt out/run --tasks hellaswag  # examples split over processes

Reads checkpoints (model.pt, config.json, tokenizer.json) and task data (text files, token folders,
JSONL, the 6-lines-per-item HellaSwag text, PIQA labels), by default under --data-dir. Prints a
Markdown table and writes every number to a JSON file (--out).
"""
import argparse
import bz2
import gzip
import json
import math
import operator
import random
import re
import statistics
import time
import zlib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import tokenizer as tok
from model import IGNORE_INDEX
from sample import generate_text, load_model_and_tokenizer
from train import Runtime, all_reduce_sum, autocast, print0, setup_runtime, shutdown_runtime


# ---------------------------------------------------------------------------------------------------
# Task data


@dataclass
class Example:
    """One item: a context, candidate endings and the index of the right one. An ending starts with what
    separates it from the context (usually a space). A generative task has one ending, the reference."""
    context: str
    endings: list
    label: int = 0


def open_text(path):
    """Open a UTF-8 text file for reading; .bz2 and .gz files are decompressed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the task's data as TASK=PATH or set --data-dir")
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8")


def read_jsonl(path):
    """Yield (line number, object) for each non-empty line of a JSONL file."""
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def require(record, names, path, number):
    """Return the record's values of names; a missing one raises ValueError naming the file and line."""
    for name in names:
        if name not in record:
            raise ValueError(f"{path}:{number}: missing field {name!r} (expected {', '.join(names)})")
    return [record[name] for name in names]


def choice_example(path, number, context, endings, label, clean=str.strip):
    """Check one multiple-choice item and build its Example, with a space before each ending."""
    if not isinstance(context, str) or not isinstance(endings, list) or len(endings) < 2 \
            or not all(isinstance(ending, str) for ending in endings):
        raise ValueError(f"{path}:{number}: expected a text context and a list of at least 2 text endings")
    index = int(label) if str(label).strip().isdigit() else -1
    if not 0 <= index < len(endings):
        raise ValueError(f"{path}:{number}: label {label!r} is not the index of one of the {len(endings)} endings")
    return Example(clean(context), [" " + clean(ending) for ending in endings], index)


def clean_hellaswag(text):
    """Remove WikiHow markup as lm-evaluation-harness's HellaSwag task does: " [title]" ends a sentence,
    and other [tags] are dropped."""
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ").strip()


def read_hellaswag(path):
    """Read HellaSwag: JSONL (ctx, endings, label, optional activity_label), or else the text form with
    6 lines per item (activity label and context, label, four endings)."""
    path = Path(path)
    if ".jsonl" in path.suffixes:
        items = []
        for number, record in read_jsonl(path):
            context, endings, label = require(record, ["ctx", "endings", "label"], path, number)
            if record.get("activity_label"):
                context = f"{record['activity_label']}: {context}"
            items.append((number, context, endings, label))
    else:
        with open_text(path) as f:
            lines = f.read().splitlines()
        if len(lines) % 6:
            raise ValueError(f"{path} has {len(lines)} lines, not a multiple of 6; each item is a context line, "
                             "a label line and four ending lines")
        items = [(i + 1, lines[i], lines[i + 2: i + 6], lines[i + 1]) for i in range(0, len(lines), 6)]
    return [choice_example(path, *item, clean=clean_hellaswag) for item in items]


def read_piqa(path):
    """Read PIQA: JSONL (goal, sol1, sol2) and the labels file beside it (X.jsonl -> X-labels.lst, a 0 or 1 per line)."""
    path = Path(path)
    records = list(read_jsonl(path))
    labels_path = path.with_name(path.name.split(".")[0] + "-labels.lst")
    if not labels_path.is_file():
        raise FileNotFoundError(f"{labels_path} not found; PIQA labels are read from the file beside the data")
    labels = labels_path.read_text(encoding="utf-8").split()
    if len(labels) != len(records):
        raise ValueError(f"{labels_path} has {len(labels)} labels but {path} has {len(records)} items; "
                         "the two files must be aligned line by line")
    examples = []
    for (number, record), label in zip(records, labels):
        goal, sol1, sol2 = require(record, ["goal", "sol1", "sol2"], path, number)
        examples.append(choice_example(path, number, f"Question: {goal}\nAnswer:", [sol1, sol2], label))
    return examples


def read_arc(path):
    """Read ARC JSONL: question, choices {text: [...], label: [...]}, answerKey (one of the choice labels)."""
    examples = []
    for number, record in read_jsonl(path):
        question, choices, answer_key = require(record, ["question", "choices", "answerKey"], path, number)
        texts, labels = require(choices, ["text", "label"], path, number) if isinstance(choices, dict) else (None, [])
        label = labels.index(answer_key) if answer_key in labels else answer_key
        examples.append(choice_example(path, number, f"Question: {question}\nAnswer:", texts, label))
    return examples


def read_gsm8k(path):
    """Read GSM8K JSONL: question, and an answer whose last line is "#### N"."""
    examples = []
    for number, record in read_jsonl(path):
        question, answer = require(record, ["question", "answer"], path, number)
        if not isinstance(answer, str) or extract_number(answer) is None:
            raise ValueError(f"{path}:{number}: the answer contains no number; GSM8K answers end with '#### N'")
        examples.append(Example(f"Question: {question}\nAnswer:", [" " + answer]))
    return examples


# ---------------------------------------------------------------------------------------------------
# Checking generated answers, and the synthetic arithmetic task


# An optional minus sign ("−" is the Unicode one), an optional "$", digits with optional thousands commas,
# and optional decimals. A "-" right after a word or a closing bracket means subtraction, so it is no sign.
NUMBER = re.compile(r"(?:(?<![\w)])[-−])?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def normalize_number(text):
    """Return the canonical form of a NUMBER match: "$1,000.50" -> "1000.5", "-3.00" -> "-3"."""
    value = Decimal(text.replace(",", "").replace("$", "").replace("−", "-"))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_number(text):
    """Return the final number of a GSM8K-style solution: the first number after the last "####", else the
    last number in the text, or None."""
    _, marker, after = text.rpartition("####")
    if marker and (match := NUMBER.search(after)):
        return normalize_number(match.group())
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_score(completion, reference):
    """Return 1.0 when the completion's final number equals the reference's, else 0.0."""
    predicted = extract_number(completion)
    return float(predicted is not None and predicted == extract_number(reference))


ARITHMETIC_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def arithmetic_problems(n, digits=2, ops="+-", seed=0, heldout=True):
    """Draw n problems such as ("12*34=", "408"). Each operand has 1 to digits digits (uniformly).

    One problem in ten, chosen by a fixed hash of its text, is held out. Evaluation draws only those and
    training text never contains them, so accuracy measures arithmetic rather than memory. With 1 digit
    the held-out set has only about 30 distinct problems, so draws repeat.
    """
    if digits < 1 or not ops or set(ops) - set(ARITHMETIC_OPS):
        raise ValueError(f"arithmetic needs --arith-digits >= 1 (got {digits}) and --arith-ops drawn from "
                         f"{''.join(ARITHMETIC_OPS)} (got {ops!r})")
    rng = random.Random(seed)
    problems = []
    while len(problems) < n:
        lengths = rng.randint(1, digits), rng.randint(1, digits)
        a, b = (rng.randrange(10 ** (k - 1) if k > 1 else 0, 10 ** k) for k in lengths)
        op = rng.choice(ops)
        prompt = f"{a}{op}{b}="
        if (zlib.crc32(prompt.encode()) % 10 == 0) == heldout:
            problems.append((prompt, str(ARITHMETIC_OPS[op](a, b))))
    return problems


def arithmetic_text(n_problems, digits=2, ops="+-", seed=0):
    """Return training text for the arithmetic task: one "12+34=46" line per problem, held-out ones excluded."""
    problems = arithmetic_problems(n_problems, digits, ops, seed, heldout=False)
    return "".join(f"{prompt}{answer}\n" for prompt, answer in problems)


def arithmetic_reward(completion, answer):
    """Reward for the arithmetic task: 1.0 when the completion's first line is exactly the answer's number, else 0.0."""
    line = completion.split("\n", 1)[0].strip()
    return float(NUMBER.fullmatch(line) is not None and normalize_number(line) == normalize_number(answer))


# ---------------------------------------------------------------------------------------------------
# Tasks: a new one is a reader (and, to generate, a score function) added to TASKS


@dataclass
class Task:
    """A benchmark. kind is "text" (perplexity and bits per byte), "choice" (the log-likelihood of each ending
    picks one) or "generate" (greedy generation, checked by score(completion, reference) -> 0.0 to 1.0)."""
    name: str
    kind: str
    description: str
    data: str = ""               # default data, under --data-dir
    read: Callable = None        # (path, args) -> list of Example
    score: Callable = None
    fewshot_data: str = ""       # training examples under --data-dir for few-shot prompts, used if present
    shots: int = 0               # default number of few-shot examples
    separator: str = "\n\n"      # between few-shot examples; generation stops at it
    prefix: str = ""             # text before the few-shot examples and the prompt
    max_new_tokens: int = 0      # 0: the longest reference's length in bytes, plus 1


TASKS = {task.name: task for task in [
    Task("text", "text", "perplexity and bits per byte of a text file, a folder of .txt files, a token folder "
         "(its --split) or a train.bin/val.bin file", data="tokens/tinyshakespeare-char"),
    Task("hellaswag", "choice", "HellaSwag sentence completion, 4 endings; JSONL or the 6-lines-per-item text",
         data="eval_mc/hellaswag/hellaswag_val_full.txt.bz2", read=lambda path, args: read_hellaswag(path)),
    Task("piqa", "choice", "PIQA physical commonsense, 2 solutions; JSONL with X-labels.lst beside it",
         data="eval_mc/piqa/valid.jsonl", read=lambda path, args: read_piqa(path)),
    Task("arc", "choice", "ARC science questions; JSONL with question, choices and answerKey",
         data="arc/ARC-Easy-Test.jsonl", read=lambda path, args: read_arc(path)),
    Task("gsm8k", "generate", "GSM8K grade-school math, exact match of the final number",
         data="gsm8k/test.jsonl", read=lambda path, args: read_gsm8k(path), score=gsm8k_score,
         fewshot_data="gsm8k/train.jsonl", shots=5, max_new_tokens=256),
    Task("arithmetic", "generate", "held-out synthetic problems such as 12+34= (see --arith-*), exact match",
         read=lambda path, args: [Example(prompt, [answer]) for prompt, answer in arithmetic_problems(
             args.arith_problems, args.arith_digits, args.arith_ops, args.seed)],
         score=arithmetic_reward, separator="\n", prefix="\n"),  # in training text, every problem follows a newline
]}


def fewshot_prefix(pool, shots, seed, index, exclude_index, separator):
    """Return few-shot examples (context, right ending, separator) for example index, drawn with a fixed seed.

    exclude_index is True when the pool is the evaluated set itself, so no prompt contains its own answer.
    """
    if shots == 0:
        return ""
    n_candidates = len(pool) - exclude_index
    if shots > n_candidates:
        raise ValueError(f"--shots {shots} needs more examples than the {n_candidates} available")
    picks = random.Random(seed * 1_000_003 + index).sample(range(n_candidates), shots)
    picks = [p + (exclude_index and p >= index) for p in picks]
    return "".join(pool[p].context + pool[p].endings[pool[p].label] + separator for p in picks)


# ---------------------------------------------------------------------------------------------------
# Scoring in batches, split across processes


def score_in_batches(n_rows, batch_size, score_batch, runtime, width=1):
    """Run score_batch(start, end) -> (end - start, width) values over row batches; return the (n_rows, width)
    float64 table on every process.

    Batch i runs on rank i % world_size, so each batch contains the same rows for any number of processes.
    A row is filled on one process and is zero on the others, so summing over processes copies it exactly.
    """
    table = torch.zeros(n_rows, width, dtype=torch.float64)
    for i, start in enumerate(range(0, n_rows, batch_size)):
        if i % runtime.world_size == runtime.rank:
            end = min(start + batch_size, n_rows)
            table[start:end] = torch.as_tensor(score_batch(start, end), dtype=torch.float64).reshape(end - start, width)
    return all_reduce_sum(table.to(runtime.device), runtime).cpu()


@torch.no_grad()
def target_nll(model, rows, runtime):
    """Return the summed negative log-likelihood (nats) of each row's scored targets, a (B,) tensor.

    A row is (token ids, n_scored): the model reads ids[:-1], and the last n_scored ids are scored.
    Rows are right-padded into one batch, and pad_mask keeps the padding out of attention.
    """
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full_like(inputs, IGNORE_INDEX)
    pad_mask = torch.zeros_like(inputs, dtype=torch.bool)
    for row, (ids, n_scored) in enumerate(rows):
        n = len(ids) - 1
        inputs[row, :n] = torch.as_tensor(ids[:-1])
        targets[row, n - n_scored: n] = torch.as_tensor(ids[len(ids) - n_scored:])
        pad_mask[row, :n] = True
    inputs, targets, pad_mask = inputs.to(runtime.device), targets.to(runtime.device), pad_mask.to(runtime.device)
    with autocast(runtime):
        logits, _ = model(inputs, pad_mask=pad_mask)                            # (B, T, vocab_size)
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return nll.sum(dim=1).cpu()                                                 # (B,)


# ---------------------------------------------------------------------------------------------------
# Perplexity and bits per byte


def read_text_tokens(path, tokenizer, split="val"):
    """Return the token ids of a token folder's split, of one .bin file, or of text files (each followed by
    <|endoftext|>, as tokenizer.py encode writes them)."""
    path = Path(path)
    if path.suffix == ".bin" or (path / "meta.json").is_file():
        folder, split = (path.parent, path.stem) if path.suffix == ".bin" else (path, split)
        meta = tok.read_token_meta(folder)
        if meta.get("tokenizer_hash") != tokenizer.hash:
            raise ValueError(f"{folder} was encoded by another tokenizer ({meta.get('tokenizer')}) than the "
                             f"checkpoint's ({tokenizer.kind}); evaluate its text files instead")
        return np.asarray(tok.load_tokens(folder, split), dtype=np.int64)
    ids = []
    for file in tok.find_text_files([str(path)]):
        try:
            ids += tokenizer.encode_ordinary(file.read_bytes().decode("utf-8")) + [tokenizer.eot_id]
        except ValueError as e:  # invalid UTF-8, or a character that a char tokenizer does not know
            raise ValueError(f"{file}: {e}") from None
    return np.array(ids, dtype=np.int64)


def sliding_windows(n_tokens, context_len, stride):
    """Return windows (start, end, n_scored) that score every target of n_tokens tokens exactly once.

    A window reads tokens[start:end] and predicts tokens[start + 1: end + 1], but only its last n_scored
    targets count. The first window scores its whole context. Each later one ends stride targets further
    (the last one at the end of the text), starts context_len tokens before its end, and scores only the
    targets it adds, so each of them has at least context_len - stride tokens before it in the window.
    """
    windows, done = [], 0              # done: targets scored so far
    while done < n_tokens - 1:
        end = min(done + (stride if done else context_len), n_tokens - 1)
        windows.append((max(0, end - context_len), end, end - done))
        done = end
    return windows


def evaluate_tokens(model, tokens, byte_lengths, stride=0, batch_size=16, limit=0, runtime=None):
    """Compute perplexity and bits per byte of a token sequence in sliding windows of the model's context.

    stride 0 means context_len: non-overlapping windows, which is train.py's validation loss plus the
    last partial window. Bits per byte divide the summed loss in bits by the raw UTF-8 bytes of the scored
    tokens (byte_lengths[id], 0 for special tokens), never by the bytes of decoded text. limit keeps the
    first windows. Returns {"n": targets scored, "loss": nats per token, "perplexity", "bits_per_byte"}.
    """
    runtime = runtime or Runtime()
    context_len = model.config.context_len
    stride = stride or context_len
    if not 0 < stride <= context_len:
        raise ValueError(f"--stride {stride} must be between 1 and the model's context length {context_len}")
    if len(tokens) < 2:
        raise ValueError("the text has fewer than 2 tokens, so there is nothing to score")
    tokens, byte_lengths = np.asarray(tokens), np.asarray(byte_lengths)
    windows = sliding_windows(len(tokens), context_len, stride)[: limit or None]

    def score(first, last):
        batch = windows[first:last]
        nll = target_nll(model, [(tokens[start: end + 1].tolist(), n) for start, end, n in batch], runtime)
        n_bytes = [byte_lengths[tokens[end + 1 - n: end + 1]].sum() for _, end, n in batch]
        return torch.stack([nll.double(), torch.tensor([n for *_, n in batch]), torch.tensor(n_bytes)], dim=1)

    nats, n_targets, n_bytes = score_in_batches(len(windows), batch_size, score, runtime, width=3).sum(dim=0).tolist()
    return {"n": int(n_targets), "loss": nats / n_targets, "perplexity": math.exp(nats / n_targets),
            "bits_per_byte": nats / math.log(2) / n_bytes if n_bytes else float("nan")}


# ---------------------------------------------------------------------------------------------------
# Multiple choice


def encode_choice(tokenizer, context, ending):
    """Return (ids of context + ending, how many of them are the ending's).

    Context and ending are tokenized as one text, as the model saw such text in training. The ending's
    tokens are those after the longest prefix shared with the context's own tokens, so the space that
    starts the ending stays with it wherever BPE puts it (" word" is one token).
    """
    context_ids = tokenizer.encode_ordinary(context)
    ids = tokenizer.encode_ordinary(context + ending)
    shared = 0
    while shared < min(len(context_ids), len(ids) - 1) and context_ids[shared] == ids[shared]:
        shared += 1
    if shared == 0:  # an empty context: predict the ending after <|endoftext|>
        ids, shared = [tokenizer.eot_id] + ids, 1
    return ids, len(ids) - shared


def score_choices(model, tokenizer, examples, batch_size=16, runtime=None):
    """Score every ending of every example by the summed log-likelihood of its tokens given the context.

    Only the ending's tokens are scored. A sequence longer than the context keeps its last context_len + 1
    tokens. Returns one list per example of (log-likelihood in nats, bytes of the ending without its
    leading whitespace).
    """
    runtime = runtime or Runtime()
    rows = []
    for example in examples:
        for ending in example.endings:
            ids, n_scored = encode_choice(tokenizer, example.context, ending)
            ids = ids[-(model.config.context_len + 1):]
            rows.append((ids, min(n_scored, len(ids) - 1)))
    table = score_in_batches(len(rows), batch_size, lambda start, end: target_nll(model, rows[start:end], runtime), runtime)
    scores, row = [], 0
    for example in examples:
        scores.append([(-table[row + i, 0].item(), len(ending.lstrip().encode("utf-8")))
                       for i, ending in enumerate(example.endings)])
        row += len(example.endings)
    return scores


def pick_endings(scores):
    """Return the ending picked by summed log-likelihood (acc) and by log-likelihood per byte (acc_norm).

    acc_norm divides by the ending's UTF-8 bytes, the separating space excluded. lm-evaluation-harness
    divides by characters, which is the same for ASCII. Unlike a token count, bytes do not depend on the
    tokenizer, so models with different vocabularies compare fairly. Ties go to the first ending.
    """
    by_sum = max(range(len(scores)), key=lambda i: scores[i][0])
    by_byte = max(range(len(scores)), key=lambda i: scores[i][0] / max(scores[i][1], 1))
    return by_sum, by_byte


# ---------------------------------------------------------------------------------------------------
# Running tasks, reports


def metric_row(metric, values):
    """Summarize per-example values: their mean, and its standard error (sample standard deviation / sqrt(n))."""
    n = len(values)
    return {"metric": metric, "n": n, "value": sum(values) / n if n else None,
            "stderr": statistics.stdev(values) / math.sqrt(n) if n > 1 else None}


def task_shots(task, args):
    if task.kind == "text":
        return 0
    return task.shots if args.shots is None else args.shots


def load_task(task, path, args):
    """Read a task's examples and few-shot pool before any model loads, so bad data fails fast.
    The pool is None when few-shot examples come from the evaluated examples themselves."""
    if task.kind == "text":
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; give text as text=PATH (a file, folder or token folder)")
        return None, None
    examples = task.read(path, args)
    if not examples:
        raise ValueError(f"{path} contains no examples for task {task.name}")
    fewshot = Path(args.data_dir) / task.fewshot_data
    if task_shots(task, args) and task.fewshot_data and fewshot.is_file():
        return examples, task.read(fewshot, args) or None
    return examples, None


def encodes(tokenizer, text):
    """Return True when the tokenizer can encode text (a char tokenizer rejects characters it never saw)."""
    try:
        tokenizer.encode_ordinary(text)
    except ValueError:
        return False
    return True


def run_generate(model, tokenizer, task, examples, args, runtime):
    """Generate greedily up to the task's separator and score each completion. A prompt keeps only its
    last tokens when the answer would not fit in the context otherwise."""
    max_new_tokens = args.max_new_tokens or task.max_new_tokens or \
        max(len(example.endings[0].encode("utf-8")) for example in examples) + 1
    budget = model.config.context_len - min(max_new_tokens, model.config.context_len // 2)
    prompts = []
    for example in examples:
        ids = tokenizer.encode_ordinary(example.context)
        # NOTE: generate_text encodes the cut text again, which can give a token more or less at the cut.
        prompts.append(example.context if len(ids) <= budget else tokenizer.decode(ids[-budget:]))

    def score(start, end):
        with autocast(runtime):
            completions = generate_text(model, tokenizer, prompts[start:end], max_new_tokens, temperature=0.0,
                                        stop_texts=[task.separator])
        return [task.score(c, example.endings[0]) for c, example in zip(completions, examples[start:end])]

    return [metric_row("exact_match", score_in_batches(len(examples), args.batch_size, score, runtime)[:, 0].tolist())]


def run_task(model, tokenizer, task, path, examples, pool, args, runtime):
    """Evaluate one task on one model. Returns (report rows of metric, n, value and stderr; examples skipped).

    The first --limit examples get their few-shot prefix, and those the tokenizer cannot encode are skipped.
    """
    if task.kind == "text":
        tokens = read_text_tokens(path, tokenizer, args.split)
        byte_lengths = [len(b) for b in tokenizer.token_bytes]
        result = evaluate_tokens(model, tokens, byte_lengths, args.stride, args.batch_size, args.limit, runtime)
        # NOTE: perplexity and bits per byte get no standard error: windows of one text are not independent samples.
        return [{"metric": name, "n": result["n"], "value": result[name], "stderr": None}
                for name in ("bits_per_byte", "perplexity")], 0

    shots = task_shots(task, args)
    prompts = [task.prefix + fewshot_prefix(pool or examples, shots, args.seed, i, pool is None, task.separator)
               + example.context for i, example in enumerate(examples[: args.limit or None])]
    encodable = []
    for prompt, example in zip(prompts, examples):
        scored_text = prompt + "".join(example.endings) if task.kind == "choice" else prompt
        if encodes(tokenizer, scored_text):
            encodable.append(Example(prompt, example.endings, example.label))
    metrics = ("acc", "acc_norm") if task.kind == "choice" else ("exact_match",)
    if not encodable:
        return [metric_row(name, []) for name in metrics], len(prompts)
    if task.kind == "generate":
        return run_generate(model, tokenizer, task, encodable, args, runtime), len(prompts) - len(encodable)

    picks = [pick_endings(s) for s in score_choices(model, tokenizer, encodable, args.batch_size, runtime)]
    acc = [float(by_sum == example.label) for (by_sum, _), example in zip(picks, encodable)]
    acc_norm = [float(by_byte == example.label) for (_, by_byte), example in zip(picks, encodable)]
    return [metric_row("acc", acc), metric_row("acc_norm", acc_norm)], len(prompts) - len(encodable)


def format_table(results):
    """Return a Markdown table: a row per task and metric, a column per checkpoint with value ± standard error."""
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in results))
    cells = {(r["label"], r["metric"], r["checkpoint"]): r for r in results}
    lines = ["| task | metric | n | " + " | ".join(checkpoints) + " |", "| --- | --- | ---: |" + " ---: |" * len(checkpoints)]
    for label, metric in dict.fromkeys((r["label"], r["metric"]) for r in results):
        found = [cells.get((label, metric, checkpoint)) for checkpoint in checkpoints]
        counts = "/".join(dict.fromkeys(str(r["n"]) for r in found if r))
        values = []
        for r in found:
            value = "n/a" if not r or r["value"] is None else f"{r['value']:.4f}"
            values.append(value + (f" ± {r['stderr']:.4f}" if r and r["stderr"] is not None else ""))
        lines.append(f"| {label} | {metric} | {counts} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def parse_tasks(spec, data_dir):
    """Split "--tasks a,b=PATH" into (Task, data path) pairs."""
    pairs = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, path = item.partition("=")
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
        pairs.append((TASKS[name], Path(path) if path else Path(data_dir) / TASKS[name].data))
    if not pairs:
        raise ValueError("--tasks is empty; name at least one task, e.g. --tasks text,hellaswag")
    return pairs


def evaluate(args):
    """Evaluate every checkpoint on every task, then print the table and write the JSON report on rank 0.
    Returns the report rows."""
    specs = parse_tasks(args.tasks, args.data_dir)
    runtime = setup_runtime(args.device, args.dtype, args.seed, args.threads)
    loaded = [(task, path, *load_task(task, path, args)) for task, path in specs]

    results = []
    for checkpoint in args.compare or [args.ckpt]:
        model, tokenizer, _ = load_model_and_tokenizer(checkpoint, runtime.device)
        for task, path, examples, pool in loaded:
            start = time.perf_counter()
            rows, skipped = run_task(model, tokenizer, task, path, examples, pool, args, runtime)
            shots = task_shots(task, args)
            label = f"text ({path.name})" if task.kind == "text" else f"{task.name} {shots}-shot"
            results += [{"checkpoint": checkpoint, "task": task.name, "label": label, "data": str(path),
                         "shots": shots, **row, "skipped": skipped} for row in rows]
            summary = ", ".join(f"{r['metric']} {r['value']:.4f}" for r in rows if r["value"] is not None)
            print0(runtime, f"{checkpoint} | {label}: {summary or 'nothing scored'} (n {rows[0]['n']}, "
                            f"{time.perf_counter() - start:.1f} s)")
            if skipped:
                print0(runtime, f"  skipped {skipped} examples that the {tokenizer.kind} tokenizer cannot encode")

    if runtime.is_main:
        print("\n" + format_table(results))
        report = {"settings": vars(args), "results": results}
        tok.write_atomic(Path(args.out), (json.dumps(report, indent=2) + "\n").encode("utf-8"))
        print(f"\nwrote {args.out}")
    shutdown_runtime(runtime)
    return results


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    tasks = "\n".join(f"  {t.name:<11} {t.description}" + (f" (default data: {t.data})" if t.data else "")
                      for t in TASKS.values())
    parser = tok.ArgumentParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"tasks (--tasks NAME or NAME=PATH; a default path is under --data-dir):\n{tasks}")
    add = parser.add_argument
    add("--ckpt", default="out/tinyshakespeare-char",
        help="checkpoint directory, or a run folder whose newest step-* is used (default: %(default)s)")
    add("--compare", nargs="+", default=[], metavar="CKPT", help="evaluate these checkpoints instead of --ckpt, in one table")
    add("--tasks", default="text", help="comma-separated tasks, each NAME or NAME=PATH (default: %(default)s)")
    add("--data-dir", default="data", help="folder of the tasks' default data (default: %(default)s)")

    add("--limit", type=int, default=0, help="evaluate only the first N examples of each task; for text, N windows (0: all)")
    add("--shots", type=int, default=None, help="few-shot examples per prompt (default: 5 for gsm8k, 0 for the others)")
    add("--seed", type=int, default=1234, help="seed of few-shot draws and arithmetic problems (default: %(default)s)")
    add("--batch-size", type=int, default=16, help="sequences per forward pass, or prompts per generation batch "
        "(default: %(default)s)")
    add("--stride", type=int, default=0, help="text: tokens between window ends; smaller gives each token more context "
        "and costs more (0: the context length, so windows do not overlap)")
    add("--split", default="val", help="text: split of a token folder, train or val (default: %(default)s)")

    add("--max-new-tokens", type=int, default=0,
        help="tokens generated per prompt (0: 256 for gsm8k, the longest reference's length in bytes + 1 otherwise)")

    add("--arith-digits", type=int, default=2, help="arithmetic: maximum digits per operand (default: %(default)s)")
    add("--arith-ops", default="+-", help="arithmetic: operations to draw from, of + - * (default: %(default)s)")
    add("--arith-problems", type=int, default=500, help="arithmetic: problems evaluated (default: %(default)s)")
    add("--write-arith", default="", metavar="FILE",
        help="write arithmetic training text, one problem per line, to FILE and exit (then: train.py --input FILE)")
    add("--arith-train-problems", type=int, default=200000, help="problems that --write-arith writes (default: %(default)s)")

    add("--out", default="out/eval.json", help="JSON report file (default: %(default)s)")
    add("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    add("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    add("--dtype", default="float32", help="float32, bfloat16, or float16 on CUDA (default: %(default)s)")
    return parser.parse_args(argv)


def check_args(args):
    for name in ("limit", "stride", "max_new_tokens", "threads"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 0")
    for name in ("arith_problems", "arith_train_problems"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be positive")
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size {args.batch_size} must be positive")
    if args.shots is not None and args.shots < 0:
        raise ValueError(f"--shots {args.shots} must be >= 0")


def run(args):
    """Write the arithmetic training text (--write-arith), or evaluate."""
    check_args(args)
    if not args.write_arith:
        evaluate(args)
        return
    if Path(args.write_arith).exists():
        raise FileExistsError(f"--write-arith {args.write_arith} already exists; choose a new file name or delete it first")
    text = arithmetic_text(args.arith_train_problems, args.arith_digits, args.arith_ops, args.seed)
    tok.write_atomic(Path(args.write_arith), text.encode("utf-8"))
    print(f"wrote {args.arith_train_problems:,} arithmetic problems to {args.write_arith}")


def main(argv=None):
    tok.run_command(run, parse_args(argv))


if __name__ == "__main__":
    main()
