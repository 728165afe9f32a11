"""Benchmarks for llm-stages; each subcommand measures one stage and prints Markdown for BENCHMARKS.md.

    python bench.py tokenizer    # BPE training time: fast trainer against the naive reference

Data locations come from flags whose defaults are under $LLM_STAGES_DATA (else ./data).
"""
import argparse
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

DATA = Path(os.environ.get("LLM_STAGES_DATA", "data"))


def median_seconds(run, repeats: int) -> tuple[float, object]:
    """Call run() repeats times; return the median wall-clock time in seconds and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def cpu_name() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def bench_tokenizer(args) -> None:
    """Time BPE training (GPT-4 split pattern) with train_bpe and with the naive reference trainer.

    Each time includes the pre-split of the text. The naive trainer (tests/test_tokenizer.py)
    recounts every pair of every chunk of the text after each merge, as minbpe does. The fast
    trainer counts unique chunks once and then updates only the chunks that contain the merged pair.
    """
    import tokenizer as tk
    from tests.test_tokenizer import train_bpe_naive

    shakespeare = [Path(args.shakespeare).read_bytes().decode("utf-8")]
    novels = [path.read_bytes().decode("utf-8") for path in sorted(Path(args.gutenberg).glob("*.txt"))]
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; median of {args.runs} runs\n")
    print("| corpus | bytes | vocab size | trainer | merges | median time (s) | speed-up |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")

    def row(name, texts, vocab_size, trainer, seconds, merges, speedup=""):
        n_bytes = sum(len(text.encode("utf-8")) for text in texts)
        cells = [name, f"{n_bytes:,}", f"{vocab_size:,}", trainer, f"{len(merges):,}", f"{seconds:.2f}", speedup]
        print("| " + " | ".join(cells) + " |", flush=True)

    fast_seconds, (_, fast_merges) = median_seconds(
        lambda: tk.train_bpe(shakespeare, 1024, tk.GPT4_PATTERN), args.runs
    )
    row("Tiny Shakespeare", shakespeare, 1024, "fast (train_bpe)", fast_seconds, fast_merges)
    if args.naive_runs > 0:
        naive_seconds, (_, naive_merges) = median_seconds(
            lambda: train_bpe_naive(shakespeare, 1024, tk.GPT4_PATTERN), args.naive_runs
        )
        speedup = f"{naive_seconds / fast_seconds:.0f}x"
        row("Tiny Shakespeare", shakespeare, 1024, "naive (reference)", naive_seconds, naive_merges, speedup)
        if naive_merges != fast_merges:
            raise SystemExit("error: the naive and fast trainers learned different merges")

    seconds, (_, merges) = median_seconds(lambda: tk.train_bpe(novels, 8192, tk.GPT4_PATTERN), args.runs)
    row(f"{len(novels)} Gutenberg novels", novels, 8192, "fast (train_bpe)", seconds, merges)


def main() -> None:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=formatter)
    commands = parser.add_subparsers(dest="command", required=True)

    tokenizer = commands.add_parser("tokenizer", help="BPE training time", formatter_class=formatter)
    tokenizer.add_argument("--shakespeare", default=str(DATA / "tinyshakespeare" / "input.txt"),
                           help="Tiny Shakespeare text file")
    tokenizer.add_argument("--gutenberg", default=str(DATA / "gutenberg"), help="folder of Gutenberg novels (*.txt)")
    tokenizer.add_argument("--runs", type=int, default=3, help="runs per fast measurement (the median is reported)")
    tokenizer.add_argument("--naive-runs", type=int, default=3,
                           help="runs of the naive trainer (minutes each); 0 skips it")
    tokenizer.set_defaults(run=bench_tokenizer)

    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
