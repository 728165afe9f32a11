"""Benchmarks for llm-stages; each subcommand measures one stage and prints Markdown for BENCHMARKS.md.

    python bench.py tokenizer    # BPE training time: fast trainer against the naive reference
    python bench.py throughput   # training tokens/s and MFU on nanoGPT's CPU demo configuration (P1)
    python bench.py recipe       # validation loss against wall-clock seconds of the main job (P2)
    python bench.py generate     # generation tokens/s with the KV cache against full recompute (P3)
    python bench.py memory       # peak resident memory of training on small and large corpora
    torchrun --nproc_per_node=N bench.py gpu   # GPT-2 124M with bf16, torch.compile and NCCL DDP (CUDA only)

Data locations come from flags whose defaults are under $LLM_STAGES_DATA (else ./data).
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
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


def shakespeare_tokens(args) -> Path:
    """Char-level token files of Tiny Shakespeare (90/10 split), made once under data/tokens/."""
    import tokenizer as tk
    out = Path("data/tokens/bench-shakespeare-char")
    if not (out / "meta.json").is_file():
        tk.encode_corpus(tk.build_char_tokenizer([Path(args.shakespeare)]), [args.shakespeare], out, force=True)
    return out


def bench_throughput(args) -> None:
    """Training tokens/s and MFU on nanoGPT's CPU demo configuration (P1).

    The configuration is nanoGPT's shakespeare_char on CPU: 4 layers, 4 heads, width 128, context 64,
    batch 12, learned positions, LayerNorm, GELU, no biases, tied embeddings. Each run times
    args.steps optimizer steps of train.py's own train_step after args.warmup steps; MFU divides the
    model's FLOPs per token times tokens/s by the measured peak of a 1024x1024 matmul in that dtype.
    """
    import torch
    import train
    from model import GPT, GPTConfig

    data_dir = shakespeare_tokens(args)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {args.runs} runs of {args.steps} steps\n")
    print("| dtype | compile | ms per step | tokens/s | MFU | matmul peak (GFLOP/s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for dtype in ("float32", "bfloat16"):
        for compile_model in (False, True):
            runtime = train.Runtime(dtype=getattr(torch, dtype))
            cfg = train.TrainConfig(lr=1e-3, weight_decay=0.1, beta2=0.99)
            times = []
            for run in range(args.runs):
                torch.manual_seed(run)
                model = GPT(GPTConfig(vocab_size=72, context_len=64, n_layer=4, n_head=4, n_embd=128, pos="learned",
                                      norm="layernorm", mlp="gelu", dropout=0.0, bias=False))
                step_model = torch.compile(model) if compile_model else model
                optimizers = train.build_optimizers(model, cfg, "cpu")
                data = train.TokenData(data_dir, 64, runtime.device)
                for step in range(args.warmup + args.steps):
                    if step == args.warmup:
                        start = time.perf_counter()
                    batch = data.train_batch(run, step, 0, 12)
                    train.train_step(step_model, [batch], optimizers, runtime, grad_clip=1.0)
                times.append((time.perf_counter() - start) / args.steps)
            seconds = statistics.median(times)
            tokens_per_s = 12 * 64 / seconds
            peak = train.measure_matmul_peak(runtime.device, runtime.dtype)
            mfu = model.flops_per_token(64) * tokens_per_s / peak
            print(f"| {dtype} | {'yes' if compile_model else 'no'} | {1000 * seconds:.1f} | {tokens_per_s:,.0f} | "
                  f"{100 * mfu:.1f}% | {peak / 1e9:.0f} |", flush=True)


def run_train_script(extra_args, cwd="."):
    """Run train.py in a subprocess; return (wall seconds, peak resident memory in MB of the child)."""
    import resource
    start = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).parent / "train.py"), *extra_args], cwd=cwd, check=True)
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def bench_recipe(args) -> None:
    """Validation loss against training seconds of the main job's default recipe (P2), over args.runs seeds.

    Runs `python train.py` with its defaults (plus the given seed and an evaluation every
    args.eval_interval steps) and reads val_loss and train_seconds (time spent in training steps,
    evaluation excluded) from its log.jsonl.
    """
    import json
    shakespeare_tokens(args)
    finals = []
    for seed in range(args.runs):
        run = f"bench-recipe-{seed}"
        run_train_script(["--data", "data/tokens/bench-shakespeare-char", "--seed", str(seed), "--run-name", run,
                          "--overwrite", "--eval-interval", str(args.eval_interval), "--sample-tokens", "0",
                          *args.train_args])
        records = [json.loads(line) for line in Path("out", run, "log.jsonl").read_text().splitlines()]
        evals = [r for r in records if "val_loss" in r]
        print(f"seed {seed}: " + ", ".join(f"{r['train_seconds']:.0f}s {r['val_loss']:.4f}" for r in evals), flush=True)
        finals.append((evals[-1]["val_loss"], evals[-1]["train_seconds"]))
    losses = sorted(loss for loss, _ in finals)
    print(f"\nfinal validation loss: median {statistics.median(losses):.4f} (min {losses[0]:.4f}, max {losses[-1]:.4f}); "
          f"median training time {statistics.median(s for _, s in finals):.1f} s")


def bench_generate(args) -> None:
    """Generation tokens/s with the KV cache against recomputing the whole context for every token (P3).

    The same random-weight model (the main job's shape, context 256) generates args.tokens tokens
    greedily from a 1-token prompt; without the cache each step runs the full forward on the last
    context_len tokens.
    """
    import torch
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=72, context_len=256, n_layer=4, n_head=4, n_embd=128)).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)

    @torch.no_grad()
    def recompute():
        ids = prompt
        for _ in range(args.tokens):
            logits, _ = model(ids[:, -model.config.context_len:])
            ids = torch.cat((ids, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
        return ids

    cached_seconds, cached = median_seconds(lambda: model.generate(prompt, args.tokens, temperature=0.0), args.runs)
    full_seconds, full = median_seconds(recompute, args.runs)
    same = torch.equal(cached[:, :257], full[:, :257])  # identical until the cache is rebuilt past the context
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; {args.tokens} new tokens, context 256, median of {args.runs} runs\n")
    print("| method | seconds | tokens/s |")
    print("| --- | ---: | ---: |")
    print(f"| KV cache | {cached_seconds:.2f} | {args.tokens / cached_seconds:,.0f} |")
    print(f"| full recompute | {full_seconds:.2f} | {args.tokens / full_seconds:,.0f} |")
    print(f"\nspeed-up {full_seconds / cached_seconds:.1f}x; outputs identical over the first 256 tokens: {same}")


def bench_memory(args) -> None:
    """Peak resident memory of a short training run on Tiny Shakespeare and on all Gutenberg novels.

    Token files are memory-mapped, so memory should not grow with the corpus. Each run is a fresh
    process (ru_maxrss of the children is cumulative, so the larger corpus runs second).
    """
    import tokenizer as tk
    shakespeare = shakespeare_tokens(args)
    novels = Path("data/tokens/bench-gutenberg-gpt2")
    if not (novels / "meta.json").is_file():
        tk.encode_corpus(tk.load_tokenizer("gpt2", args.gpt2_files), [args.gutenberg], novels, force=True)
    print("| corpus | train tokens | peak RSS (MB) |")
    print("| --- | ---: | ---: |")
    import json
    for folder in (shakespeare, novels):
        meta = json.loads((folder / "meta.json").read_text())
        _, peak = run_train_script(["--data", str(folder), "--max-steps", "50", "--run-name", "bench-memory", "--overwrite",
                                    "--sample-tokens", "0", "--eval-tokens", "8192", "--n-embd", "128", "--n-layer", "4"])
        print(f"| {folder.name} | {meta['train_tokens']:,} | {peak:.0f} |", flush=True)


def bench_gpu(args) -> None:
    """GPT-2 124M training throughput on CUDA: bf16 autocast, torch.compile and NCCL DDP under torchrun.

    Random tokens stand in for data (throughput does not depend on them). MFU divides FLOPs per token
    (PaLM's 6N + 12LdT) times tokens/s by the measured peak of an 8192x8192 bf16 matmul on one GPU,
    times the number of GPUs.
    """
    import torch
    import train
    from model import GPT, GPTConfig
    if not torch.cuda.is_available():
        raise SystemExit("error: bench.py gpu needs a CUDA GPU; run it on a GPU machine (under torchrun for DDP)")
    runtime = train.setup_runtime("cuda", "bfloat16", seed=0)
    config = GPTConfig(vocab_size=50304, context_len=1024, n_layer=12, n_head=12, n_embd=768, pos="learned",
                       norm="layernorm", mlp="gelu", bias=True)
    model = GPT(config).to(runtime.device)
    optimizers = train.build_optimizers(model, train.TrainConfig(lr=6e-4), "cuda")
    step_model = torch.compile(model)
    if runtime.distributed:
        step_model = torch.nn.parallel.DistributedDataParallel(step_model, device_ids=[runtime.local_rank])
    generator = torch.Generator(device=runtime.device).manual_seed(runtime.rank)
    batch = torch.randint(0, config.vocab_size, (args.batch_size, config.context_len + 1), device=runtime.device, generator=generator)
    batches = [(batch[:, :-1], batch[:, 1:])] * args.grad_accum
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        result = train.train_step(step_model, batches, optimizers, runtime, grad_clip=1.0)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    tokens_per_s = args.batch_size * config.context_len * args.grad_accum * runtime.world_size / seconds
    peak = train.measure_matmul_peak(runtime.device, torch.bfloat16, size=8192)
    mfu = model.flops_per_token(config.context_len) * tokens_per_s / (peak * runtime.world_size)
    train.print0(runtime, f"{torch.cuda.get_device_name()} x {runtime.world_size}: GPT-2 124M, bf16, compiled, "
                          f"{'DDP' if runtime.distributed else 'one process'}; {1000 * seconds:.0f} ms per step, "
                          f"{tokens_per_s:,.0f} tokens/s, MFU {100 * mfu:.1f}% of a measured {peak / 1e12:.0f} TFLOP/s "
                          f"bf16 matmul peak per GPU; last loss {result.loss:.3f}")


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

    throughput = commands.add_parser("throughput", help="training tokens/s and MFU (P1)", formatter_class=formatter)
    throughput.add_argument("--steps", type=int, default=100, help="timed steps per run")
    throughput.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation happens here)")
    throughput.add_argument("--runs", type=int, default=3, help="runs per setting (the median is reported)")
    recipe = commands.add_parser("recipe", help="validation loss against time of the main job (P2)", formatter_class=formatter)
    recipe.add_argument("--runs", type=int, default=3, help="seeds (the median final loss is reported)")
    recipe.add_argument("--eval-interval", type=int, default=250, help="steps between validation evaluations")
    recipe.add_argument("train_args", nargs="*", help="extra train.py flags (after --)")
    generate = commands.add_parser("generate", help="KV cache against full recompute (P3)", formatter_class=formatter)
    generate.add_argument("--tokens", type=int, default=500, help="new tokens per run")
    generate.add_argument("--runs", type=int, default=3, help="runs (the median is reported)")
    memory = commands.add_parser("memory", help="peak memory against corpus size", formatter_class=formatter)
    memory.add_argument("--gutenberg", default=str(DATA / "gutenberg"), help="folder of Gutenberg novels (*.txt)")
    memory.add_argument("--gpt2-files", default=str(DATA / "gpt2_bpe"), help="GPT-2 tokenizer files")
    gpu = commands.add_parser("gpu", help="GPT-2 124M on CUDA with bf16, compile and DDP", formatter_class=formatter)
    gpu.add_argument("--steps", type=int, default=30, help="timed steps")
    gpu.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    gpu.add_argument("--batch-size", type=int, default=16, help="sequences of 1024 tokens per micro-batch")
    gpu.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step")
    gpu.set_defaults(run=bench_gpu)
    for command, run in ((throughput, bench_throughput), (recipe, bench_recipe), (generate, bench_generate), (memory, bench_memory)):
        command.add_argument("--shakespeare", default=str(DATA / "tinyshakespeare" / "input.txt"), help="Tiny Shakespeare text file")
        command.set_defaults(run=run)

    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
