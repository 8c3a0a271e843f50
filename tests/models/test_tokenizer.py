"""CLIP tokenizer: exact ids, padding/truncation, and agreement with transformers' CLIPTokenizer.

The reference is transformers' `CLIPTokenizer` built from a vocab.json / merges.txt that
`reference_tokenizer` derives from our shipped bpe file the way transformers and open_clip do
(byte symbols, byte symbols + "</w>", joined merges, the two special tokens). transformers 5 does
not use ftfy either: it cleans with NFC + whitespace collapse + lowercase. The two remaining
cleaning differences are handled explicitly: we html-unescape twice like openai/CLIP (the
reference input is unescaped first), and we lowercase with Python's `str.lower` like openai/CLIP,
which writes a word-final capital sigma as "ς" where transformers writes "σ" (own test).
"""

import gzip
import html
import json
import random
import sys
import unicodedata

import pytest
import regex
import torch
from transformers import CLIPTokenizer as HFCLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode

from eridiffusion.models.tokenizer import VOCAB_PATH, CLIPTokenizer, ascii_pretokenizer, pretokenizer

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture(scope="module")
def reference_tokenizer(tmp_path_factory):
    """transformers CLIPTokenizer over vocab.json / merges.txt derived from our bpe file."""
    lines = gzip.open(VOCAB_PATH).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(hf_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return HFCLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def te1():
    return CLIPTokenizer(pad_token_id=49407)


@pytest.fixture(scope="module")
def te2():
    return CLIPTokenizer(pad_token_id=0)


HAND_WRITTEN = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "",
    "   ",
    "(masterpiece:1.2), [blue|red], ((best quality)), {a|b}, <lora:name:0.8>",
    "score_9, score_8_up, 1girl, solo, looking_at_viewer, BREAK, AND",
    "[[[emphasis]]], (((emphasis:1.5))), (word:-0.3), \\(escaped\\)",
    "it's, don't, I'm, we've, they're, you'll, he'd, IT'S, DON'T, o'clock, rock'n'roll",
    "''s ''t 'S 'x '",
    "café naïve résumé Ångström crème brûlée façade Øresund straße Œuvre",
    "e\u0301 (combining acute) a\u030a n\u0303",
    "Ünïcödé ÀÉÎÕÜ ñ ç ğ ş ı İstanbul ǅ ǈ ǋ",
    "中文字符 日本語のテキスト 한국어 텍스트 ภาษาไทย العربية עברית हिन्दी বাংলা ქართული Ελληνικά Русский",
    "猫が好き、犬も好き。「こんにちは」【重要】",
    "🐱 🐶 🦊 👍🏽 👨‍👩‍👧‍👦 🇯🇵 🏳️‍🌈 ❤️ ✨ 🔥🔥🔥 ☕",
    "!!! ??? ... --- ___ *** ### $$$ %%% ^^^ &&& ~~~ ``` ||| /// \\\\",
    "1234567890 3.14159 1e-5 1,000,000 #42 @user 100% $9.99 12:30pm 2024-01-01",
    "１２３ ٣٤٥ ۱۲ ¾ ½ ⅷ Ⅻ ² ₃ 𝟘𝟙 ①②",
    "ﬁne ﬂow ligatures, Ａｂｃ fullwidth, it’s “curly” ‘quotes’ — dash … ellipsis",
    "tab\tnew\nline\r\nform\x0cfeed vertical\x0btab",
    "nbsp\u00a0ideographic\u3000thin\u2009line\u2028para\u2029nel\x85end",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom",
    "controls \x01\x02\x1b[31m\x1c\x1d\x1e\x1f\x7f",
    "math ∑∫√∞≈≠≤≥ ± × ÷ → ⇒ ∀∃ ∈ ∉ ⊂ ∪",
    "symbols © ® ™ § ¶ † ‡ • ° ′ ″ ‰ € £ ¥ ₩ ₿",
    "http://example.com/path?query=1&x=2 user@mail.org C:\\Users\\me",
    "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
    "a" * 300,
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "word " * 120,
    "masterpiece, best quality, " * 30,
    "&amp; &lt;tag&gt; &quot;quoted&quot; &#39;apos&#39; &amp;amp; &#x1F600; &nbsp;",
    "Tom &amp; Jerry, fish &amp;amp; chips",
    "ᾈ ﬀ ŉ ǰ ΐ",  # characters whose lowercase or NFC form changes length
    "\U0001d400\U0001d41a math bold, \U00020000 CJK ext B, \U0001f9ea",
    "x\u0345y Ⓐⓐ",
]

FRAGMENTS = [
    "a", "photo", "of", "the", "cat", "Dog", "PORTRAIT", "landscape", "cinematic lighting",
    "8k", "4K UHD", "f/1.8", "50mm", "1girl", "2boys", "(masterpiece:1.2)", "[blue|red]",
    "((detailed))", "{x|y|z}", "<lora:style:0.7>", "BREAK", "it's", "don't", "we'll",
    "café", "naïve", "Zürich", "São Paulo", "Kraków", "Ærø", "東京", "北京", "서울",
    "กรุงเทพ", "القاهرة", "ירושלים", "Москва", "Αθήνα", "🐱", "👍🏽", "🇫🇷", "✨", "→",
    "©", "€5", "100%", "3.5", "1,234", "0.75", "-1", "#hashtag", "@handle", "~", "...",
    "!!!", "?!", "—", "…", "“hi”", "‘x’", "&amp;", "_", "__init__", "e\u0301", "Ⅻ", "½",
]
SEPARATORS = [" ", ", ", "", "\n", "\t", "  ", "; ", " | ", "_"]


