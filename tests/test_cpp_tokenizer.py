"""The C++ tokenizer (runtime/src/tokenizer.cpp, through the fastv-tokenize tool) against HF ``tokenizers``.

Acceptance (issue 21): ids equal HF's on >= 10,000 strings per style over tokenizer.json files built here with
realistic vocabularies: a byte-level BPE trained to >= 30,000 tokens behind the Qwen2 regex (NFC, Split, ByteLevel;
special and added tokens with every flag), a Llama-style BPE (>= 8,000 tokens, byte fallback) behind Metaspace and
the same model behind the older Prepend/Replace normalizers; then, with fewer strings, a GPT-2 style ByteLevel
pre-tokenizer (prefix space, its own regex), the presets' tokenizers (byte-level and the demo's WordLevel) and the
user-style checkpoints' trained tokenizers (tests/user_checkpoints.py). For every string: the ids with and without
the post-processor's special tokens, decode with and without skip_special_tokens (so decode(encode(s)) == s wherever
HF round-trips), and the StreamDecoder's chunks: each one valid UTF-8, together the full decode. Random id
sequences (byte tokens that split characters, specials anywhere) check decoding and streaming alone.

Every string set is generated from a fixed seed: CJK, kana, Hangul, emoji with ZWJ sequences, flags, skin tones
and keycaps, combining marks (decomposed forms for NFC), Arabic and Hebrew, whitespace runs (tabs, newlines, CR,
NBSP, ideographic and other Unicode spaces), digit runs (ASCII, Arabic-Indic, full-width), punctuation and
contractions, added / special tokens inside words and partial ones, code-like text, and mixes of all of these.
All strings of a tokenizer go through one fastv-tokenize process.
"""
from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

N_MAIN = 10_000          # strings per main style
N_SMALL = 2_000          # strings per further tokenizer
N_RANDOM_IDS = 500       # random id sequences per tokenizer

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


# ------------------------------------------------------------------------------------------- generated text
def _chars(lo: int, hi: int) -> list[str]:
    return [chr(c) for c in range(lo, hi + 1)]


SCRIPTS = {
    "latin": (list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "qu"], list("aeiouy") + list("áéíóúàèçñöüæø")),
    "cyrillic": (list("бвгджзклмнпрстфхцчшщ"), list("аеиоуыэюяё")),
    "greek": (list("βγδζθκλμνξπρστφχψ"), list("αεηιουωάέί")),
    "arabic": (_chars(0x0628, 0x063A), list("اويى") + ["\u064e", "\u0650", "\u064f"]),
    "hebrew": (_chars(0x05D1, 0x05E2), list("אוי") + ["\u05b8", "\u05b4"]),
    "devanagari": (_chars(0x0915, 0x0939), ["\u093e", "\u093f", "\u0940", "\u0941", "\u0947", "\u094b", ""]),
}
CJK = _chars(0x4E00, 0x4FFF) + _chars(0x5B50, 0x5BFF)
KANA = _chars(0x3041, 0x3093) + _chars(0x30A1, 0x30F3)
HANGUL = _chars(0xAC00, 0xAE00)
EMOJI = _chars(0x1F600, 0x1F64F) + _chars(0x1F300, 0x1F32F) + ["\u2764\ufe0f", "\u2728", "\u263a"]
ZWJ = ["\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466", "\U0001F469\u200d\U0001F4BB",
       "\U0001F3F3\ufe0f\u200d\U0001F308", "\U0001F9D1\U0001F3FD\u200d\U0001F680", "\U0001F1EB\U0001F1F7",
       "\U0001F1EF\U0001F1F5", "\U0001F44D\U0001F3FF", "1\ufe0f\u20e3", "#\ufe0f\u20e3"]
COMBINING = ["\u0301", "\u0300", "\u0308", "\u0327", "\u0303", "\u030a", "\u0323", "\u0302\u0301", "\u20dd"]
SPACES = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ", "\n \n", " \t ", "\u00a0", "\u3000",
          "\u2003", "\u2028", "\x0b", "\x0c", "\x85", "\u200b", "\r", "    \n"]
