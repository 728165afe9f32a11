"""Tokenizers: char, byte, word, byte-level BPE (trained here) and GPT-2 (through tiktoken).

The first stage of llm-stages. Every kind shares one interface (encode, decode, token_bytes,
special tokens, a JSON file, an identity hash) and reserves the same special tokens, which the chat
template below uses. The command line trains a tokenizer, turns text files into the token files
that train.py reads, and shows how a text splits:

    python tokenizer.py train --kind bpe --vocab-size 1024 --input data/tinyshakespeare --out tokenizer.json
    python tokenizer.py encode --tokenizer tokenizer.json --input data/tinyshakespeare --out data/shakespeare
    python tokenizer.py show --tokenizer gpt2 --text "Hello world"

Reads text files (UTF-8; the byte and BPE kinds also take invalid UTF-8). Writes a tokenizer JSON
file, or a folder with train.bin, val.bin, meta.json and tokenizer.json.
"""
import argparse
import base64
import functools
import hashlib
import heapq
import itertools
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import regex  # the split patterns need \p{L} classes and possessive quantifiers
import tiktoken

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool_call|>", "<|tool_result|>", "<|end|>"
]
CHAT_ROLES = ["system", "user", "assistant", "tool_call", "tool_result"]
TRAINED_ROLES = {"assistant", "tool_call"}  # the roles whose tokens the model writes, so loss_mask is 1
KINDS = ["char", "byte", "word", "bpe"]

# Pre-split patterns, copied from tiktoken 0.14 (tiktoken_ext/openai_public.py): GPT-2's (r50k_base,
# equivalent to the one in GPT-2's release) and GPT-4's (cl100k_base).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
# Word tokenizer: runs of letters, runs of digits, runs of whitespace, and any other character alone.
WORD_PATTERN = r"""\p{L}+|\p{N}+|\s+|[^\s\p{L}\p{N}]"""
UNK_TOKEN = "<|unk|>"

# surrogateescape decoding turns each invalid UTF-8 byte into one code point in this range
INVALID_BYTES = re.compile("([\udc80-\udcff]+)")


