"""CLIP tokenizer: byte-level BPE over the 49,408-token vocabulary of both SDXL text encoders.

The algorithm follows openai/CLIP `clip/simple_tokenizer.py` (also shipped by open_clip as
`tokenizer.py`): clean the text, split it into words with the CLIP pre-tokenizer regex, map each
word's UTF-8 bytes to printable characters (GPT-2 `bytes_to_unicode`), then merge symbol pairs
in the order of the shipped merge list, the last symbol of a word carrying `</w>`.

Differences from the reference, all in cleaning (the BPE itself is exact):
- ftfy is not a dependency. The reference first runs `ftfy.fix_text`, which besides NFC also
  repairs mojibake ("cafÃ©" -> "café"), straightens curly quotes (’ -> '), splits ligatures
  (ﬁ -> fi), narrows full-width forms (Ａ -> A) and drops control characters. We apply only
  NFC, so such text tokenizes as written. transformers' fast `CLIPTokenizer` (diffusers; the only
  one in transformers 5) does not run ftfy either, so on such text we agree with it.
- The `regex` module is not a dependency: `\\p{L}` / `\\p{N}` are rebuilt as stdlib `re`
  character classes from `unicodedata` categories (Unicode version of this Python), and `\\s`
  is the Unicode White_Space set that `regex` uses (stdlib `\\s` also matches U+001C..U+001F).
- The pattern is matched without IGNORECASE; the text is already lowercased, so the
  contractions ('s, 't, ...) still match as in the reference.
"""

from __future__ import annotations

import functools
import gzip
import html
import re
import sys
import unicodedata
from pathlib import Path

import torch

VOCAB_PATH = Path(__file__).with_name("clip_bpe") / "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP: 48,894 -> vocab 2*256 + 48,894 + 2 = 49,408

# Unicode White_Space (what `regex`'s and Rust's `\s` match).
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUN = re.compile(f"[{_WHITESPACE}]+")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character table of GPT-2 / CLIP byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100.. in byte order.
    The insertion order (printable bytes first) is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in table]
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def _category_classes(majors: str) -> dict[str, str]:
    """`re` character-class bodies matching the code points of each major category in `majors`."""
    ranges: dict[str, list[str]] = {m: [] for m in majors}
    run_major, start = None, 0
    for cp in range(sys.maxunicode + 2):
        major = unicodedata.category(chr(cp))[0] if cp <= sys.maxunicode else None
        if major == run_major:
            continue
        if run_major in ranges:
            end = cp - 1
            ranges[run_major].append(f"\\U{start:08x}-\\U{end:08x}" if end > start else f"\\U{start:08x}")
        run_major, start = major, cp
    return {m: "".join(r) for m, r in ranges.items()}


def _split_pattern(letters: str, numbers: str) -> re.Pattern:
    return re.compile(
        rf"{re.escape(BOS_TOKEN)}|{re.escape(EOS_TOKEN)}|'s|'t|'re|'ve|'m|'ll|'d"
        rf"|[{letters}]+|[{numbers}]|[^{_WHITESPACE}{letters}{numbers}]+"
    )


@functools.cache
def pretokenizer() -> re.Pattern:
    """The CLIP word-splitting regex with stdlib `re`.

    Reference: `<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`
    (openai/CLIP simple_tokenizer.py): special tokens, English contractions, runs of letters,
    single digits, runs of everything else that is not whitespace. Building its classes reads
    every code point's category (0.13 s on a 2-core CPU), so ASCII text takes `ascii_pretokenizer`.
    """
    classes = _category_classes("LN")
    return _split_pattern(classes["L"], classes["N"])


@functools.cache
def ascii_pretokenizer() -> re.Pattern:
    """`pretokenizer()` for ASCII text: there the letters (category L) are a-z, A-Z and the
    numbers (N) are 0-9, so both split such text alike."""
    return _split_pattern("a-zA-Z", "0-9")


@functools.cache
def _load_vocab(path: Path) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Token -> id and merge pair -> rank tables, built as openai/CLIP does from the merge list."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected {NUM_MERGES} BPE merge lines, found a different file; use the CLIP bpe_simple_vocab_16e6.txt.gz")
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}


def clean(text: str) -> str:
    """openai/CLIP `basic_clean` + `whitespace_clean` + lower, with NFC in place of ftfy."""
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


class CLIPTokenizer:
    """CLIP BPE tokenizer producing (B, max_length) id tensors: BOS, up to max_length - 2 ids, EOS, pad.

    Pad ids for SDXL: TE1 (CLIP-L) pads with EOS 49407 (ComfyUI `comfy/sd1_clip.py` SDTokenizer,
    pad_with_end=True; transformers' CLIP tokenizer pad_token "<|endoftext|>"); TE2 (bigG) pads
    with 0 (open_clip `tokenizer.py` fills `torch.zeros`; ComfyUI `comfy/sdxl_clip.py`
    SDXLClipGTokenizer pad_with_end=False). Id 0 is the token "!".
    """

    def __init__(self, pad_token_id: int = EOS_ID, max_length: int = 77, vocab_path: str | Path = VOCAB_PATH):
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.encoder, self.bpe_ranks = _load_vocab(Path(vocab_path))
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Greedy lowest-rank pair merging of one byte-encoded word (openai/CLIP `bpe`)."""
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, NUM_MERGES))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS and without truncation."""
        ids = []
        text = clean(text)
        for word in (ascii_pretokenizer() if text.isascii() else pretokenizer()).findall(text):
            if word in (BOS_TOKEN, EOS_TOKEN):
                ids.append(self.encoder[word])
                continue
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(word))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (word ends become spaces); inverse of `encode` up to cleaning."""
        words = "".join(self.decoder[i] for i in ids if i not in (BOS_ID, EOS_ID)).split("</w>")
        data = b" ".join(bytes(self.byte_decoder[c] for c in word) for word in words)
        return data.decode("utf-8", errors="replace").strip()

    def chunked(self, texts: str | list[str], chunks: int = 1) -> torch.Tensor:
        """(B, chunks, max_length) ids for long prompts: the text's ids cut into `chunks` pieces of
        max_length - 2 (75), each one a full sequence BOS, piece, EOS, pad (an empty piece is BOS,
        EOS, pad); ids past chunks·75 are dropped. The chunk layout of ComfyUI's `SDTokenizer`
        (comfy/sd1_clip.py) and A1111, with kohya's fixed chunk count (`max_token_length`): every
        text gets `chunks` pieces, so a batch has one shape. chunks=1 equals `__call__`."""
        if isinstance(texts, str):
            texts = [texts]
        width = self.max_length - 2
        out = torch.full((len(texts), chunks, self.max_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            for c in range(chunks):
                piece = [BOS_ID, *ids[c * width : (c + 1) * width], EOS_ID]
                out[row, c, : len(piece)] = torch.tensor(piece)
        return out

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """(B, max_length) int64 ids: BOS, ids truncated to max_length - 2, EOS, then pad."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.max_length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [BOS_ID, *self.encode(text)[: self.max_length - 2], EOS_ID]
            out[row, : len(ids)] = torch.tensor(ids)
        return out