DIGITS = ["0123456789", "٠١٢٣٤٥", "１２３", "²", "½", "Ⅻ"]
PUNCT = list("!?.,;:-_()[]{}<>/\\|@#$%^&*+=~`\"'") + ["...", "—", "–", "«", "»", "“", "”", "’", "¿", "¡", "。",
                                                       "、", "！", "？", "'s", "'T", "'re", "'VE", "'m", "'ll",
                                                       "'d", "n't", "::", "->", "=>", "//", "/*", "*/"]
CODE = ["def f(x):\n    return x + 1\n", "int main() { return 0; }", "a_b = c.d[0] ** 2", "<div class=\"x\">",
        "http://example.com/a?b=1&c=2", "{\"key\": [1, 2, 3]}", "x\t= 3;\r\n", "$ ls -la ~/dir"]
ENGLISH = ("the of and to in is was it for on are as with his they at be this from have or one had by word but "
           "not what all were we when your can said there use an each which she do how their if will up other "
           "about out many then them these so some her would make like him into time has look two more write go "
           "see number no way could people my than first water been call who oil its now find long down day did "
           "get come made may part image picture circle square triangle red blue green yellow describe question "
           "answer assistant user system video frame left right above below small large").split()


def make_words(rng: random.Random, n: int) -> list[str]:
    """n pseudo-words over several scripts (syllables), plus English words and CJK / kana / Hangul runs."""
    words = list(ENGLISH)
    scripts = list(SCRIPTS.values())
    while len(words) < n:
        r = rng.random()
        if r < 0.7:
            cons, vows = scripts[0] if r < 0.35 else rng.choice(scripts)
            w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.randint(1, 4)))
            if rng.random() < 0.2:
                w = w.capitalize()
        elif r < 0.85:
            w = "".join(rng.choice(CJK) for _ in range(rng.randint(1, 3)))
        elif r < 0.93:
            w = "".join(rng.choice(KANA) for _ in range(rng.randint(2, 5)))
        else:
            w = "".join(rng.choice(HANGUL) for _ in range(rng.randint(1, 3)))
        words.append(w)
    return words


def corpus(seed: int = 0, lines: int = 30_000, vocabulary: int = 60_000) -> list[str]:
    """A training corpus with a Zipf-like word distribution, punctuation, digits and some emoji."""
    rng = random.Random(seed)
    words = make_words(rng, vocabulary)
    out = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(4, 20)):
            r = rng.random()
            if r < 0.85:
                parts.append(words[int(len(words) * rng.random() ** 2.5)])
            elif r < 0.92:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
            elif r < 0.97:
                parts.append(rng.choice(PUNCT))
            else:
                parts.append(rng.choice(EMOJI))
        out.append(" ".join(parts) + rng.choice([".", "!", "?", ":", ""]) + "\n")
    return out


