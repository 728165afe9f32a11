"""Generate text from a checkpoint: temperature, top-k and top-p sampling with the KV cache.

    python sample.py --ckpt out/tinyshakespeare-char --prompt "ROMEO:" --max-new-tokens 200
    python sample.py --ckpt out/run --prompt-file prompts.txt --temperature 0   # one prompt per line, batched

Reads a checkpoint directory (or a run folder, whose newest checkpoint is used): model.pt, config.json
and tokenizer.json. With one prompt and one sample, tokens are printed as they are produced. Prompts of
different lengths are generated together in one left-padded batch.
"""
import argparse
import codecs
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

import tokenizer as tok
from model import find_checkpoint
from quantize import load_any_checkpoint
from train import resolve_device


def load_model_and_tokenizer(path, device="cpu"):
    """Load a checkpoint's model (in eval mode) and its tokenizer. Returns (model, tokenizer, config dict)."""
    model, config = load_any_checkpoint(path, device)   # float or quantized
    tokenizer_file = find_checkpoint(path) / config.get("tokenizer", {}).get("file", "tokenizer.json")
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file} not found: the checkpoint has no tokenizer; copy the tokenizer JSON there")
    tokenizer = tok.load_tokenizer(str(tokenizer_file))
    expected_hash = config.get("tokenizer", {}).get("hash")
    if expected_hash and tokenizer.hash != expected_hash:
        raise ValueError(f"{tokenizer_file} is not the tokenizer this checkpoint was trained with (its hash differs "
                         "from config.json's); copy the run's own tokenizer.json there")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{tokenizer_file} has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}; "
                         "the tokenizer does not belong to this checkpoint")
    return model.eval(), tokenizer, config


def encode_prompts(tokenizer, prompts, device):
    """Encode prompts into one left-padded batch. Special-token text in a prompt (e.g. <|user|>) becomes
    that token, and an empty prompt starts from the end-of-text token. Returns (ids (B, T), pad_mask (B, T) with True on real tokens)."""
    encoded = [tokenizer.encode(p, allowed_special="all") or [tokenizer.eot_id] for p in prompts]
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), tokenizer.eot_id, dtype=torch.long)
    pad_mask = torch.zeros(len(encoded), width, dtype=torch.bool)
    for row, prompt_ids in enumerate(encoded):
        ids[row, width - len(prompt_ids):] = torch.tensor(prompt_ids)
        pad_mask[row, width - len(prompt_ids):] = True
    return ids.to(device), pad_mask.to(device)


def generate_text(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=None,
                  stop_at_eot=True, stream=None, stop_texts=()):
    """Generate a continuation for each prompt. Returns the generated texts (prompts excluded).

    stream, if given, is a file that receives the first row's text as it is produced. Each text is cut
    before the first of stop_texts it contains, and generation ends early once every row has produced a
    stop text (or the end-of-text token, with stop_at_eot).
    """
    device = next(model.parameters()).device
    ids, pad_mask = encode_prompts(tokenizer, prompts, device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    # Byte-level tokens can end inside a UTF-8 character; the incremental decoder waits for the rest.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    new_ids = []                                          # the (B,) ids of each step
    stopped = torch.zeros(len(prompts), dtype=torch.bool)
    # Every token decodes to at least one byte, so a stop text that ends at the newest token lies within this many.
    tail = max((len(text.encode("utf-8")) for text in stop_texts), default=0)

    def on_token(next_ids):
        new_ids.append(next_ids.cpu())
        if stream is not None and not (stop_at_eot and int(next_ids[0]) == tokenizer.eot_id):
            stream.write(decoder.decode(tokenizer.decode_bytes([int(next_ids[0])])))
            stream.flush()
        if not stop_texts:
            return False
        for row in torch.nonzero(~stopped).flatten().tolist():
            recent = [int(step[row]) for step in new_ids[-tail:]]
            hit_eot = stop_at_eot and recent[-1] == tokenizer.eot_id
            if hit_eot or any(text in tokenizer.decode(recent) for text in stop_texts):
                stopped[row] = True
        return bool(stopped.all())

    model.generate(ids, max_new_tokens, temperature, top_k, top_p, eos_id=tokenizer.eot_id if stop_at_eot else None,
                   pad_mask=pad_mask, generator=generator, on_token=on_token)
    rows = torch.stack(new_ids, dim=1).tolist() if new_ids else [[] for _ in prompts]
    texts = []
    for row in rows:
        if stop_at_eot and tokenizer.eot_id in row:
            row = row[: row.index(tokenizer.eot_id)]
        text = tokenizer.decode(row)
        cuts = [text.index(stop) for stop in stop_texts if stop in text]
        texts.append(text[: min(cuts)] if cuts else text)
    return texts


def parse_args(argv=None):
    parser = tok.ArgumentParser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="out/tinyshakespeare-char", help="checkpoint directory or run folder (default: %(default)s)")
    parser.add_argument("--prompt", default="", help="text to continue (default: start from end-of-text)")
    parser.add_argument("--prompt-file", default="", help="file of prompts, one per line, generated as one batch")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=300, help="tokens to generate per sample (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (0: all) (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default: %(default)s)")
    parser.add_argument("--no-stop-at-eot", action="store_true", help="keep generating past the end-of-text token")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, or float16 on CUDA (default: %(default)s)")
    return parser.parse_args(argv)


def run(args):
    if args.num_samples <= 0 or args.max_new_tokens <= 0:
        raise ValueError(f"--num-samples ({args.num_samples}) and --max-new-tokens ({args.max_new_tokens}) must be positive")
    if not args.temperature >= 0:   # NaN fails this comparison too
        raise ValueError(f"--temperature {args.temperature} must be >= 0 (0 means greedy decoding)")
    if not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ValueError(f"--top-p {args.top_p} must be in (0, 1] and --top-k {args.top_k} >= 0")
    if args.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {args.dtype!r} is not one of float32, bfloat16, float16")
    device = resolve_device(args.device)
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads} must be >= 0 (0: torch's default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype == "float16" and device != "cuda":
        raise ValueError(f"--dtype float16 needs a CUDA GPU; on {device} use bfloat16 or float32")

    prompts = [args.prompt]
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt-file {path} not found")
        try:
            prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompt-file {path} is not valid UTF-8 (byte {e.start}); save it as UTF-8 text") from None
        if not prompts:
            raise ValueError(f"--prompt-file {path} holds no prompts; write one prompt per line")
    model, tokenizer, _ = load_model_and_tokenizer(args.ckpt, device)
    prompts = [p for p in prompts for _ in range(args.num_samples)]

    amp = nullcontext() if args.dtype == "float32" else torch.autocast(device, dtype=getattr(torch, args.dtype))
    stream = sys.stdout if len(prompts) == 1 else None
    if stream is not None:
        stream.write(prompts[0])
    with amp:
        texts = generate_text(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                              args.seed, stop_at_eot=not args.no_stop_at_eot, stream=stream)
    if stream is not None:
        print()
        return texts
    for prompt, text in zip(prompts, texts):
        print(f"{prompt}{text}\n" + "-" * 40)
    return texts


def main(argv=None):
    tok.run_command(run, parse_args(argv))


if __name__ == "__main__":
    main()
