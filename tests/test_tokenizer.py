"""Tests for tokenizer.py on the real corpora: BPE training against a naive reference trainer,
tiktoken export, GPT-2 ids, round trips, bits-per-byte bookkeeping, token files, chat template
and command-line errors."""
import base64
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken

import tokenizer as tk
from tokenizer import SPECIAL_TOKENS

ROOT = Path(__file__).resolve().parent.parent

TOY_TEXT = "aaabdaaabac"
# Strings that stress the split patterns: digit runs, emoji with a skin-tone modifier, accents,
# whitespace runs, upper-case contractions and CRLF, ten in all.
SPLIT_TEST_STRINGS = [
    "12345 2024",
    "👋🏽 café",
    "a  \n\n   b\t",
    "I'VE don't",
    "x\r\ny",
    "  leading and trailing   ",
    "3.14159, 1,000,000 and 007",
    "ÜBER straße naïve 東京",
    "tabs\t\tand\r\n\r\nnewlines\n",
    "emoji 🤖🤖 and flags 🇫🇷!",
]
# GPT-2's split pattern as published with GPT-2 (tokenizer.py uses tiktoken's faster equivalent).
GPT2_PUBLISHED_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# ----------------------------------------------------------------------------------------------
# Reference: the naive BPE trainer


def merge_naive(ids, pair, new_id):
    merged, i = [], 0
    while i < len(ids):
        if ids[i : i + 2] == list(pair):
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def train_bpe_naive(texts, vocab_size, pattern):
    """Reference BPE trainer: after every merge, recount all pairs over every chunk of the text.

    It follows the rules of tokenizer.train_bpe, written the plain way. Each text is pre-split with
    the pattern after cutting out special-token text. Pairs are counted in text order, so dict
    order is first-seen order and max returns the first pair seen among equal counts. That pair is
    merged in every chunk. Returns (vocab, merges) like train_bpe.
    """
    specials = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))
    chunks = [
        list(piece.encode("utf-8"))
        for text in texts
        for part in specials.split(text)
        for piece in regex.findall(pattern, part)
    ]
    vocab = [bytes([b]) for b in range(256)]
    merges = []
    while len(vocab) < vocab_size - len(SPECIAL_TOKENS):
        counts = {}
        for ids in chunks:
            for pair in zip(ids, ids[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        pair = max(counts, key=counts.get)
        merged = vocab[pair[0]] + vocab[pair[1]]
        if merged in vocab:
            new_id = vocab.index(merged)
        else:
            new_id = len(vocab)
            vocab.append(merged)
        merges.append((pair[0], pair[1], new_id))
        chunks = [merge_naive(ids, pair, new_id) for ids in chunks]
    return vocab, merges


# ----------------------------------------------------------------------------------------------
# Fixtures


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8")  # keeps CRLF line ends, unlike read_text()


@pytest.fixture(scope="session")
def shakespeare(data_dir) -> str:
    return read_text(data_dir / "tinyshakespeare" / "input.txt")


@pytest.fixture(scope="session")
def novels(data_dir) -> dict[str, str]:
    paths = sorted((data_dir / "gutenberg").glob("*.txt"))
    assert len(paths) == 17
    return {path.name: read_text(path) for path in paths}


@pytest.fixture(scope="session")
def small_corpus(shakespeare) -> list[str]:
    """About 20 KB of Shakespeare plus the toy text and the split-pattern test strings."""
    return [shakespeare[:20_000], TOY_TEXT, *SPLIT_TEST_STRINGS]


@pytest.fixture(scope="session")
def bpe(shakespeare) -> tk.BPETokenizer:
    return tk.train_tokenizer("bpe", [shakespeare], 1024, pattern="gpt4")


@pytest.fixture(scope="session")
def bpe_gpt2_pattern(shakespeare) -> tk.BPETokenizer:
    return tk.train_tokenizer("bpe", [shakespeare], 1024, pattern="gpt2")


@pytest.fixture(scope="session")
def gpt2(data_dir) -> tk.BPETokenizer:
    return tk.load_gpt2(data_dir / "gpt2_bpe")  # encoder.json + vocab.bpe


@pytest.fixture(scope="session")
def all_kinds(shakespeare, bpe, gpt2) -> dict[str, tk.Tokenizer]:
    return {
        "byte": tk.ByteTokenizer(),
        "char": tk.train_tokenizer("char", [shakespeare, "<|>"]),  # "<|>" lets it spell special-token text
        "word": tk.train_tokenizer("word", [shakespeare], 2000),
        "bpe": bpe,
        "gpt2": gpt2,
    }


# ----------------------------------------------------------------------------------------------
# BPE training, deterministic ties


def test_bpe_toy_merges_and_encode():
    vocab, merges = tk.train_bpe([TOY_TEXT], 256 + 3 + len(SPECIAL_TOKENS))
    assert merges == [(97, 97, 256), (256, 97, 257), (257, 98, 258)]
    assert vocab[256:] == [b"aa", b"aaa", b"aaab"]

    tokenizer = tk.train_tokenizer("bpe", [TOY_TEXT], 256 + 3 + len(SPECIAL_TOKENS))
    assert tokenizer.encode(TOY_TEXT) == [258, 100, 258, 97, 99]
    assert tokenizer.encode_python(TOY_TEXT) == [258, 100, 258, 97, 99]
    assert tokenizer.decode(tokenizer.encode(TOY_TEXT)) == TOY_TEXT
    assert tokenizer.eot_id == 259  # special tokens come right after the merges


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_fast_trainer_equals_naive(small_corpus, pattern):
    vocab_size = 256 + len(SPECIAL_TOKENS) + 300
    fast_vocab, fast_merges = tk.train_bpe(small_corpus, vocab_size, tk.PATTERNS[pattern])
    naive_vocab, naive_merges = train_bpe_naive(small_corpus, vocab_size, tk.PATTERNS[pattern])
    assert len(fast_merges) == 300
    assert fast_merges == naive_merges
    assert fast_vocab == naive_vocab


def test_fast_trainer_equals_naive_with_ties():
    # Small counts make many pairs tie, so the first-seen rule decides most merges.
    texts = ["the cat sat on the mat; a bat ate the rat", "tab bat cat", TOY_TEXT, "abab baba abba"]
    vocab_size = 256 + len(SPECIAL_TOKENS) + 40
    assert tk.train_bpe(texts, vocab_size) == train_bpe_naive(texts, vocab_size, tk.GPT4_PATTERN)


def test_trainer_stops_when_no_pairs_left():
    vocab, merges = tk.train_bpe(["ab ab"], 1000)
    assert [vocab[new_id] for _, _, new_id in merges] == [b"ab", b" ab"]
    assert tk.train_bpe(["ab ab"], 1000) == train_bpe_naive(["ab ab"], 1000, tk.GPT4_PATTERN)


def test_training_independent_of_hash_seed(small_corpus):
    script = (
        "import json, sys, tokenizer\n"
        "texts = json.loads(sys.stdin.read())\n"
        "vocab, merges = tokenizer.train_bpe(texts, 256 + 7 + 200)\n"
        "print(json.dumps(merges))\n"
    )
    outputs = []
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", script], input=json.dumps(small_corpus), capture_output=True,
            text=True, cwd=ROOT, env=env, check=True,
        )
        outputs.append(json.loads(result.stdout))
    assert outputs[0] == outputs[1] == outputs[2]
    _, merges = tk.train_bpe(small_corpus, 256 + 7 + 200)
    assert outputs[0] == [list(merge) for merge in merges]


@pytest.mark.parametrize("kind", ["byte", "char", "word", "bpe", "gpt2"])
def test_round_trip_test_strings(kind, small_corpus, gpt2):
    if kind == "gpt2":
        tokenizer = gpt2
    else:
        vocab_size = {"word": 5000, "bpe": 600}.get(kind)
        tokenizer = tk.train_tokenizer(kind, small_corpus, vocab_size)
    for text in [TOY_TEXT, *SPLIT_TEST_STRINGS]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


# ----------------------------------------------------------------------------------------------
# One split pattern everywhere


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_tiktoken_export_matches_python(small_corpus, pattern):
    tokenizer = tk.train_tokenizer("bpe", small_corpus, 600, pattern=pattern)
    encoding = tokenizer.to_tiktoken()
    assert isinstance(encoding, tiktoken.Encoding)
    assert encoding._pat_str == tk.PATTERNS[pattern] == tokenizer.pattern
    assert encoding.n_vocab == tokenizer.vocab_size
    for text in SPLIT_TEST_STRINGS:
        assert encoding.encode_ordinary(text) == tokenizer.encode_python(text), text
        assert tokenizer.encode(text) == tokenizer.encode_python(text), text


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_training_uses_chosen_pattern(small_corpus, pattern):
    """The learned tokens come from chunks split by the chosen pattern: they equal train_bpe's with it."""
    tokenizer = tk.train_tokenizer("bpe", small_corpus, 600, pattern=pattern)
    vocab, _ = tk.train_bpe(small_corpus, 600, tk.PATTERNS[pattern])
    other_vocab, _ = tk.train_bpe(small_corpus, 600, tk.PATTERNS["gpt4" if pattern == "gpt2" else "gpt2"])
    assert vocab != other_vocab
    assert list(tokenizer.token_bytes[:len(vocab)]) == list(vocab)


@pytest.mark.parametrize("name", ["bpe", "bpe_gpt2_pattern", "gpt2"])
def test_tiktoken_equals_python_on_corpora(name, request, shakespeare, novels):
    tokenizer = request.getfixturevalue(name)
    alice = novels["pg11_Alice-s-Adventures-in-Wonderland.txt"]
    moby_dick = novels["pg2701_Moby-Dick--Or-The-Whale.txt"]
    for text in [shakespeare, alice, moby_dick]:
        assert tokenizer.encode_ordinary(text) == tokenizer.encode_python(text)


# ----------------------------------------------------------------------------------------------
# Special tokens


@pytest.mark.parametrize("kind", ["byte", "char", "word", "bpe", "gpt2"])
def test_special_tokens_allowed_or_raise(kind, all_kinds):
    tokenizer = all_kinds[kind]
    eot = tokenizer.special_tokens["<|endoftext|>"]
    assert eot == tokenizer.eot_id
    assert list(tokenizer.special_tokens) == SPECIAL_TOKENS
    assert list(tokenizer.special_tokens.values()) == list(range(eot, eot + len(SPECIAL_TOKENS)))
    assert tokenizer.vocab_size == eot + len(SPECIAL_TOKENS)

    text = "hi<|endoftext|>"
    assert tokenizer.encode(text, allowed_special="all") == tokenizer.encode("hi") + [eot]
    assert tokenizer.encode(text, allowed_special={"<|endoftext|>"}) == tokenizer.encode("hi") + [eot]
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        tokenizer.encode(text)
    ordinary = tokenizer.encode(text, disallowed_special=())
    assert eot not in ordinary
    assert ordinary == tokenizer.encode_ordinary(text)
    assert tokenizer.decode([eot]) == "<|endoftext|>"
    assert tokenizer.token_bytes[eot] == b""


def test_no_merge_spans_special_token():
    text = "hello<|endoftext|>world<|end|>" * 50
    tokenizer = tk.train_tokenizer("bpe", [text], 256 + len(SPECIAL_TOKENS) + 30)
    learned = tokenizer.token_bytes[256 : tokenizer.eot_id]
    assert len(learned) > 5
    assert not any(b"<" in token or b"|" in token or b">" in token for token in learned)
    assert tokenizer.encode(text[:18], allowed_special="all")[-1] == tokenizer.eot_id


@pytest.mark.parametrize("name", ["bpe", "gpt2"])
def test_tiktoken_export_special_tokens(name, request):
    tokenizer = request.getfixturevalue(name)
    encoding = tokenizer.to_tiktoken()
    text = "hi<|endoftext|> and <|user|>"
    assert encoding.encode(text, allowed_special="all") == tokenizer.encode(text, allowed_special="all")
    assert encoding.encode(text, allowed_special={"<|user|>"}, disallowed_special=()) == tokenizer.encode(
        text, allowed_special={"<|user|>"}, disallowed_special=()
    )
    with pytest.raises(ValueError):
        encoding.encode(text)
    with pytest.raises(ValueError):
        tokenizer.encode(text)
    assert encoding.encode_ordinary(text) == tokenizer.encode_ordinary(text)


# ----------------------------------------------------------------------------------------------
# Round trips on the corpora


@pytest.mark.parametrize("kind", ["byte", "bpe", "gpt2"])
def test_round_trip_exact_on_corpora(kind, all_kinds, shakespeare, novels):
    tokenizer = all_kinds[kind]
    for name, text in [("shakespeare", shakespeare), *novels.items()]:
        assert tokenizer.decode(tokenizer.encode_ordinary(text)) == text, name


def test_round_trip_char_on_corpora(shakespeare, novels):
    for name, text in [("shakespeare", shakespeare), *novels.items()]:
        tokenizer = tk.train_tokenizer("char", [text])
        assert tokenizer.decode(tokenizer.encode(text)) == text, name


def test_char_unknown_character_raises(all_kinds):
    tokenizer = all_kinds["char"]  # trained on Shakespeare, which has no "é"
    with pytest.raises(ValueError, match=r"'é' \(U\+00E9\) at position 4"):
        tokenizer.encode("caf é")


def test_round_trip_word_loses_only_unknown_pieces(all_kinds, novels):
    tokenizer = all_kinds["word"]  # trained on Shakespeare with 2000 ids
    known = set(tokenizer.words[1:])
    for name, text in novels.items():
        pieces = regex.findall(tk.WORD_PATTERN, text)
        assert "".join(pieces) == text  # the pattern covers every character
        expected = "".join(piece if piece in known else "<|unk|>" for piece in pieces)
        ids = tokenizer.encode(text)
        assert 0 in ids, name
        assert tokenizer.decode(ids) == expected, name


def test_word_vocabulary_keeps_most_frequent():
    tokenizer = tk.train_tokenizer("word", ["b a b c b a, d"], len(SPECIAL_TOKENS) + 4)
    assert tokenizer.words == ["<|unk|>", " ", "b", "a"]
    assert tokenizer.decode(tokenizer.encode("a c")) == "a <|unk|>"


def test_gpt2_special_ids(gpt2):
    assert gpt2.eot_id == 50256
    assert [gpt2.special_tokens[token] for token in SPECIAL_TOKENS] == list(range(50256, 50263))
    assert gpt2.vocab_size == 50263


GPT2_TEST_STRINGS = [
    "Hello world! This is GPT-2.",
    "Café crème brûlée, naïve façade, Ångström",
    "emoji: 👋🏽 🤖🇫🇷 ❤️",
    "numbers 3.14159 1,000,000 2024-06-01 007",
    "   spaces   then\ttabs\t\tand\n\n\nnewlines \r\n",
    "it's they're I'LL we've",
]


@pytest.mark.parametrize("source", ["encoder.json+vocab.bpe", "gpt2.tiktoken"])
def test_gpt2_matches_reference_encoding(data_dir, source):
    ranks = {}
    for line in (data_dir / "gpt2_bpe" / "gpt2.tiktoken").read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    reference = tiktoken.Encoding(
        "gpt2-reference", pat_str=GPT2_PUBLISHED_PATTERN, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )
    files = data_dir / "gpt2_bpe" if source == "encoder.json+vocab.bpe" else data_dir / "gpt2_bpe" / "gpt2.tiktoken"
    tokenizer = tk.load_gpt2(files)
    assert tokenizer.encode("Hello world") == [15496, 995]
    for text in GPT2_TEST_STRINGS:
        assert tokenizer.encode(text) == reference.encode(text), text
        assert tokenizer.encode_python(text) == reference.encode(text), text
    text = "a<|endoftext|>b"
    assert tokenizer.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")


def test_gpt2_loading_paths_agree(data_dir, gpt2):
    from_ranks = tk.load_gpt2(data_dir / "gpt2_bpe" / "gpt2.tiktoken")
    assert from_ranks.hash == gpt2.hash
    assert from_ranks.token_bytes == gpt2.token_bytes
    assert tk.load_tokenizer("gpt2", gpt2_files=data_dir / "gpt2_bpe").hash == gpt2.hash


def test_gpt2_rejects_mismatched_files(data_dir, tmp_path):
    (tmp_path / "encoder.json").write_bytes((data_dir / "gpt2_bpe" / "encoder.json").read_bytes())
    lines = (data_dir / "gpt2_bpe" / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # swap the first two merges
    (tmp_path / "vocab.bpe").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match="do not match"):
        tk.load_gpt2(tmp_path)


# ----------------------------------------------------------------------------------------------
# Bits per byte, raw bytes


BPB_STRINGS = ["wave 👋🏽 robot 🤖 flag 🇫🇷", "naïve café 東京 ok", "plain ascii text\n"]


@pytest.mark.parametrize("kind", ["byte", "char", "word", "bpe", "gpt2"])
def test_token_bytes_count_utf8_bytes(kind, all_kinds):
    tokenizer = all_kinds[kind]
    if kind in ("char", "word"):  # their vocabularies must cover the strings
        tokenizer = tk.train_tokenizer(kind, BPB_STRINGS, 100 if kind == "word" else None)
    for text in BPB_STRINGS:
        ids = tokenizer.encode(text)
        assert sum(len(tokenizer.token_bytes[i]) for i in ids) == len(text.encode("utf-8"))
    with_special = tokenizer.encode("ok<|endoftext|>\n<|end|>", allowed_special="all")
    assert sum(len(tokenizer.token_bytes[i]) for i in with_special) == len(b"ok\n")


@pytest.mark.parametrize("name", ["bpe", "gpt2"])
def test_emoji_split_across_tokens(name, request):
    tokenizer = request.getfixturevalue(name)
    ids = tokenizer.encode("👋🏽")
    assert len(ids) > 1
    partial = [i for i in ids if not is_utf8(tokenizer.token_bytes[i])]
    assert partial  # at least one token contains only part of a character
    assert sum(len(tokenizer.token_bytes[i]) for i in ids) == len("👋🏽".encode("utf-8"))


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


INVALID_UTF8 = b"ok \xff\xfe then \xe2\x82 cut, valid \xe2\x82\xac\n\x80"


@pytest.mark.parametrize("kind", ["byte", "bpe", "gpt2"])
def test_encode_bytes_lossless_on_invalid_utf8(kind, all_kinds):
    tokenizer = all_kinds[kind]
    ids = tokenizer.encode_bytes(INVALID_UTF8)
    assert tokenizer.decode_bytes(ids) == INVALID_UTF8
    assert sum(len(tokenizer.token_bytes[i]) for i in ids) == len(INVALID_UTF8)
    assert tokenizer.decode(ids) == INVALID_UTF8.decode("utf-8", errors="replace")


@pytest.mark.parametrize("kind", ["char", "word"])
def test_encode_bytes_rejects_invalid_utf8_for_text_kinds(kind, all_kinds):
    with pytest.raises(ValueError, match="byte 3"):
        all_kinds[kind].encode_bytes(INVALID_UTF8)


def test_decode_rejects_ids_outside_vocabulary(all_kinds):
    tokenizer = all_kinds["byte"]
    with pytest.raises(ValueError, match="token id -1"):
        tokenizer.decode([65, -1])
    with pytest.raises(ValueError, match="token id 263"):
        tokenizer.decode([263])


# ----------------------------------------------------------------------------------------------
# Save and load


@pytest.mark.parametrize("kind", ["byte", "char", "word", "bpe", "gpt2"])
def test_save_load_round_trip(kind, all_kinds, shakespeare, tmp_path):
    tokenizer = all_kinds[kind]
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    content = json.loads(path.read_text(encoding="utf-8"))  # human-readable JSON
    assert content["kind"] == kind
    loaded = tk.load_tokenizer(str(path))
    assert loaded.hash == tokenizer.hash
    assert loaded.kind == tokenizer.kind
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.token_bytes == tokenizer.token_bytes
    assert loaded.encode(shakespeare) == tokenizer.encode(shakespeare)
    assert [name for name in os.listdir(tmp_path)] == ["tokenizer.json"]  # no temporary file left


def test_hash_changes_with_content(shakespeare):
    first = tk.train_tokenizer("bpe", [shakespeare[:5000]], 300)
    again = tk.train_tokenizer("bpe", [shakespeare[:5000]], 300)
    larger = tk.train_tokenizer("bpe", [shakespeare[:5000]], 301)
    other_pattern = tk.train_tokenizer("bpe", [shakespeare[:5000]], 300, pattern="gpt2")
    assert first.hash == again.hash
    assert len({first.hash, larger.hash, other_pattern.hash}) == 3
    assert re.fullmatch("[0-9a-f]{64}", first.hash)


def test_load_rejects_invalid_files(tmp_path):
    bad_kind = tmp_path / "bad_kind.json"
    bad_kind.write_text(json.dumps({"kind": "morse"}))
    with pytest.raises(ValueError, match="unknown tokenizer kind 'morse'"):
        tk.load_tokenizer(str(bad_kind))
    missing_field = tmp_path / "missing.json"
    missing_field.write_text(json.dumps({"kind": "char", "special_tokens": {}}))
    with pytest.raises(ValueError, match="'vocab' is missing"):
        tk.load_tokenizer(str(missing_field))
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        tk.load_tokenizer(str(tmp_path / "nothing.json"))


# ----------------------------------------------------------------------------------------------
# Token files


def split_parts(data: bytes, val_fraction: float) -> tuple[bytes, bytes]:
    """Independent statement of the split: the cut at int(n * (1 - f)), moved to a character start."""
    cut = int(len(data) * (1 - val_fraction))
    while cut < len(data) and data[cut] & 0xC0 == 0x80:
        cut += 1
    return data[:cut], data[cut:]


@pytest.fixture(scope="session")
def token_file_inputs(data_dir, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("inputs")
    multibyte = folder / "multibyte.txt"
    multibyte.write_text("Grüße aus Köln 👋🏽\n" * 400 + "déjà vu <|endoftext|> <|user|>\n", encoding="utf-8")
    return [
        data_dir / "tinyshakespeare" / "input.txt",
        data_dir / "gutenberg" / "pg11_Alice-s-Adventures-in-Wonderland.txt",  # BOM and CRLF
        multibyte,
    ]


@pytest.mark.parametrize("kind", ["byte", "char", "word", "bpe", "bpe_gpt2_pattern", "gpt2"])
@pytest.mark.parametrize("chunk_bytes", [4096, 2**20])
def test_token_files_equal_direct_encoding(kind, chunk_bytes, request, token_file_inputs, tmp_path):
    if kind == "char":
        tokenizer = tk.build_char_tokenizer(token_file_inputs)
    elif kind == "word":
        tokenizer = request.getfixturevalue("all_kinds")["word"]
    elif kind == "byte":
        tokenizer = tk.ByteTokenizer()
    else:
        tokenizer = request.getfixturevalue(kind)
    out = tmp_path / "tokens"
    inputs = [str(path) for path in token_file_inputs]
    meta = tk.encode_corpus(tokenizer, inputs, out, val_fraction=0.1, chunk_bytes=chunk_bytes)

    assert sorted(os.listdir(out)) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert tk.read_token_meta(out) == meta
    assert meta["tokenizer"] == tokenizer.kind
    assert meta["tokenizer_hash"] == tokenizer.hash
    assert meta["vocab_size"] == tokenizer.vocab_size
    assert meta["eot_id"] == tokenizer.eot_id
    assert meta["dtype"] == "uint16"
    assert meta["sources"] == [str(path) for path in token_file_inputs]
    assert tk.load_tokenizer(str(out / "tokenizer.json")).hash == tokenizer.hash

    expected = {"train": [], "val": []}
    n_bytes = {"train": 0, "val": 0}
    for path in token_file_inputs:
        for split, part in zip(("train", "val"), split_parts(path.read_bytes(), 0.1)):
            expected[split] += tokenizer.encode_ordinary(part.decode("utf-8")) + [tokenizer.eot_id]
            n_bytes[split] += len(part)
    for split in ("train", "val"):
        tokens = tk.load_tokens(out, split)
        assert isinstance(tokens, np.memmap)
        assert tokens.dtype == np.uint16
        assert tokens.tolist() == expected[split]
        assert meta[f"{split}_tokens"] == len(expected[split])
        assert meta[f"{split}_bytes"] == n_bytes[split]


def test_token_files_split_like_nanogpt(data_dir, tmp_path):
    path = data_dir / "tinyshakespeare" / "input.txt"
    data = path.read_bytes()
    meta = tk.encode_corpus(tk.ByteTokenizer(), [str(path)], tmp_path / "out")
    n = len(data)
    assert meta["train_bytes"] == int(n * 0.9)
    train = tk.load_tokens(tmp_path / "out", "train")
    assert bytes(train[:-1].astype(np.uint8)) == data[: int(n * 0.9)]
    assert train[-1] == 256


def test_split_moves_to_character_boundary(tmp_path):
    path = tmp_path / "euro.txt"
    path.write_text("€" * 10, encoding="utf-8")  # 30 bytes; int(30 * 0.9) = 27 is a character start
    meta = tk.encode_corpus(tk.ByteTokenizer(), [str(path)], tmp_path / "a", val_fraction=0.1)
    assert meta["train_bytes"] == 27
    meta = tk.encode_corpus(tk.ByteTokenizer(), [str(path)], tmp_path / "b", val_fraction=0.15)
    assert meta["train_bytes"] == 27  # int(30 * 0.85) = 25 is inside a character, moved on to 27
    assert meta["val_bytes"] == 3


def random_whitespace_text(seed: int, n_pieces: int) -> str:
    rng = random.Random(seed)
    pieces = ["word", "Word", " ", "  ", "\n", "\r\n", "\t", ".", "!?", "12345", "'s", "é", "👋🏽", "\n\n", " \n"]
    return "".join(rng.choice(pieces) for _ in range(n_pieces))


@pytest.mark.parametrize("kind", ["bpe", "bpe_gpt2_pattern", "gpt2", "word"])
def test_chunk_cuts_keep_ids_with_whitespace_runs(kind, request, tmp_path):
    tokenizer = request.getfixturevalue("all_kinds")["word"] if kind == "word" else request.getfixturevalue(kind)
    text = random_whitespace_text(seed=0, n_pieces=20_000)
    path = tmp_path / "mixed.txt"
    path.write_bytes(text.encode("utf-8"))
    meta = tk.encode_corpus(tokenizer, [str(path)], tmp_path / "out", val_fraction=0.0, chunk_bytes=64)
    assert meta["val_tokens"] == 0
    assert tk.load_tokens(tmp_path / "out", "val").size == 0
    assert tk.load_tokens(tmp_path / "out", "train").tolist() == tokenizer.encode_ordinary(text) + [tokenizer.eot_id]


def test_read_chunks_cut_many_times(tmp_path):
    path = tmp_path / "lines.txt"
    data = b"".join(b"line %d\n" % i for i in range(1000))
    path.write_bytes(data)
    chunks = list(tk.read_chunks(path, 0, len(data), 100, cut_before_newline=False))
    assert len(chunks) > 50
    assert b"".join(chunk for _, chunk in chunks) == data
    assert all(chunk.endswith(b"\n") for _, chunk in chunks)
    assert [offset for offset, _ in chunks] == list(np.cumsum([0] + [len(chunk) for _, chunk in chunks[:-1]]))
    before = list(tk.read_chunks(path, 0, len(data), 100, cut_before_newline=True))
    assert all(chunk.startswith(b"\n") for _, chunk in before[1:])


def test_token_files_keep_invalid_utf8_for_byte_level(gpt2, tmp_path):
    path = tmp_path / "raw.txt"
    path.write_bytes(INVALID_UTF8 * 50)
    tk.encode_corpus(gpt2, [str(path)], tmp_path / "out", val_fraction=0.0, chunk_bytes=64)
    ids = tk.load_tokens(tmp_path / "out", "train")
    assert gpt2.decode_bytes(ids) == INVALID_UTF8 * 50 + b"<|endoftext|>"


def test_token_files_use_uint32_for_large_vocabulary(tmp_path):
    words = ["<|unk|>", "a", " "] + [f"w{i}" for i in range(70_000)]
    tokenizer = tk.WordTokenizer(words)
    path = tmp_path / "text.txt"
    path.write_text("a a b\n", encoding="utf-8")
    meta = tk.encode_corpus(tokenizer, [str(path)], tmp_path / "out", val_fraction=0.0)
    assert meta["dtype"] == "uint32"
    assert tk.load_tokens(tmp_path / "out", "train").tolist() == [1, 2, 1, 2, 0, 0, tokenizer.eot_id]


def test_find_text_files(tmp_path):
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("a")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "README.md").write_text("not corpus text")
    (tmp_path / ".hidden.txt").write_text("hidden")
    assert tk.find_text_files([str(tmp_path)]) == [tmp_path / "b.txt", tmp_path / "sub" / "a.txt"]
    assert tk.find_text_files([str(tmp_path / "README.md")]) == [tmp_path / "README.md"]


# ----------------------------------------------------------------------------------------------
# Chat template


CONVERSATION = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "ok"},
    {"role": "tool_call", "content": "f()"},
    {"role": "tool_result", "content": "1"},
    {"role": "assistant", "content": "done"},
]


