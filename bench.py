"""Benchmarks for llm-stages; each subcommand measures one stage and prints Markdown for BENCHMARKS.md.

    python bench.py tokenizer    # BPE training time: fast trainer against the naive reference
    python bench.py throughput   # training tokens/s and MFU on nanoGPT's CPU demo configuration (P1)
    python bench.py recipe       # validation loss against wall-clock seconds of the main job (P2)
    python bench.py generate     # generation tokens/s with the KV cache against full recompute (P3)
    python bench.py memory       # peak resident memory of training on small and large corpora
    python bench.py ablation     # validation loss of each architecture option at a fixed step budget
    python bench.py quantize --ckpt out/main   # bits per byte, bytes and generation speed of each quantization
    python bench.py eval --ckpt out/a out/b    # bits per byte, HellaSwag, PIQA and arithmetic of checkpoints
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
    batch 12, learned positions, LayerNorm, GELU, no biases, tied embeddings, AdamW. Each run times
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
            cfg = train.TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.1, beta2=0.99)   # as nanoGPT
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

    Both corpora use GPT-2's tokenizer, so the model is the same and only the corpus size differs. Token
    files are memory-mapped, so memory should not grow with the corpus. Each run is a fresh process
    (ru_maxrss of the children is the largest child so far, so the larger corpus runs second).
    """
    import json
    import tokenizer as tk
    gpt2 = tk.load_tokenizer("gpt2", args.gpt2_files)
    folders = []
    for name, source in (("shakespeare", args.shakespeare), ("gutenberg", args.gutenberg)):
        folder = Path(f"data/tokens/bench-{name}-gpt2")
        if not (folder / "meta.json").is_file():
            tk.encode_corpus(gpt2, [source], folder, force=True)
        folders.append(folder)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; 50 steps of the main job's recipe with GPT-2's tokenizer\n")
    print("| corpus | train tokens | token files (MB) | peak RSS (MB) |")
    print("| --- | ---: | ---: | ---: |")
    for folder in folders:
        meta = json.loads((folder / "meta.json").read_text())
        file_mb = sum(path.stat().st_size for path in folder.glob("*.bin")) / 2**20
        _, peak = run_train_script(["--data", str(folder), "--max-steps", "50", "--run-name", "bench-memory", "--overwrite",
                                    "--sample-tokens", "0", "--eval-tokens", "8192"])
        print(f"| {folder.name} | {meta['train_tokens']:,} | {file_mb:.1f} | {peak:.0f} |", flush=True)


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
    train.shutdown_runtime(runtime)

ABLATIONS = {  # row name: train.py flags on top of the main job's recipe (RoPE, RMSNorm, pre-norm, GELU, dense)
    "baseline: RoPE, RMSNorm, pre-norm, GELU": [],
    "positions: learned": ["--pos", "learned"],
    "positions: sinusoidal": ["--pos", "sinusoidal"],
    "positions: ALiBi": ["--pos", "alibi"],
    "positions: none (NoPE)": ["--pos", "none"],
    "pre-norm LayerNorm": ["--norm", "layernorm"],
    "pre-norm DyT": ["--norm", "dyt"],
    "no norm": ["--norm", "none"],
    "post-norm LayerNorm": ["--norm", "layernorm", "--norm-placement", "post"],
    "post-norm RMSNorm": ["--norm-placement", "post"],
    "post-norm DyT": ["--norm", "dyt", "--norm-placement", "post"],
    "MLP SwiGLU": ["--mlp", "swiglu"],
    "MLP ReLU squared": ["--mlp", "relu2"],
    "MoE: 4 experts, top-1 (same active parameters)": ["--n-expert", "4", "--moe-top-k", "1"],
}
EXTRAPOLATED = ("baseline", "positions")   # rows also scored at twice the training context