def strings(seed: int, n: int, added: list[str], words: list[str] | None = None) -> list[str]:
    """n test strings (see the module docstring); ``added``: token contents to put inside the text."""
    rng = random.Random(seed)
    words = words or make_words(random.Random(seed + 1), 5_000)

    def piece() -> str:
        r = rng.randrange(13)
        if r == 0:
            return rng.choice(words)
        if r == 1:
            return "".join(rng.choice(CJK + KANA + HANGUL) for _ in range(rng.randint(1, 8)))
        if r == 2:
            return "".join(rng.choice(EMOJI + ZWJ) for _ in range(rng.randint(1, 4)))
        if r == 3:
            base = rng.choice(words + list("aeiouAEIOUnc"))
            return base + "".join(rng.choice(COMBINING) for _ in range(rng.randint(1, 3)))
        if r == 4:   # right-to-left words, sometimes with digits or a Latin word between them
            cons, vows = SCRIPTS[rng.choice(["arabic", "hebrew"])]
            rtl = ["".join(rng.choice(cons + vows) for _ in range(rng.randint(2, 7))) for _ in range(rng.randint(1, 4))]
            if rng.random() < 0.3:
                rtl.insert(rng.randrange(len(rtl) + 1), rng.choice(["123", "GPU", "\u200f", "\u200e", "(x)"]))
            return " ".join(rtl)
        if r == 5:
            return "".join(rng.choice(SPACES) for _ in range(rng.randint(1, 4)))
        if r == 6:
            d = rng.choice(DIGITS)
            return "".join(rng.choice(d) for _ in range(rng.randint(1, 12)))
        if r == 7:
            return "".join(rng.choice(PUNCT) for _ in range(rng.randint(1, 4)))
        if r == 8 and added:
            tok = rng.choice(added)
            return tok[:rng.randint(1, len(tok) - 1)] if rng.random() < 0.15 and len(tok) > 1 else tok
        if r == 9:
            return rng.choice(CODE)
        if r == 10:
            return "".join(chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x2FFF),
                                           rng.randint(0x3000, 0xD7FF), rng.randint(0xE000, 0xFFFD),
                                           rng.randint(0x10000, 0x1FAFF)])) for _ in range(rng.randint(1, 6)))
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))

    out = ["", " ", "  ", "\n", "hello", " hello", "hello ", "Hello World", *added, "".join(added),
           " ".join(added)]
    while len(out) < n:
        k = rng.choice([1, 1, 2, 3, 4, 6, 10])
        seps = ["", " ", " ", "", "\n", "  ", "\t"]
        out.append("".join(piece() + rng.choice(seps) for _ in range(k)).rstrip(" ") if rng.random() < 0.3
                   else "".join(rng.choice(seps) + piece() for _ in range(k)))
    return out[:n]