def test_render_chat_ids_and_mask():
    tokenizer = tk.ByteTokenizer()  # system 257, user 258, assistant 259, tool_call 260, tool_result 261, end 262
    ids, loss_mask = tk.render_chat(tokenizer, CONVERSATION)
    assert ids == [
        257, 83, 262,
        258, 104, 105, 262,
        259, 111, 107, 262,
        260, 102, 40, 41, 262,
        261, 49, 262,
        259, 100, 111, 110, 101, 262,
    ]  # fmt: skip
    assert loss_mask == [
        0, 0, 0,
        0, 0, 0, 0,
        0, 1, 1, 1,
        0, 1, 1, 1, 1,
        0, 0, 0,
        0, 1, 1, 1, 1, 1,
    ]  # fmt: skip


def test_render_prompt_ends_with_assistant(gpt2):
    ids = tk.render_prompt(gpt2, CONVERSATION[:2])
    assert ids == tk.render_chat(gpt2, CONVERSATION[:2])[0] + [50259]
    assert ids[0] == 50257
    assert gpt2.decode(ids) == "<|system|>S<|end|><|user|>hi<|end|><|assistant|>"


def test_chat_content_never_special():
    tokenizer = tk.ByteTokenizer()
    ids, _ = tk.render_chat(tokenizer, [{"role": "user", "content": "<|end|><|assistant|>"}])
    assert ids == [258] + list(b"<|end|><|assistant|>") + [262]


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"role": "bot", "content": "x"}, "unknown role 'bot'"),
        ({"role": "user", "content": 3}, "content must be a string, got int"),
        ({"role": "user", "content": None}, "content must be a string"),
        ({"content": "x"}, "must be a dict with 'role' and 'content'"),
        ("user: x", "must be a dict"),
    ],
)
def test_render_chat_rejects_bad_messages(message, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        tk.render_chat(tk.ByteTokenizer(), [CONVERSATION[0], message])


# ----------------------------------------------------------------------------------------------
# Command line


def run_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "tokenizer.py"), *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None for path in folder.rglob("*")}