def bench_ablation(args) -> None:
    """Architecture ablation on char-level Tiny Shakespeare: validation loss and bits per byte per option.

    Every row trains args.steps steps of the main job's recipe plus the row's flags, for args.runs seeds,
    and reports the median and the spread (max - min) of the final validation loss. Position schemes are
    also scored on windows of twice the training context; learned positions have no embedding there.
    """
    import json
    import math
    import torch
    import train
    from model import load_checkpoint

    data_dir = shakespeare_tokens(args)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; {args.steps} steps per run, median of {args.runs} seeds; "
          f"extra flags: {' '.join(args.train_args) or 'none'}\n")
    print("| option | val loss | spread | val bits/byte | val loss at 2x context | parameters (active) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, flags in ABLATIONS.items():
        if args.only and not any(word.lower() in name.lower() for word in args.only):
            continue
        results = []
        for seed in range(args.runs):
            slug = "".join(char if char.isalnum() else "-" for char in name.split(" (")[0].lower())
            run = Path("out", f"bench-ablation-{slug}-{seed}")
            run_train_script(["--data", str(data_dir), "--seed", str(seed), "--run-name", run.name, "--overwrite",
                              "--max-steps", str(args.steps), "--eval-interval", "0", "--sample-tokens", "0",
                              "--eval-tokens", str(args.eval_tokens), *args.train_args, *flags])
            final = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if "val_loss" in line][-1]
            model, _ = load_checkpoint(run)
            long_loss = float("nan")
            if name.startswith(EXTRAPOLATED) and model.config.pos != "learned":
                long_data = train.TokenData(data_dir, 2 * model.config.context_len, torch.device("cpu"))
                ones = torch.ones(model.config.vocab_size)
                long_loss, _ = train.evaluate(model, long_data, train.Runtime(), 16, args.eval_tokens, ones)
            results.append((final["val_loss"], final["val_bpb"], long_loss))
        loss, bpb, long_loss = (statistics.median(column) for column in zip(*results))
        spread = max(r[0] for r in results) - min(r[0] for r in results)
        long_text = "n/a" if math.isnan(long_loss) else f"{long_loss:.4f}"
        params = f"{model.num_params():,} ({model.num_params(active=True):,})"
        print(f"| {name} | {loss:.4f} | {spread:.4f} | {bpb:.4f} | {long_text} | {params} |", flush=True)