# ----------------------------------------------------------------------------------------------- tokenizers
def qwen_tokenizer(vocab_size: int = 32_000):
    """Byte-level BPE trained to ``vocab_size`` behind the Qwen2 regex, specials and flagged added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=2)
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    tok.add_tokens([AddedToken("<tool_call>", lstrip=True, rstrip=True, normalized=False, special=False),
                    AddedToken("[MARK]", single_word=True, normalized=False),
                    AddedToken("cafe\u0301", normalized=True),          # NFC-normalized to "café" before matching
                    AddedToken("banana", single_word=True, normalized=True),
                    AddedToken(" spaced", lstrip=False, rstrip=True, normalized=True)])
    return tok


def qwen_added() -> list[str]:
    return QWEN_SPECIALS + ["<tool_call>", "[MARK]", "cafe\u0301", "café", "banana", " spaced"]


def llama_model(vocab_size: int = 8_400):
    """(vocab, merges) of a Llama-layout BPE: <unk> <s> </s>, the 256 byte tokens, then pieces learned behind
    Metaspace."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False,
                                  min_frequency=2, limit_alphabet=1_000)
    trainer_tok.train_from_iterator(corpus(seed=1, lines=15_000, vocabulary=30_000), trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    return vocab, merges


def llama_tokenizer(vocab, merges, legacy: bool):
    """Metaspace (prepend_scheme first) or, ``legacy``, the Prepend("▁") + Replace(" ", "▁") normalizers."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ["<unk>", "<s>", "</s>", "<image>", "<pad>"]])
    tok.add_tokens([AddedToken("<video>", normalized=True, special=False)])
    return tok


LLAMA_ADDED = ["<unk>", "<s>", "</s>", "<image>", "<pad>", "<video>"]


def gpt2_tokenizer(qwen):
    """The trained byte-level model behind GPT-2's ByteLevel pre-tokenizer (its regex, a prefix space)."""
    from tokenizers import Tokenizer, pre_tokenizers

    tok = Tokenizer.from_str(qwen.to_str())
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    return tok


# ------------------------------------------------------------------------------------------------ comparing
def run_tool(exe: Path, tokenizer_json: Path, lines: list[dict], tmp: Path) -> list[dict]:
    inp = tmp / (tokenizer_json.stem + ".jsonl")
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = subprocess.run([str(exe), str(tokenizer_json), str(inp)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(x) for x in proc.stdout.split("\n") if x]   # not splitlines: U+2028 is text
    assert len(out) == len(lines)
    return out


def check_stream(got: dict, full: str, where: str) -> str | None:
    """None, or what is wrong with the stream's chunks (decoded strictly here)."""
    chunks = [bytes.fromhex(h) for h in got["stream_hex"]]
    for c in chunks:
        try:
            c.decode("utf-8")
        except UnicodeDecodeError:
            return f"{where}: a stream chunk is not valid UTF-8: {c!r}"
    if b"".join(chunks) != full.encode("utf-8"):
        return f"{where}: stream {b''.join(chunks)!r} != decode {full.encode()!r}"
    return None


def compare(exe: Path, tok, name: str, texts: list[str], tmp: Path, rng_seed: int = 7) -> dict:
    """Encode / decode / stream every text in C++ and with HF; returns counts and the first mismatches."""
    path = tmp / f"{name}.json"
    tok.save(str(path))
    specials = [i % 2 == 0 for i in range(len(texts))]
    rng = random.Random(rng_seed)
    vocab_n = tok.get_vocab_size(with_added_tokens=True)
    random_ids = [[rng.randrange(vocab_n) for _ in range(rng.randint(1, 30))] for _ in range(N_RANDOM_IDS)]
    lines = [{"text": t, "add_special_tokens": s} for t, s in zip(texts, specials)] + [{"ids": r} for r in random_ids]
    t0 = time.perf_counter()
    got = run_tool(exe, path, lines, tmp)
    cpp_s = time.perf_counter() - t0
    bad: list[str] = []
    counts = {"strings": len(texts), "ids_equal": 0, "hf_errors": 0, "round_trips": 0, "random_ids": len(random_ids),
              "cpp_seconds": round(cpp_s, 2)}
    for text, special, g in zip(texts, specials, got):
        try:
            want = tok.encode(text, add_special_tokens=special).ids
        except Exception as e:     # noqa: BLE001 - HF refuses (e.g. a word the WordLevel vocabulary lacks)
            counts["hf_errors"] += 1
            if "error" not in g:
                bad.append(f"{name}: HF refused {text!r} ({e}) but C++ gave {g}")
            continue
        if "error" in g:
            bad.append(f"{name}: C++ refused {text!r}: {g['error']}")
            continue
        if g["ids"] != want:
            bad.append(f"{name}: ids of {text!r} (specials {special}): C++ {g['ids']} HF {want}")
            continue
        counts["ids_equal"] += 1
        dec = tok.decode(want, skip_special_tokens=False)
        dec_skip = tok.decode(want, skip_special_tokens=True)
        if g["decoded"] != dec or g["decoded_skip"] != dec_skip:
            bad.append(f"{name}: decode of {text!r}: C++ {g['decoded']!r} / {g['decoded_skip']!r}, "
                       f"HF {dec!r} / {dec_skip!r}")
        counts["round_trips"] += dec_skip == text
        if problem := check_stream(g, dec, f"{name} {text!r}"):
            bad.append(problem)
    for ids, g in zip(random_ids, got[len(texts):]):
        dec = tok.decode(ids, skip_special_tokens=False)
        if g["decoded"] != dec or g["decoded_skip"] != tok.decode(ids, skip_special_tokens=True):
            bad.append(f"{name}: decode of ids {ids}: C++ {g['decoded']!r} HF {dec!r}")
        if problem := check_stream(g, dec, f"{name} ids {ids}"):
            bad.append(problem)
    counts["mismatches"] = len(bad)
    counts["first"] = bad[:5]
    return counts


# ----------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def tokenize_exe(runtime_build) -> Path:
    exe = runtime_build.parent / "fastv-tokenize"
    assert exe.is_file(), f"{exe} was not built"
    return exe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The trained tokenizers (built once): the Qwen-style one, the Llama-style model."""
    t0 = time.perf_counter()
    qwen = qwen_tokenizer()
    vocab, merges = llama_model()
    return {"qwen": qwen, "llama_vocab": vocab, "llama_merges": merges, "train_s": time.perf_counter() - t0}


def _assert_clean(counts: dict, name: str) -> None:
    print(name, {k: v for k, v in counts.items() if k != "first"})
    assert counts["mismatches"] == 0, "\n".join(counts["first"])


def test_vocabularies_are_realistic(trained):
    assert trained["qwen"].get_vocab_size(with_added_tokens=False) >= 30_000
    assert len(trained["llama_vocab"]) >= 8_000


def test_qwen2_byte_level_bpe_equals_hf(tokenize_exe, trained, tmp_path):
    counts = compare(tokenize_exe, trained["qwen"], "qwen", strings(11, N_MAIN, qwen_added()), tmp_path)
    _assert_clean(counts, "qwen")
    assert counts["ids_equal"] == N_MAIN


def test_llama_metaspace_byte_fallback_equals_hf(tokenize_exe, trained, tmp_path):
    tok = llama_tokenizer(trained["llama_vocab"], trained["llama_merges"], legacy=False)
    counts = compare(tokenize_exe, tok, "llama", strings(12, N_MAIN, LLAMA_ADDED), tmp_path)
    _assert_clean(counts, "llama")
    assert counts["ids_equal"] == N_MAIN


def test_llama_prepend_replace_normalizers_equal_hf(tokenize_exe, trained, tmp_path):
    tok = llama_tokenizer(trained["llama_vocab"], trained["llama_merges"], legacy=True)
    counts = compare(tokenize_exe, tok, "llama-legacy", strings(13, N_MAIN, LLAMA_ADDED), tmp_path)
    _assert_clean(counts, "llama-legacy")
    assert counts["ids_equal"] == N_MAIN


def test_gpt2_byte_level_pre_tokenizer_equals_hf(tokenize_exe, trained, tmp_path):
    counts = compare(tokenize_exe, gpt2_tokenizer(trained["qwen"]), "gpt2", strings(14, N_SMALL, qwen_added()),
                     tmp_path)
    _assert_clean(counts, "gpt2")


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-qwen2-vl", "tiny-internvl", "tiny-llava-shapes"])
def test_preset_tokenizers_equal_hf(tokenize_exe, tmp_path, preset):
    from tokenizers import Tokenizer

    from fastv_export.presets import shapes
    from fastv_export.presets.serving import write_preset_files

    write_preset_files(preset, tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    added = [a.content for a in tok.get_added_tokens_decoder().values()]
    words = None
    if preset == "tiny-llava-shapes":   # WordLevel: its own words, some unknown ones (refused by both)
        words = [w for w in shapes.TOKEN_ID if w not in shapes.SPECIALS] * 20 + ["zebra", "Circle"]
    counts = compare(tokenize_exe, tok, preset, strings(15, N_SMALL, added, words), tmp_path)
    _assert_clean(counts, preset)
    if preset == "tiny-llava-shapes":
        assert 0 < counts["hf_errors"] < N_SMALL


def test_user_checkpoint_tokenizers_equal_hf(tokenize_exe, tmp_path):
    from tests.user_checkpoints import llama_style_tokenizer, qwen_style_tokenizer

    added = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
    for name, tok, extra in [("user-llama", llama_style_tokenizer(), ["<s>", "</s>", "<image>", "<pad>"]),
                             ("user-qwen", qwen_style_tokenizer(added), added)]:
        counts = compare(tokenize_exe, tok, name, strings(16, N_SMALL, extra), tmp_path)
        _assert_clean(counts, name)


def test_unsupported_constructs_are_refused_with_one_line(tokenize_exe, tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    cases = {"Lowercase": lambda t: setattr(t, "normalizer", normalizers.Lowercase()),
             "Digits": lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Digits(individual_digits=True)),
             "BertPreTokenizer": lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.BertPreTokenizer())}
    for construct, set_it in cases.items():
        tok = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
        set_it(tok)
        path = tmp_path / f"{construct}.json"
        tok.save(str(path))
        proc = subprocess.run([str(tokenize_exe), str(path)], input="", capture_output=True, text=True)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastv-tokenize: error: ") and construct in lines[0], lines
    wp = Tokenizer(models.WordPiece(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    wp.save(str(tmp_path / "wp.json"))
    proc = subprocess.run([str(tokenize_exe), str(tmp_path / "wp.json")], input="", capture_output=True, text=True)
    assert proc.returncode == 1 and "WordPiece" in proc.stderr