def corpus():
    rng = random.Random(0)
    generated = [
        "".join(rng.choice(FRAGMENTS) + rng.choice(SEPARATORS) for _ in range(rng.randint(1, 40)))
        for _ in range(300)
    ]
    return HAND_WRITTEN + generated


def test_photo_of_a_cat_exact_ids(te1, te2):
    assert te1.encode("a photo of a cat") == CAT[1:-1]
    assert te1("a photo of a cat")[0].tolist() == CAT + [49407] * 70
    assert te2("a photo of a cat")[0].tolist() == CAT + [0] * 70
    assert te1.vocab_size == 49408


def test_batch_shape_and_dtype(te2):
    ids = te2(["a photo of a cat", "", "a dog"])
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    assert ids[1, :3].tolist() == [49406, 49407, 0]  # empty prompt: BOS, EOS, pad


def test_truncation_keeps_eos(te1, te2):
    text = "a very long prompt about a castle on a hill, " * 20
    encoded = te1.encode(text)
    assert len(encoded) > 75
    for tok in (te1, te2):
        row = tok(text)[0].tolist()
        assert row == [49406, *encoded[:75], 49407]
    exact = "cat " * 75  # BOS + 75 + EOS fills all 77 positions
    assert te2(exact)[0].tolist() == [49406] + [2368] * 75 + [49407]
    assert te2("cat " * 74)[0, -2:].tolist() == [49407, 0]


def test_other_max_length():
    tok = CLIPTokenizer(pad_token_id=0, max_length=10)
    assert tok("cat " * 20)[0].tolist() == [49406] + [2368] * 8 + [49407]


def test_agreement_with_transformers(te1, reference_tokenizer):
    strings = corpus()
    assert len(strings) >= 300
    mismatches = []
    for s in strings:
        ref = reference_tokenizer(html.unescape(html.unescape(s)), add_special_tokens=False).input_ids
        if te1.encode(s) != ref:
            mismatches.append(s)
    assert not mismatches, mismatches[:5]
    # the padded (B, 77) tensors too, with transformers' own truncation and padding (pad = EOS)
    ref = reference_tokenizer(
        [html.unescape(html.unescape(s)) for s in strings],
        padding="max_length", max_length=77, truncation=True, return_tensors="pt",
    ).input_ids
    assert torch.equal(te1(strings), ref)


def test_final_sigma_follows_python_lower(te1, reference_tokenizer):
    """openai/CLIP lowercases with str.lower (word-final Σ -> ς); transformers maps every Σ to σ."""
    text = "ΟΔΟΣ ΣΟΦΟΣ"
    assert unicodedata.normalize("NFC", text).lower() == "οδος σοφος"
    assert te1.encode(text) == reference_tokenizer("οδος σοφος", add_special_tokens=False).input_ids
    assert te1.encode(text) != reference_tokenizer(text, add_special_tokens=False).input_ids


def test_html_is_unescaped_twice(te1):
    once, twice, thrice = "Tom &amp; Jerry", "Tom &amp;amp; Jerry", "Tom &amp;amp;amp; Jerry"
    assert te1.encode(once) == te1.encode(twice) == te1.encode("Tom & Jerry") != te1.encode(thrice)
    assert te1.encode(thrice) == te1.encode("Tom &amp; Jerry".replace("&amp;", "& amp ;"))
    assert te1.encode("&lt;b&gt;") == te1.encode("<b>")


def test_special_tokens_in_text(te1):
    """openai/CLIP maps the literal special tokens in text to their ids (after lowercasing)."""
    a, b = te1.encode("a"), te1.encode("b")
    assert te1.encode("a <|endoftext|> b <|StartOfText|>") == [*a, 49407, *b, 49406]


def test_pretokenizer_matches_regex_module_on_all_code_points():
    """Our stdlib `re` classes split every assigned code point exactly like `regex` with \\p{L}/\\p{N}.

    Compared without IGNORECASE: on lowercased text the only effect of openai's IGNORECASE is
    that letters' case-fold partners also match (e.g. U+0345 folds to ι), which we do not follow.
    """
    reference = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
    assigned = "".join(
        chr(cp) for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)) not in ("Cn", "Cs")
    )
    spaced = " ".join(assigned[i : i + 7] for i in range(0, len(assigned), 7))  # exercise whitespace too
    for text in (assigned, spaced, "it's we'll <|endoftext|>x '''d"):
        assert pretokenizer().findall(text) == reference.findall(text)


def test_ascii_pretokenizer_splits_ascii_text_as_the_full_pattern(te1, monkeypatch):
    """ASCII text skips the full pattern (built from every code point's category): same words on
    every ASCII character, alone, in runs and spaced; a non-ASCII caption still takes the full one."""
    ascii_chars = "".join(map(chr, range(128)))
    texts = [ascii_chars, " ".join(ascii_chars), ascii_chars[::-1] * 3, "it's we'll <|endoftext|>x '''d 12ab_c-d"]
    for text in texts:
        assert ascii_pretokenizer().findall(text) == pretokenizer().findall(text)
    full = pretokenizer()
    calls = []
    monkeypatch.setattr("eridiffusion.models.tokenizer.pretokenizer", lambda: calls.append(1) or full)
    te1.encode("a photo of sks dog, 4k (masterpiece:1.2)")
    assert calls == []
    te1.encode("café 猫")
    assert calls == [1]


def test_decode_round_trip(te1):
    text = "(masterpiece:1.2), café 猫 🐱 it's"
    assert te1.decode(te1.encode(text)) == "( masterpiece : 1 . 2 ), café 猫 🐱 it 's"
    assert te1.decode(te1("a photo of a cat")[0].tolist()) == "a photo of a cat"