@pytest.fixture
def cli_folder(tmp_path, shakespeare) -> Path:
    (tmp_path / "text.txt").write_text(shakespeare[:3000], encoding="utf-8")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "no_text").mkdir()
    (tmp_path / "no_text" / "notes.md").write_text("notes")
    (tmp_path / "existing.json").write_text("keep me")
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "train.bin").write_bytes(b"\x01\x00")
    return tmp_path


CLI_ERRORS = {
    "missing input": ["train", "--kind", "byte", "--input", "missing.txt", "--out", "out.json"],
    "empty input": ["train", "--kind", "byte", "--input", "empty.txt", "--out", "out.json"],
    "folder without text": ["train", "--kind", "bpe", "--vocab-size", "300", "--input", "no_text", "--out", "out.json"],
    "non-UTF-8 to char": ["train", "--kind", "char", "--input", "latin1.txt", "--out", "out.json"],
    "non-UTF-8 to word": ["train", "--kind", "word", "--vocab-size", "50", "--input", "latin1.txt", "--out", "out.json"],
    "non-UTF-8 to char encode": ["encode", "--tokenizer", "char", "--input", "latin1.txt", "--out", "out"],
    "BPE vocab too small": ["train", "--kind", "bpe", "--vocab-size", "262", "--input", "text.txt", "--out", "out.json"],
    "word vocab too small": ["train", "--kind", "word", "--vocab-size", "8", "--input", "text.txt", "--out", "out.json"],
    "vocab size for char": ["train", "--kind", "char", "--vocab-size", "100", "--input", "text.txt", "--out", "out.json"],
    "unknown kind": ["train", "--kind", "morse", "--input", "text.txt", "--out", "out.json"],
    "unknown pattern": ["train", "--kind", "bpe", "--vocab-size", "300", "--pattern", "gpt3", "--input", "text.txt"],
    "existing tokenizer file": ["train", "--kind", "byte", "--input", "text.txt", "--out", "existing.json"],
    "existing token files": ["encode", "--tokenizer", "byte", "--input", "text.txt", "--out", "tokens"],
    "train out under a file": ["train", "--kind", "byte", "--input", "text.txt", "--out", "text.txt/tok.json"],
    "encode out under a file": ["encode", "--tokenizer", "byte", "--input", "text.txt", "--out", "text.txt/tokens"],
    "encode out is a file": ["encode", "--tokenizer", "byte", "--input", "text.txt", "--out", "existing.json", "--force"],
    "unknown tokenizer": ["encode", "--tokenizer", "nothing.json", "--input", "text.txt", "--out", "out"],
    "invalid tokenizer file": ["encode", "--tokenizer", "existing.json", "--input", "text.txt", "--out", "out"],
    "missing GPT-2 files": ["encode", "--tokenizer", "gpt2", "--gpt2-files", "no_text", "--input", "text.txt",
                            "--out", "out"],
    "val fraction": ["encode", "--tokenizer", "byte", "--input", "text.txt", "--out", "out", "--val-fraction", "1.5"],
    "show without text": ["show", "--tokenizer", "byte"],
    "no subcommand": [],
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_bad_input(case, cli_folder):
    before = snapshot(cli_folder)
    result = run_cli(*CLI_ERRORS[case], cwd=cli_folder)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    assert snapshot(cli_folder) == before


def test_cli_error_names_value_and_fix(cli_folder):
    result = run_cli(*CLI_ERRORS["BPE vocab too small"], cwd=cli_folder)
    assert "262" in result.stderr
    assert "--vocab-size 263" in result.stderr
    result = run_cli(*CLI_ERRORS["existing token files"], cwd=cli_folder)
    assert "train.bin" in result.stderr
    assert "--force" in result.stderr
    result = run_cli(*CLI_ERRORS["non-UTF-8 to char"], cwd=cli_folder)
    assert "latin1.txt" in result.stderr
    assert "byte 3" in result.stderr


def test_cli_train_encode_show(cli_folder, data_dir):
    result = run_cli("train", "--kind", "bpe", "--vocab-size", "300", "--pattern", "gpt2", "--input", "text.txt",
                     cwd=cli_folder)
    assert result.returncode == 0, result.stderr
    assert "bytes per token" in result.stdout
    tokenizer = tk.load_tokenizer(str(cli_folder / "tokenizer.json"))
    assert (tokenizer.kind, tokenizer.vocab_size, tokenizer.pattern) == ("bpe", 300, tk.GPT2_PATTERN)

    result = run_cli("train", "--kind", "bpe", "--vocab-size", "310", "--input", "text.txt", "--force", cwd=cli_folder)
    assert result.returncode == 0, result.stderr
    assert tk.load_tokenizer(str(cli_folder / "tokenizer.json")).vocab_size == 310

    result = run_cli("encode", "--tokenizer", "tokenizer.json", "--input", "text.txt", "--out", "bpe_tokens",
                     cwd=cli_folder)
    assert result.returncode == 0, result.stderr
    assert tk.read_token_meta(cli_folder / "bpe_tokens")["vocab_size"] == 310

    result = run_cli("encode", "--tokenizer", "gpt2", "--gpt2-files", data_dir / "gpt2_bpe", "--input", "text.txt",
                     "--out", "tokens", "--force", "--val-fraction", "0.2", cwd=cli_folder)
    assert result.returncode == 0, result.stderr
    meta = tk.read_token_meta(cli_folder / "tokens")
    assert (meta["tokenizer"], meta["eot_id"], meta["val_fraction"]) == ("gpt2", 50256, 0.2)

    result = run_cli("show", "--tokenizer", "gpt2", "--gpt2-files", data_dir / "gpt2_bpe", "--text", "Hello world<|end|>",
                     cwd=cli_folder)
    assert result.returncode == 0, result.stderr
    assert "15496  'Hello'" in result.stdout
    assert "50262  <|end|>" in result.stdout


@pytest.mark.parametrize("command", ["train", "encode", "show"])
def test_cli_help_lists_flags_with_defaults(command, cli_folder):
    result = run_cli(command, "--help", cwd=cli_folder)
    assert result.returncode == 0
    flags = {
        "train": ["--kind", "--vocab-size", "--pattern", "--input", "--out", "--force"],
        "encode": ["--tokenizer", "--input", "--out", "--val-fraction", "--gpt2-files", "--force"],
        "show": ["--tokenizer", "--text", "--file", "--gpt2-files"],
    }[command]
    for flag in flags:
        assert flag in result.stdout
    assert "default:" in result.stdout