def gpt2_byte_alphabet() -> list[str]:
    """Return GPT-2's printable stand-in character for each byte value, indexed by byte.

    encoder.json and vocab.bpe write token bytes with these characters (a space is "Ġ"), and so do
    the BPE tokenizer files here. Printable Latin-1 bytes stand for themselves; the other 68 bytes
    map in order to chr(256), chr(257), ...
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    alphabet = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [alphabet[b] for b in range(256)]


BYTE_ALPHABET = gpt2_byte_alphabet()
BYTE_OF_CHAR = {char: b for b, char in enumerate(BYTE_ALPHABET)}


@functools.lru_cache(maxsize=64)
def special_token_regex(tokens: frozenset) -> re.Pattern:
    """Compile a regex that finds any of the tokens; its one group makes re.split keep them."""
    alternatives = sorted(tokens, key=len, reverse=True)  # so a token that is a prefix of another never wins
    return re.compile("(" + "|".join(re.escape(token) for token in alternatives) + ")")


# ----------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer:
    """Base class: special tokens, encode with special-token rules, decode, JSON file and hash.

    Ids 0..n-1 are the regular vocabulary (token_bytes[i] is what id i stands for, used for
    bits-per-byte) and the SPECIAL_TOKENS follow in order at n..n+6. A subclass sets its vocabulary
    and implements encode_ordinary and to_dict.
    """

    kind: str
    byte_level = False  # True where every byte value has a token, so any bytes encode losslessly
    cut_before_newline = False  # where a safe chunk cut lies around a newline, see read_chunks

    def __init__(self, vocab: list[bytes], decoded: list[bytes] | None = None):
        n = len(vocab)
        self.special_tokens = {token: n + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.eot_id = self.special_tokens["<|endoftext|>"]
        self.vocab_size = n + len(SPECIAL_TOKENS)
        self.token_bytes = list(vocab) + [b""] * len(SPECIAL_TOKENS)  # special tokens stand for no text
        # decode writes special tokens (and word's <|unk|>) as their names
        self._decoded = list(decoded or vocab) + [token.encode() for token in SPECIAL_TOKENS]
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        self.hash = hashlib.sha256(canonical.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"<{self.kind} tokenizer: vocab_size {self.vocab_size}, hash {self.hash[:12]}>"

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token text as ordinary text."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode each text with encode_ordinary."""
        return [self.encode_ordinary(text) for text in texts]

    def encode(self, text: str, allowed_special=frozenset(), disallowed_special="all") -> list[int]:
        """Encode text with tiktoken's rules for special-token text.

        Text of an allowed special token (allowed_special: a set of names, or "all") becomes its
        id. Text of a disallowed one (by default every special token not allowed) raises
        ValueError. Special-token text in neither set is encoded as ordinary text.
        """
        specials = set(self.special_tokens)
        allowed = specials if allowed_special == "all" else specials & set(allowed_special)
        disallowed = specials - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed and (match := special_token_regex(frozenset(disallowed)).search(text)):
            raise ValueError(
                f"text contains the special token {match.group()!r} at position {match.start()}; pass "
                f"allowed_special={{{match.group()!r}}} to encode it as that token, or use encode_ordinary "
                "to encode it as text"
            )
        if not allowed:
            return self.encode_ordinary(text)

        ids = []
        for i, piece in enumerate(special_token_regex(frozenset(allowed)).split(text)):
            if i % 2 == 1:  # re.split puts the matched special tokens at odd indices
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self.encode_ordinary(piece))
        return ids

    def encode_bytes(self, data: bytes) -> list[int]:
        """Encode raw bytes as ordinary text; decode_bytes gives them back.

        Byte-level kinds (byte, bpe, gpt2) take any bytes: each run of valid UTF-8 is encoded as
        text, and each invalid byte becomes its single-byte token. Char and word raise ValueError
        on invalid UTF-8.
        """
        try:
            return self.encode_ordinary(data.decode("utf-8"))
        except UnicodeDecodeError as error:
            if not self.byte_level:
                raise ValueError(
                    f"data is not valid UTF-8 (byte {error.start}); the {self.kind} tokenizer encodes "
                    "text, so decode it first or use a byte or BPE tokenizer"
                ) from None
        ids = []
        text = data.decode("utf-8", errors="surrogateescape")
        for i, piece in enumerate(INVALID_BYTES.split(text)):
            if i % 2 == 1:  # a run of invalid bytes
                ids.extend(self._byte_ids[b] for b in piece.encode("utf-8", errors="surrogateescape"))
            elif piece:
                ids.extend(self.encode_ordinary(piece))
        return ids

    def decode_bytes(self, ids) -> bytes:
        """Return the bytes the ids stand for; a special token gives its name, e.g. b"<|end|>"."""
        ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
        invalid = [i for i in ids if not 0 <= i < self.vocab_size]
        if invalid:
            raise ValueError(f"token id {invalid[0]} is outside the vocabulary (ids 0..{self.vocab_size - 1})")
        return b"".join(map(self._decoded.__getitem__, ids))

    def decode(self, ids) -> str:
        """Decode ids to text; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        """Return the JSON content that defines this tokenizer (what save writes and hash hashes)."""
        raise NotImplementedError

    def save(self, path) -> None:
        """Write the tokenizer as a human-readable JSON file (load it with load_tokenizer)."""
        write_atomic(Path(path), json.dumps(self.to_dict(), ensure_ascii=False, indent=1).encode("utf-8"))


class ByteTokenizer(Tokenizer):
    """The 256 byte values of the UTF-8 encoding: lossless for any input, vocab_size 263."""

    kind = "byte"
    byte_level = True

    def __init__(self):
        self._byte_ids = list(range(256))
        super().__init__([bytes([b]) for b in range(256)])

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "special_tokens": self.special_tokens}


class CharTokenizer(Tokenizer):
    """One token per character, from the sorted set of the training text's characters (nanoGPT's
    Shakespeare tokenizer).

    An unknown character raises ValueError naming it and its position; there is no unknown token,
    so every encoded text decodes exactly and bits-per-byte stays exact.
    """

    kind = "char"

    def __init__(self, chars: list[str]):
        if not chars or sorted(set(chars)) != list(chars) or any(len(char) != 1 for char in chars):
            raise ValueError("a char vocabulary must be a non-empty sorted list of distinct characters")
        self.chars = list(chars)
        self._codepoints = np.array([ord(char) for char in chars], dtype=np.uint32)  # sorted
        super().__init__([char.encode("utf-8") for char in chars])

    def encode_ordinary(self, text: str) -> list[int]:
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codepoints, codepoints).clip(max=len(self.chars) - 1)
        unknown = np.flatnonzero(self._codepoints[ids] != codepoints)
        if unknown.size:
            position = int(unknown[0])
            raise ValueError(
                f"character {text[position]!r} (U+{ord(text[position]):04X}) at position {position} is not "
                f"in the char vocabulary of {len(self.chars)} characters; train the char tokenizer on text "
                "that contains it"
            )
        return ids.tolist()

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab": self.chars, "special_tokens": self.special_tokens}


class WordTokenizer(Tokenizer):
    """Words, numbers, whitespace runs and single punctuation characters (WORD_PATTERN), with the
    most frequent ones of the training text as vocabulary and id 0 for <|unk|>.

    What a round trip loses: decode(encode(text)) is the text with each piece that is not in the
    vocabulary replaced by "<|unk|>". Everything else comes back exactly, whitespace included.
    token_bytes of <|unk|> is b"", so bits-per-byte undercounts texts that contain unknown pieces.
    """

    kind = "word"

    def __init__(self, words: list[str], pattern: str = WORD_PATTERN):
        if pattern != WORD_PATTERN:  # read_chunks relies on this pattern's piece boundaries
            raise ValueError(f"unknown word split pattern {pattern!r}; word tokenizers use WORD_PATTERN")
        if not words or words[0] != UNK_TOKEN or len(set(words)) != len(words):
            raise ValueError(f"a word vocabulary must start with {UNK_TOKEN!r} and list each word once")
        self.words = list(words)
        self.pattern = pattern
        self._split = regex.compile(pattern)
        self._ids = {word: i for i, word in enumerate(words)}
        encoded = [word.encode("utf-8") for word in words]
        super().__init__([b""] + encoded[1:], decoded=encoded)

    def encode_ordinary(self, text: str) -> list[int]:
        ids = self._ids
        return [ids.get(word, 0) for word in self._split.findall(text)]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "pattern": self.pattern, "vocab": self.words,
                "special_tokens": self.special_tokens}


class BPETokenizer(Tokenizer):
    """Byte-level BPE: the kind "bpe" trained by train_bpe, or GPT-2's vocabulary ("gpt2").

    Id, rank and merge priority are the same number, so the vocabulary alone defines the encoder:
    split text with the pattern, then in each piece repeatedly merge the adjacent pair whose
    concatenation has the lowest rank. encode_ordinary runs that in tiktoken (exported by
    to_tiktoken) and encode_python in plain Python; the two give the same ids.
    """

    byte_level = True

    def __init__(self, vocab: list[bytes], pattern: str, kind: str = "bpe"):
        if pattern not in PATTERNS.values():
            raise ValueError(f"unknown BPE split pattern {pattern!r}; use GPT2_PATTERN or GPT4_PATTERN")
        self.kind = kind
        self.pattern = pattern
        self.ranks = {token: rank for rank, token in enumerate(vocab)}
        if len(self.ranks) != len(vocab) or any(bytes([b]) not in self.ranks for b in range(256)):
            raise ValueError("a BPE vocabulary must list each token once and contain all 256 single bytes")
        self._byte_ids = [self.ranks[bytes([b])] for b in range(256)]
        self._split = regex.compile(pattern)
        self.cut_before_newline = pattern == GPT2_PATTERN
        super().__init__(vocab)
        self._encoding = tiktoken.Encoding(
            f"llm-stages-{kind}-{self.hash[:12]}",
            pat_str=pattern,
            mergeable_ranks=self.ranks,
            special_tokens=self.special_tokens,
        )

    def to_tiktoken(self) -> tiktoken.Encoding:
        """Return the tiktoken.Encoding with this pattern, ranks and special tokens."""
        return self._encoding

    def encode_ordinary(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._encoding.encode_ordinary_batch(texts)  # encodes on 8 threads

    def encode_python(self, text: str) -> list[int]:
        """Encode like encode_ordinary, in plain Python (the reference for the tiktoken path)."""
        ids, cache = [], {}
        for piece in self._split.findall(text):
            if piece not in cache:
                cache[piece] = self._merge_by_rank(piece.encode("utf-8"))
            ids.extend(cache[piece])
        return ids

    def _merge_by_rank(self, piece: bytes) -> list[int]:
        if piece in self.ranks:  # tiktoken maps a piece that is a whole token straight to it
            return [self.ranks[piece]]
        parts = [piece[i : i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            pair_ranks = [self.ranks.get(left + right, len(self.ranks)) for left, right in zip(parts, parts[1:])]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)  # leftmost on ties, as tiktoken
            if pair_ranks[best] == len(self.ranks):  # no adjacent pair is a token
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        return [self.ranks[part] for part in parts]

    def to_dict(self) -> dict:
        vocab = ["".join(BYTE_ALPHABET[b] for b in token) for token in self.token_bytes[: len(self.ranks)]]
        return {"kind": self.kind, "pattern": self.pattern, "vocab": vocab, "special_tokens": self.special_tokens}


# ----------------------------------------------------------------------------------------------
# Training


def count_chunks(texts: list[str], pattern: str) -> Counter:
    """Count the pieces the pattern splits the texts into, in order of first appearance.

    Special-token text is cut out first, so no learned word or merge contains one.
    """
    split = regex.compile(pattern)
    counts = Counter()
    for text in texts:
        for part in special_token_regex(frozenset(SPECIAL_TOKENS)).split(text)[::2]:
            counts.update(split.findall(part))
    return counts


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each occurrence of pair in ids, left to right and not overlapping, with new_id."""
    merged, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def train_bpe(texts: list[str], vocab_size: int, pattern: str = GPT4_PATTERN):
    """Learn byte-level BPE merges from texts; return (vocab, merges).

    vocab lists the bytes of ids 0..vocab_size-8 (the bytes 0..255, then one token per merge), and
    merges lists (left id, right id, merged id) in the order learned. Each step merges the most
    frequent adjacent pair. On a tie the pair seen first in the current text wins: in the earliest
    chunk (in order of first appearance), then at the earliest position in it. No step depends on
    hash order, so PYTHONHASHSEED changes nothing.

    Speed: the trainer counts pairs once over the unique chunks weighted by their counts, and after
    a merge recounts only the chunks that contained the merged pair. A heap contains (-count, pair)
    entries, and an entry whose count has changed since it was pushed is skipped as stale.

    When a pair's concatenated bytes already form a token, the pair merges into that token and no
    id is added, so every token's bytes are distinct (tiktoken requires that). Training stops early
    when no adjacent pair is left.
    """
    chunk_counts = count_chunks(texts, pattern)
    chunks = [list(chunk.encode("utf-8", errors="surrogateescape")) for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    vocab = [bytes([b]) for b in range(256)]
    token_ids = {token: i for i, token in enumerate(vocab)}

    pair_counts = defaultdict(int)  # pair -> occurrences in the text
    pair_chunks = defaultdict(set)  # pair -> indices of the chunks that contain it
    for c, ids in enumerate(chunks):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += counts[c]
            pair_chunks[pair].add(c)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges = []
    while len(vocab) < vocab_size - len(SPECIAL_TOKENS):
        pair = pop_most_frequent_pair(heap, pair_counts, pair_chunks, chunks)
        if pair is None:
            break
        merged = vocab[pair[0]] + vocab[pair[1]]
        new_id = token_ids.get(merged)  # NOTE: no test text has yet produced an existing token here
        if new_id is None:
            new_id = token_ids[merged] = len(vocab)
            vocab.append(merged)
        merges.append((pair[0], pair[1], new_id))

        count_changes = defaultdict(int)
        for c in list(pair_chunks[pair]):
            old, new = chunks[c], merge_pair(chunks[c], pair, new_id)
            chunks[c] = new
            for old_pair in zip(old, old[1:]):
                count_changes[old_pair] -= counts[c]
            for new_pair in zip(new, new[1:]):
                count_changes[new_pair] += counts[c]
            old_pairs, new_pairs = set(zip(old, old[1:])), set(zip(new, new[1:]))
            for removed_pair in old_pairs - new_pairs:
                pair_chunks[removed_pair].discard(c)
            for added_pair in new_pairs - old_pairs:
                pair_chunks[added_pair].add(c)
        for changed, change in count_changes.items():
            if change:
                pair_counts[changed] += change
                heapq.heappush(heap, (-pair_counts[changed], changed))
    return vocab, merges


def pop_most_frequent_pair(heap, pair_counts, pair_chunks, chunks):
    """Pop the most frequent pair from the heap, the one seen first in the text among equal
    counts; return None when no pair is left."""
    ties, top_count = set(), 0
    while heap and (not ties or -heap[0][0] == top_count):
        negative_count, pair = heapq.heappop(heap)
        if -negative_count > 0 and pair_counts[pair] == -negative_count:  # else a stale entry
            ties.add(pair)
            top_count = -negative_count
    if len(ties) <= 1:
        return ties.pop() if ties else None

    def first_position(pair):
        c = min(pair_chunks[pair])
        ids = chunks[c]
        return c, next(i for i in range(len(ids) - 1) if (ids[i], ids[i + 1]) == pair)

    best = min(ties, key=first_position)
    for pair in ties - {best}:
        heapq.heappush(heap, (-top_count, pair))
    return best


def train_tokenizer(kind: str, texts: list[str], vocab_size: int | None = None, pattern: str = "gpt4") -> Tokenizer:
    """Build a tokenizer of kind char, byte, word or bpe from texts.

    vocab_size counts all ids, special tokens included. It is required for word (at least 9) and
    bpe (at least 263: 256 bytes and 7 special tokens), and must be None for char (the text's
    characters set it) and byte (always 263). pattern ("gpt2" or "gpt4") is BPE's split pattern.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind in ("char", "byte") and vocab_size is not None:
        raise ValueError(f"the {kind} tokenizer's vocabulary size is fixed by its kind; leave out --vocab-size")
    minimum = {"word": len(SPECIAL_TOKENS) + 2, "bpe": 256 + len(SPECIAL_TOKENS)}.get(kind)
    if minimum and (vocab_size is None or vocab_size < minimum):
        raise ValueError(f"vocab size {vocab_size} is too small for {kind}; use --vocab-size {minimum} or more")
    if pattern not in PATTERNS:
        raise ValueError(f"unknown split pattern {pattern!r}; use gpt2 or gpt4")
    if not any(texts):
        raise ValueError("the training text is empty; give files that contain text")

    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(sorted(set().union(*texts)))
    if kind == "word":
        counts = count_chunks(texts, WORD_PATTERN)
        words = [word for word, _ in counts.most_common(vocab_size - len(SPECIAL_TOKENS) - 1)]  # ties: first seen
        return WordTokenizer([UNK_TOKEN] + words)
    vocab, _ = train_bpe(texts, vocab_size, PATTERNS[pattern])
    return BPETokenizer(vocab, PATTERNS[pattern])


# ----------------------------------------------------------------------------------------------
# Loading: JSON files and GPT-2


def read_gpt2_tiktoken_file(path: Path) -> list[bytes]:
    """Read a .tiktoken ranks file (lines of base64 token bytes and rank) as the token list."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[int(rank)] = base64.b64decode(token)
    if sorted(ranks) != list(range(len(ranks))):
        raise ValueError(f"{path} does not list ranks 0..{len(ranks) - 1} once each; use the unmodified file")
    return [ranks[rank] for rank in range(len(ranks))]


def read_gpt2_encoder_files(folder: Path) -> list[bytes]:
    """Read GPT-2's encoder.json (token -> id) as the token list, checked against vocab.bpe's merges."""
    encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    encoder.pop("<|endoftext|>", None)
    tokens = sorted(encoder, key=encoder.get)
    vocab = [bytes(BYTE_OF_CHAR[char] for char in token) for token in tokens]

    # vocab.bpe lists the single bytes' order implicitly (printable ones first) and then one merge per line
    merge_lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
    byte_order = sorted(range(256), key=lambda b: ord(BYTE_ALPHABET[b]))
    expected = [bytes([b]) for b in byte_order]
    expected += [bytes(BYTE_OF_CHAR[char] for char in line.replace(" ", "")) for line in merge_lines]
    if vocab != expected or [encoder[token] for token in tokens] != list(range(len(tokens))):
        raise ValueError(f"encoder.json and vocab.bpe in {folder} do not match; use GPT-2's unmodified files")
    return vocab


def load_gpt2(files=None) -> BPETokenizer:
    """Load GPT-2's encoding (<|endoftext|> = 50256, chat tokens 50257..50262).

    files: a folder with encoder.json and vocab.bpe (used first) or gpt2.tiktoken, or the path of a
    .tiktoken file. Without files, tiktoken.get_encoding("gpt2") downloads it (once, then cached).
    """
    if files is None:
        encoding = tiktoken.get_encoding("gpt2")
        vocab = [encoding.decode_single_token_bytes(i) for i in range(encoding.eot_token)]
    else:
        path = Path(files)
        if (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
            vocab = read_gpt2_encoder_files(path)
        elif path.is_file() or (path / "gpt2.tiktoken").is_file():
            vocab = read_gpt2_tiktoken_file(path if path.is_file() else path / "gpt2.tiktoken")
        else:
            raise FileNotFoundError(
                f"no GPT-2 files at {path}; give a folder with encoder.json and vocab.bpe or with "
                "gpt2.tiktoken, or a .tiktoken file"
            )
    if len(vocab) != 50256:
        raise ValueError(f"GPT-2's vocabulary has 50256 regular tokens, but {files} gives {len(vocab)}")
    return BPETokenizer(vocab, GPT2_PATTERN, kind="gpt2")


def tokenizer_from_dict(content: dict) -> Tokenizer:
    """Rebuild a tokenizer from the content of its JSON file (see Tokenizer.to_dict)."""
    if not isinstance(content, dict):
        raise ValueError(f"expected a JSON object, got {type(content).__name__}")
    kind = content.get("kind")
    if kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind == "char":
        tokenizer = CharTokenizer(content["vocab"])
    elif kind == "word":
        tokenizer = WordTokenizer(content["vocab"], content["pattern"])
    elif kind in ("bpe", "gpt2"):
        vocab = [bytes(BYTE_OF_CHAR[char] for char in token) for token in content["vocab"]]
        tokenizer = BPETokenizer(vocab, content["pattern"], kind)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of byte, char, word, bpe, gpt2")
    if content.get("special_tokens") != tokenizer.special_tokens:
        raise ValueError("the file's special token ids differ from SPECIAL_TOKENS; train the tokenizer again")
    return tokenizer


def load_tokenizer(spec: str, gpt2_files=None) -> Tokenizer:
    """Load a tokenizer: "byte", "gpt2" (from gpt2_files, see load_gpt2) or a tokenizer JSON file."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "gpt2":
        return load_gpt2(gpt2_files)
    if spec == "char":
        raise ValueError("a char tokenizer is built from a corpus; train one with --kind char and give its file")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer {spec!r} not found; give a tokenizer JSON file (tokenizer.py train writes one), gpt2 or byte"
        )
    try:
        return tokenizer_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except KeyError as error:
        raise ValueError(f"{path} is not a valid tokenizer file: field {error} is missing") from None
    except ValueError as error:
        raise ValueError(f"{path} is not a valid tokenizer file: {error}") from None


# ----------------------------------------------------------------------------------------------
# Chat template


def render_chat(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Render messages as <|role|>content<|end|> each; return (ids, loss_mask).

    loss_mask is 1 on what the assistant writes (the content of assistant and tool_call messages
    and their <|end|>) and 0 elsewhere, role tokens included. Content is encoded as ordinary text,
    so special-token text inside a message cannot forge a role or an end of turn.
    """
    end_id = tokenizer.special_tokens["<|end|>"]
    ids, loss_mask = [], []
    for index, message in enumerate(messages):
        role, content = check_message(message, index)
        content_ids = tokenizer.encode_ordinary(content) + [end_id]
        ids += [tokenizer.special_tokens[f"<|{role}|>"]] + content_ids
        loss_mask += [0] + [int(role in TRAINED_ROLES)] * len(content_ids)
    return ids, loss_mask


def render_prompt(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """Render a conversation prefix for generation: the messages, then <|assistant|>."""
    ids, _ = render_chat(tokenizer, messages)
    return ids + [tokenizer.special_tokens["<|assistant|>"]]


def check_message(message, index: int) -> tuple[str, str]:
    """Return a chat message's (role, content), or raise ValueError naming what is wrong."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {message!r}")
    role, content = message["role"], message["content"]
    if role not in CHAT_ROLES:
        raise ValueError(f"message {index} has unknown role {role!r}; use one of {', '.join(CHAT_ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"message {index} content must be a string, got {type(content).__name__}")
    return role, content


# ----------------------------------------------------------------------------------------------
# Token files


def find_text_files(inputs: list[str]) -> list[Path]:
    """Resolve files and folders to the list of text files to read, in the order given.

    A file named directly is read whatever its name. A folder contributes its non-empty *.txt files,
    recursively, in sorted order, skipping hidden ones. Other files in folders (README.md, data
    descriptions, archives) are left out, so name them directly to include them.
    """
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                file
                for file in path.rglob("*.txt")
                if file.is_file()
                and file.stat().st_size > 0
                and not any(part.startswith(".") for part in file.relative_to(path).parts)
            )
            if not found:
                raise ValueError(f"folder {path} has no non-empty .txt files; add some or name text files directly")
            files += found
        elif path.is_file():
            if path.stat().st_size == 0:
                raise ValueError(f"input file {path} is empty; give a file that contains text")
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} not found; give existing text files or folders")
    if not files:
        raise ValueError("no input given; name text files or folders")
    return files


def read_chunks(path: Path, start: int, end: int, chunk_bytes: int, cut_before_newline: bool):
    """Yield (offset, data) pieces of the file's bytes start..end, each about chunk_bytes long.

    A piece ends only at a newline followed by printable ASCII. There every split pattern here
    starts a new pre-split chunk: GPT-2's right before the newline, GPT-4's and the word pattern
    right after it. So encoding the pieces one by one gives the same ids as encoding the range
    whole, while only one piece is in memory.
    """
    # NOTE: a stretch with no such newline (one huge line) is read into memory whole.
    with open(path, "rb") as file:
        file.seek(start)
        offset, pending, remaining = start, bytearray(), end - start
        while remaining > 0:
            block = file.read(min(chunk_bytes, remaining))
            if not block:
                break
            remaining -= len(block)
            search_from = max(0, len(pending) - 1)
            pending += block
            cut = find_last_cut(pending, search_from, cut_before_newline) if remaining > 0 else len(pending)
            if cut > 0:
                yield offset, bytes(pending[:cut])
                offset += cut
                del pending[:cut]
        if pending:  # only when the file got shorter while being read
            yield offset, bytes(pending)


def find_last_cut(data: bytearray, search_from: int, cut_before_newline: bool) -> int:
    """Return the last safe cut (see read_chunks) found in data[search_from:], or 0 if none."""
    position = len(data) - 1  # a newline in the last byte cannot be judged yet
    while (position := data.rfind(b"\n", search_from, position)) >= 0:
        if 0x21 <= data[position + 1] <= 0x7E:
            return position if cut_before_newline else position + 1
    return 0


def decode_text(data: bytes, path: Path, offset: int, reader: str) -> str:
    """Decode UTF-8 bytes read from path at offset, or raise ValueError naming the file and byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        fix = "" if reader == "show" else " or use a byte or BPE tokenizer"
        position = offset + error.start
        raise ValueError(f"{path} is not valid UTF-8 (byte {position}); {reader} reads text, so convert it{fix}") from None


def encode_chunks(tokenizer: Tokenizer, path: Path, chunks: list[tuple[int, bytes]]) -> list[list[int]]:
    """Encode chunks of a file as ordinary text: valid UTF-8 in one batch, the others with encode_bytes."""
    ids, texts = [None] * len(chunks), {}
    for i, (offset, data) in enumerate(chunks):
        if tokenizer.byte_level:
            try:
                texts[i] = data.decode("utf-8")
            except UnicodeDecodeError:
                ids[i] = tokenizer.encode_bytes(data)
        else:
            texts[i] = decode_text(data, path, offset, f"the {tokenizer.kind} tokenizer")
    for i, chunk_ids in zip(texts, tokenizer.encode_batch(list(texts.values()))):
        ids[i] = chunk_ids
    return ids


def build_char_tokenizer(files: list[Path], chunk_bytes: int = 2**23) -> CharTokenizer:
    """Build the char vocabulary from the files, reading them in chunks."""
    chars = set()
    for path in files:
        for offset, data in read_chunks(path, 0, path.stat().st_size, chunk_bytes, False):
            chars.update(decode_text(data, path, offset, "the char tokenizer"))
    return CharTokenizer(sorted(chars))


TOKEN_FILES = ["train.bin", "val.bin", "meta.json", "tokenizer.json"]


def encode_corpus(tokenizer: Tokenizer, inputs, out_dir, val_fraction=0.1, force=False, chunk_bytes=2**20) -> dict:
    """Encode text files into out_dir/train.bin, val.bin, meta.json and tokenizer.json; return the meta.

    Each file is one document. Split: within each file, the first 1 - val_fraction of its bytes go
    to train and the rest to val, with the cut moved forward to the next UTF-8 character boundary
    (for ASCII text that is nanoGPT's data[:int(n * 0.9)]). Each non-empty part is followed by
    <|endoftext|>. Special-token text inside the files is encoded as ordinary text. Token files are
    flat arrays of uint16 (vocab_size <= 65536) or uint32. Everything is written to a temporary
    folder and moved into place at the end, so a failure leaves no output behind.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val fraction {val_fraction} is outside [0, 1); use e.g. --val-fraction 0.1")
    files = find_text_files(inputs)
    out_dir = Path(out_dir)
    ancestor = check_output_path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} is a file, not a folder; choose another --out")
    existing = [name for name in TOKEN_FILES if (out_dir / name).exists()]
    if existing and not force:
        raise FileExistsError(f"{out_dir / existing[0]} already exists; pass --force to overwrite it")

    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    meta = dict(tokenizer=tokenizer.kind, tokenizer_hash=tokenizer.hash, vocab_size=tokenizer.vocab_size,
                eot_id=tokenizer.eot_id, dtype=np.dtype(dtype).name, train_tokens=0, val_tokens=0, train_bytes=0,
                val_bytes=0, val_fraction=val_fraction, sources=[str(path) for path in files])
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=ancestor))
    try:
        with open(tmp_dir / "train.bin", "wb") as train_file, open(tmp_dir / "val.bin", "wb") as val_file:
            for path in files:
                size = path.stat().st_size
                cut = utf8_boundary(path, int(size * (1 - val_fraction)))
                for split, start, end, out in (("train", 0, cut, train_file), ("val", cut, size, val_file)):
                    if end > start:
                        meta[f"{split}_tokens"] += encode_part(tokenizer, path, start, end, out, dtype, chunk_bytes)
                        meta[f"{split}_bytes"] += end - start
        tokenizer.save(tmp_dir / "tokenizer.json")
        (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in TOKEN_FILES:
            os.replace(tmp_dir / name, out_dir / name)
    finally:
        for leftover in tmp_dir.iterdir():
            leftover.unlink()
        tmp_dir.rmdir()
    return meta


def encode_part(tokenizer: Tokenizer, path: Path, start: int, end: int, out, dtype, chunk_bytes: int) -> int:
    """Append the ids of the file's bytes start..end and <|endoftext|> to out; return how many.

    The bytes are read in chunks of about chunk_bytes (see read_chunks) and encoded 8 chunks at a
    time, so memory stays bounded for files larger than RAM.
    """
    n_tokens = 0
    chunks = read_chunks(path, start, end, chunk_bytes, tokenizer.cut_before_newline)
    while batch := list(itertools.islice(chunks, 8)):
        for ids in encode_chunks(tokenizer, path, batch):
            np.array(ids, dtype=dtype).tofile(out)
            n_tokens += len(ids)
    np.array([tokenizer.eot_id], dtype=dtype).tofile(out)
    return n_tokens + 1


def utf8_boundary(path: Path, position: int) -> int:
    """Move a byte position forward past UTF-8 continuation bytes to the next character start."""
    with open(path, "rb") as file:
        file.seek(position)
        following = file.read(4)
    skip = 0
    while skip < len(following) and following[skip] & 0xC0 == 0x80:
        skip += 1
    return position + skip


def read_token_meta(out_dir) -> dict:
    """Read the meta.json that encode_corpus wrote to out_dir."""
    path = Path(out_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write the token files with tokenizer.py encode --out {out_dir}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); encode the text again") from None
    missing = [key for key in ("dtype", "train_tokens", "val_tokens", "tokenizer_hash") if key not in meta]
    if missing:
        raise ValueError(f"{path} lacks the fields {missing}; encode the text again with tokenizer.py encode")
    return meta


def load_tokens(out_dir, split: str) -> np.memmap:
    """Map out_dir/{split}.bin (split "train" or "val") read-only, with the dtype from meta.json.

    An empty file cannot be memory-mapped, so it gives an empty in-memory array instead.
    """
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; use train or val")
    meta = read_token_meta(out_dir)
    dtype = np.dtype(meta["dtype"])
    path = Path(out_dir) / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write the token files again with tokenizer.py encode --out {out_dir}")
    if path.stat().st_size != meta[f"{split}_tokens"] * dtype.itemsize:
        raise ValueError(f"{path} holds {path.stat().st_size} bytes but meta.json lists {meta[f'{split}_tokens']} "
                         f"{dtype.name} tokens; the file is truncated or stale, so encode the text again")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


# ----------------------------------------------------------------------------------------------
# Command line


def check_output_path(path: Path) -> Path:
    """Return the nearest existing folder above path, or raise ValueError if that is a file."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"cannot write {path}: {parent} is a file, not a folder; choose another output path")
            return parent
    return Path(".")


def write_atomic(path: Path, data: bytes) -> None:
    """Write data to a temporary file next to path and rename it into place."""
    check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        os.unlink(tmp_name)
        raise


def run_train(args) -> None:
    out = Path(args.out)
    check_output_path(out)
    if out.is_dir():
        raise ValueError(f"output {out} is a folder; give a file name such as {out / 'tokenizer.json'}")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    files = find_text_files(args.input)
    data = [path.read_bytes() for path in files]
    if args.kind in ("char", "word"):
        texts = [decode_text(item, path, 0, f"the {args.kind} tokenizer") for item, path in zip(data, files)]
    else:  # byte-level BPE learns from the raw bytes, so invalid UTF-8 is kept as it is
        texts = [item.decode("utf-8", errors="surrogateescape") for item in data]

    start = time.perf_counter()
    tokenizer = train_tokenizer(args.kind, texts, args.vocab_size, args.pattern)
    seconds = time.perf_counter() - start
    n_bytes, n_tokens = sum(map(len, data)), sum(len(tokenizer.encode_bytes(item)) for item in data)
    tokenizer.save(out)
    print(f"trained a {args.kind} tokenizer with vocab_size {tokenizer.vocab_size} in {seconds:.2f} s")
    print(f"compression on the training text: {n_bytes / n_tokens:.3f} bytes per token "
          f"({n_bytes:,} bytes, {n_tokens:,} tokens)")
    print(f"wrote {out} (hash {tokenizer.hash[:12]})")


def run_encode(args) -> None:
    if args.tokenizer == "char":
        tokenizer = build_char_tokenizer(find_text_files(args.input))
    else:
        tokenizer = load_tokenizer(args.tokenizer, args.gpt2_files)
    start = time.perf_counter()
    meta = encode_corpus(tokenizer, args.input, args.out, args.val_fraction, args.force)
    print(f"encoded {len(meta['sources'])} file(s) with {tokenizer!r} in {time.perf_counter() - start:.1f} s")
    for split in ("train", "val"):
        print(f"{split}: {meta[f'{split}_tokens']:,} tokens from {meta[f'{split}_bytes']:,} bytes")
    print(f"wrote {', '.join(TOKEN_FILES)} to {args.out}")


def run_show(args) -> None:
    tokenizer = load_tokenizer(args.tokenizer, args.gpt2_files)
    text = args.text
    if text is None:
        text = decode_text(Path(args.file).read_bytes(), Path(args.file), 0, "show")
    ids = tokenizer.encode(text, allowed_special="all")
    names = {i: token for token, i in tokenizer.special_tokens.items()}
    print(f"{'id':>8}  token")
    for i in ids:
        data = tokenizer.decode_bytes([i])
        try:
            label = names.get(i) or repr(data.decode("utf-8"))
        except UnicodeDecodeError:  # part of a multi-byte character
            label = repr(data)
        print(f"{i:>8}  {label}")
    n_bytes = len(text.encode("utf-8"))
    print(f"{len(ids)} tokens for {n_bytes} bytes ({n_bytes / max(len(ids), 1):.2f} bytes per token), {tokenizer!r}")


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser that reports a usage error as one `error: ...` line."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter  # keeps the docstring's example lines
    parser = ArgumentParser(prog="tokenizer.py", description=__doc__, formatter_class=formatter)
    commands = parser.add_subparsers(dest="command", required=True)
    inputs_help = "text files (one document each), or folders whose *.txt files are read; required"
    gpt2_help = ("folder with GPT-2's encoder.json + vocab.bpe or gpt2.tiktoken, or a .tiktoken file "
                 "(default: none, so tiktoken downloads them)")

    train = commands.add_parser("train", help="train a tokenizer and write it as JSON")
    train.add_argument("--kind", choices=KINDS, default="bpe", help="tokenizer kind (default: %(default)s)")
    train.add_argument("--vocab-size", type=int, help="number of token ids, special tokens included; required for "
                       "word (at least 9) and bpe (at least 263); char and byte set their own (default: none)")
    train.add_argument("--pattern", choices=list(PATTERNS), default="gpt4",
                       help="BPE split pattern: GPT-2's, or GPT-4's cl100k (default: %(default)s)")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_FOLDER", help=inputs_help)
    train.add_argument("--out", default="tokenizer.json", help="tokenizer JSON file to write (default: %(default)s)")
    train.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    train.set_defaults(run=run_train)

    encode = commands.add_parser("encode", help="write train.bin/val.bin token files")
    encode.add_argument("--tokenizer", required=True, metavar="{PATH.json,gpt2,byte,char}", help="tokenizer JSON "
                        "file, gpt2, byte, or char (builds the char vocabulary from the inputs); required")
    encode.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_FOLDER", help=inputs_help)
    encode.add_argument("--out", required=True, metavar="DIR", help="folder for the token files; required")
    encode.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of each file's bytes, taken from its end, for val.bin (default: %(default)s)")
    encode.add_argument("--gpt2-files", metavar="DIR", help=gpt2_help)
    encode.add_argument("--force", action="store_true", help="overwrite token files that exist in --out")
    encode.set_defaults(run=run_encode)

    show = commands.add_parser("show", help="print how a text splits into tokens")
    show.add_argument("--tokenizer", required=True, metavar="{PATH.json,gpt2,byte}",
                      help="tokenizer JSON file, gpt2 or byte; required")
    source = show.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="text to split; special-token text becomes special tokens (this or --file)")
    source.add_argument("--file", help="UTF-8 file whose text to split (this or --text)")
    show.add_argument("--gpt2-files", metavar="DIR", help=gpt2_help)
    show.set_defaults(run=run_show)
    return parser


def run_command(command, *args):
    """Call command(*args) for a script's main(). A ValueError or OSError becomes one `error:` line on
    stderr (printed by rank 0 only under torchrun) and exit status 1, without a traceback."""
    try:
        return command(*args)
    except (ValueError, OSError) as error:
        if int(os.environ.get("RANK", "0")) == 0:
            message = " ".join(str(error).split("\n"))
            print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as error:
        message = " ".join(str(error).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