def bench_quantize(args) -> None:
    """Validation bits per byte, bytes and CPU generation speed of each quantization method on one checkpoint.

    Quantized rows replace the linear layers inside the blocks (quantize.py's default), so embeddings and the
    head stay float32. GPTQ calibrates on args.calib_tokens tokens of the training split. Generation is
    greedy, batch 1, args.tokens new tokens after the end-of-text token, with the KV cache.
    """
    import copy
    import torch
    import quantize
    import tokenizer as tk
    from model import load_checkpoint, read_checkpoint_config

    source, config = read_checkpoint_config(args.ckpt)
    float_model, _ = load_checkpoint(source)
    float_model.eval()
    tokenizer = tk.load_tokenizer(str(source / "tokenizer.json"))
    data = quantize.token_data(config, args.data, "cpu")
    names = quantize.select_layers(float_model, ["blocks.*"])
    hessians = quantize.calibration_hessians(float_model, data, names, args.calib_tokens, args.batch_size)
    variants = [  # label, method, group or block size, double quantization, GPTQ
        ("float32", None, 0, False, False), ("bfloat16", None, 0, False, False),
        ("int8 (per channel)", "int8", 0, False, False), ("nf4 (block 64)", "nf4", 64, False, False),
        ("nf4 + double quant", "nf4", 64, True, False), ("int4 g32", "int4", 32, False, False),
        ("int4 g128", "int4", 128, False, False), ("int4-sym g32", "int4-sym", 32, False, False),
        ("GPTQ int4 g32", "int4", 32, False, True), ("GPTQ int4 g128", "int4", 128, False, True),
    ]
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; checkpoint {source}; {args.eval_tokens:,} validation tokens; "
          f"{args.tokens} new tokens per generation run, median of {args.runs} runs\n")
    print("| weights | val bits/byte | change | quantized layers (bytes) | whole model (bytes) | model.pt (bytes) | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    float_bpb = None
    for label, method, size, double_quant, gptq in variants:
        model = copy.deepcopy(float_model)
        if method:
            quantize.quantize_model(model, method, size, double_quant, ["blocks.*"], hessians if gptq else None)
        elif label == "bfloat16":
            model = model.to(torch.bfloat16)
        sizes = quantize.size_report(float_model, model, names)
        layer_bytes, model_bytes, file_bytes = sizes["quantized" if method else label]
        _, bpb = quantize.bits_per_byte(model, data, tokenizer, args.batch_size, args.eval_tokens)
        float_bpb = float_bpb or bpb
        model.eval()
        prompt = torch.tensor([[tokenizer.eot_id]])
        seconds, _ = median_seconds(lambda: model.generate(prompt, args.tokens, temperature=0.0), args.runs)
        print(f"| {label} | {bpb:.4f} | {100 * (bpb / float_bpb - 1):+.2f}% | {layer_bytes:,} | {model_bytes:,} | "
              f"{file_bytes:,} | {args.tokens / seconds:,.0f} |", flush=True)


def bench_eval(args) -> None:
    """Evaluate checkpoints with eval.py: bits per byte on Tiny Shakespeare's validation split and on a
    Gutenberg novel, HellaSwag and PIQA (acc and acc_norm), and held-out synthetic arithmetic.

    The novel is cut to the text between Project Gutenberg's START and END lines, with CRLF as LF and
    curly single quotes as '. Every character the checkpoint's tokenizer cannot encode is then dropped,
    because a char tokenizer trained on Tiny Shakespeare has no digits and no double quotes.
    """
    import eval as evaluation
    import tokenizer as tk
    from model import find_checkpoint

    out = Path(args.out)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; HellaSwag and PIQA --limit {args.mc_limit}, "
          f"{args.arith_problems} arithmetic problems\n")
    table = []
    for checkpoint in args.ckpt:
        start = time.perf_counter()
        tokenizer = tk.load_tokenizer(str(find_checkpoint(checkpoint) / "tokenizer.json"))
        text = Path(args.novel).read_bytes().decode("utf-8-sig").replace("\r\n", "\n")
        text = text[text.index("\n", text.index("*** START OF")) + 1: text.index("*** END OF")]
        text = text.replace("\u2019", "'").replace("\u2018", "'")
        known = {char for char in set(text) if evaluation.encodes(tokenizer, char)}
        novel = out / f"{Path(args.novel).stem}-{tokenizer.hash[:12]}.txt"
        novel.parent.mkdir(parents=True, exist_ok=True)
        kept = "".join(char for char in text if char in known)
        novel.write_text(kept, encoding="utf-8")
        dropped = 1 - len(kept) / len(text)

        def run(group, tasks, *flags):
            report = out / f"{Path(checkpoint).name}-{group}.json"
            argv = ["--ckpt", checkpoint, "--tasks", tasks, "--data-dir", args.data_dir, "--out", str(report), *flags]
            try:
                return {(r["task"], r["data"], r["metric"]): r for r in evaluation.evaluate(evaluation.parse_args(argv))}
            except (ValueError, OSError) as e:
                print(f"{checkpoint}: {tasks} not evaluated: {e}")
                return {}

        results = {**run("text", f"text={args.shakespeare_tokens},text={novel}"),
                   **run("choice", "hellaswag,piqa", "--limit", str(args.mc_limit)),
                   **run("arithmetic", "arithmetic", "--arith-problems", str(args.arith_problems))}

        def cell(task, metric, data=None):
            found = [r for (t, d, m), r in results.items() if t == task and m == metric and data in (None, d)]
            if not found or found[0]["value"] is None:
                return "n/a"
            return f"{found[0]['value']:.3f}" if task == "text" else f"{100 * found[0]['value']:.1f}% (n {found[0]['n']})"

        table.append([checkpoint, cell("text", "bits_per_byte", args.shakespeare_tokens),
                      cell("text", "bits_per_byte", str(novel)) + f" ({100 * dropped:.2f}% of characters dropped)",
                      cell("hellaswag", "acc"), cell("hellaswag", "acc_norm"), cell("piqa", "acc"),
                      cell("piqa", "acc_norm"), cell("arithmetic", "exact_match"), f"{time.perf_counter() - start:.0f}"])
    print("\n| checkpoint | Shakespeare val bits/byte | novel bits/byte | HellaSwag acc | HellaSwag acc_norm | "
          "PIQA acc | PIQA acc_norm | arithmetic exact match | seconds |")
    print("| --- |" + " ---: |" * 8)
    for row in table:
        print("| " + " | ".join(row) + " |")


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

    ablation = commands.add_parser("ablation", help="architecture options compared at a fixed step budget",
                                   formatter_class=formatter)
    ablation.add_argument("--steps", type=int, default=200, help="training steps per run")
    ablation.add_argument("--runs", type=int, default=3, help="seeds per option (the median is reported)")
    ablation.add_argument("--eval-tokens", type=int, default=131072, help="validation tokens scored per evaluation")
    ablation.add_argument("--only", nargs="*", default=[], help="run only the options whose name contains one of these words")
    ablation.add_argument("--shakespeare", default=str(DATA / "tinyshakespeare" / "input.txt"), help="Tiny Shakespeare text file")
    ablation.add_argument("train_args", nargs="*", help="extra train.py flags for every run (after --)")
    ablation.set_defaults(run=bench_ablation)

    quantization = commands.add_parser("quantize", help="quality, size and speed of quantized weights", formatter_class=formatter)
    quantization.add_argument("--ckpt", default="out/main", help="float checkpoint directory or run folder")
    quantization.add_argument("--data", default="", help="token folder (default: the one in the checkpoint's config.json)")
    quantization.add_argument("--eval-tokens", type=int, default=131072, help="validation tokens scored per row")
    quantization.add_argument("--calib-tokens", type=int, default=16384, help="GPTQ calibration tokens")
    quantization.add_argument("--batch-size", type=int, default=16, help="sequences per forward in evaluation and calibration")
    quantization.add_argument("--tokens", type=int, default=200, help="new tokens per generation run")
    quantization.add_argument("--runs", type=int, default=3, help="generation runs per row (the median is reported)")
    quantization.set_defaults(run=bench_quantize)

    evaluate = commands.add_parser("eval", help="checkpoint quality: bits per byte, HellaSwag, PIQA, arithmetic",
                                   formatter_class=formatter)
    evaluate.add_argument("--ckpt", nargs="+", required=True, help="checkpoint directories or run folders")
    evaluate.add_argument("--shakespeare-tokens", default="data/tokens/tinyshakespeare-char",
                          help="token folder whose val split is scored (train.py writes this one)")
    evaluate.add_argument("--novel", default=str(DATA / "gutenberg" / "pg11_Alice-s-Adventures-in-Wonderland.txt"),
                          help="held-out Gutenberg novel")
    evaluate.add_argument("--data-dir", default=str(DATA), help="folder with eval_mc/ (HellaSwag and PIQA)")
    evaluate.add_argument("--mc-limit", type=int, default=1000, help="HellaSwag and PIQA items evaluated (eval.py --limit)")
    evaluate.add_argument("--arith-problems", type=int, default=500, help="held-out arithmetic problems evaluated")
    evaluate.add_argument("--out", default="out/bench-eval", help="folder for the filtered novel and the JSON reports")
    evaluate.set_defaults(run=bench_eval)

    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
