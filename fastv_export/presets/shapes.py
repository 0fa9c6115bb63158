"""The demo task: coloured shapes on a 4 x 4 grid, questions whose answers need the image.

An image is 56 x 56 pixels: a 4 x 4 grid of 14-pixel cells, each cell covering 2 x 2 of the
vision tower's 7-pixel patches (8 x 8 = 64 image tokens). Between 3 and 6 cells hold a filled
square of one of four colours on a noisy grey background. Three kinds of question, each answered
by a short token sequence ending in ``</s>``:

- ``what colour at row R col C ?``  -> ``red|green|blue|yellow|none``   (4 of 64 image tokens decide)
- ``how many COLOUR ?``             -> ``0`` .. ``6``                    (every shape of that colour)
- ``where is COLOUR ?``             -> ``row R col C`` (the colour occurs exactly once)

Everything is generated from a seed, in numpy: the train and test splits use disjoint seed
ranges, so the test questions are never seen in training. Token ids are this module's own tiny
vocabulary (:data:`VOCAB`); the image placeholder is ``<image>``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRID = 4
CELL = 14
IMAGE_SIZE = GRID * CELL            # 56
PATCH = 7                           # 8 x 8 = 64 image tokens
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95), "yellow": (0.95, 0.85, 0.1)}
MIN_SHAPES, MAX_SHAPES = 3, 6
KINDS = ("colour", "count", "where")
MAX_ANSWER_TOKENS = 5             # row R col C </s>
#: test samples use seeds >= this; split("train") uses seeds below it, and the demo's training draws seeds from
#: its training seed x 1,000,000 upward (presets/demo.py: 1,234,000,000 for the shipped weights), far above any
#: test seed a split of under a billion samples reaches
TEST_SEED_OFFSET = 10_000_000

SPECIALS = ["<pad>", "<s>", "</s>", "<image>"]
WORDS = ["what", "colour", "at", "how", "many", "where", "is", "?", "row", "col", "none"]
VOCAB: list[str] = SPECIALS + WORDS + list(COLOURS) + [str(i) for i in range(MAX_SHAPES + 1)]
TOKEN_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = (TOKEN_ID[w] for w in SPECIALS)
# CLIP's normalisation, so that the pixels look like what CLIPImageProcessor produces
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass(frozen=True)
class Sample:
    """One question about one image: ``prompt`` ids (``<s> <image>*64 question``), the ``answer``
    ids (ending in ``</s>``) and the normalised pixels [3, 56, 56] float32."""
    seed: int
    kind: str
    pixels: np.ndarray
    prompt: list[int]
    answer: list[int]

    @property
    def question(self) -> str:
        return " ".join(VOCAB[t] for t in self.prompt if t not in (BOS_ID, IMAGE_ID))

    @property
    def answer_text(self) -> str:
        return " ".join(VOCAB[t] for t in self.answer)


def encode(words: str) -> list[int]:
    return [TOKEN_ID[w] for w in words.split()]


def render(cells: dict[tuple[int, int], str], rng: np.random.Generator) -> np.ndarray:
    """RGB image [56, 56, 3] in [0, 1]: noisy grey background, a jittered square per filled cell."""
    img = 0.5 + 0.05 * rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, 3))
    for (r, c), colour in cells.items():
        size = int(rng.integers(8, 13))
        y = r * CELL + int(rng.integers(0, CELL - size + 1))
        x = c * CELL + int(rng.integers(0, CELL - size + 1))
        img[y:y + size, x:x + size] = np.array(COLOURS[colour]) + 0.05 * rng.standard_normal((size, size, 3))
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def normalise(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] in [0, 1] -> CLIP-normalised [3, H, W] float32."""
    return ((rgb - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).astype(np.float32)


def make_sample(seed: int, kind: str | None = None) -> Sample:
    """The sample of ``seed`` (deterministic); ``kind`` forces the question kind."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    n_shapes = int(rng.integers(MIN_SHAPES, MAX_SHAPES + 1))
    flat = rng.choice(GRID * GRID, size=n_shapes, replace=False)
    cells = {(int(i) // GRID, int(i) % GRID): names[int(rng.integers(len(names)))] for i in flat}
    pixels = normalise(render(cells, rng))
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    if kind == "where":
        unique = [c for c in names if sum(v == c for v in cells.values()) == 1]
        if not unique:                      # no colour occurs exactly once: ask for a count instead
            kind = "count"
    if kind == "colour":
        # half the questions about a filled cell, half about any cell (mostly empty ones)
        if rng.random() < 0.5:
            r, c = list(cells)[int(rng.integers(len(cells)))]
        else:
            r, c = int(rng.integers(GRID)), int(rng.integers(GRID))
        question, answer = f"what colour at row {r} col {c} ?", cells.get((r, c), "none")
    elif kind == "count":
        colour = names[int(rng.integers(len(names)))]
        question, answer = f"how many {colour} ?", str(sum(v == colour for v in cells.values()))
    else:
        colour = unique[int(rng.integers(len(unique)))]
        (r, c), = [rc for rc, v in cells.items() if v == colour]
        question, answer = f"where is {colour} ?", f"row {r} col {c}"
    prompt = [BOS_ID] + [IMAGE_ID] * IMAGE_TOKENS + encode(question)
    return Sample(seed, kind, pixels, prompt, encode(answer) + [EOS_ID])


def split(name: str, size: int, start: int = 0) -> list[Sample]:
    """``size`` samples of the ``train`` or ``test`` split (disjoint seed ranges)."""
    if name not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {name!r}")
    base = TEST_SEED_OFFSET if name == "test" else 0
    return [make_sample(base + start + i) for i in range(size)]


def chance_accuracy(samples: list[Sample]) -> float:
    """Accuracy of the best image-blind guesser: the most frequent answer for each question text
    (measured on ``samples`` themselves, so an upper bound on what ignoring the image achieves)."""
    by_question: dict[str, dict[str, int]] = {}
    for s in samples:
        counts = by_question.setdefault(s.question, {})
        counts[s.answer_text] = counts.get(s.answer_text, 0) + 1
    return sum(max(c.values()) for c in by_question.values()) / max(1, len(samples))
