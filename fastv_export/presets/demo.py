"""The trained demo preset ``tiny-llava-shapes``: a tiny LLaVA (CLIP vision tower, Llama text
model) trained on CPU on the shapes task (:mod:`fastv_export.presets.shapes`), so that what
pruning costs in quality can be measured on a model that has learned something.

``scripts/train_demo.py`` trains it from scratch and writes :data:`WEIGHTS` (safetensors,
committed: about 3 MB); :func:`build_trained` loads them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fastv_export.presets import shapes
from fastv_export.errors import FastVError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

PRESET = "tiny-llava-shapes"
WEIGHTS = Path(__file__).resolve().parent / "weights" / f"{PRESET}.safetensors"
TRAIN_SEED = 1234
# Larger than HF's 0.02: with 0.02 the attention stays near uniform over the 64 image tokens and
# training sits at the image-blind loss for hundreds of steps; 0.1 starts peaked enough to learn.
INIT_RANGE = 0.1


def demo_config():
    """LlavaConfig: CLIP vision tower (56 px, patch 7: 64 image tokens) + a 4-layer Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=shapes.IMAGE_SIZE, patch_size=shapes.PATCH, projection_dim=64,
                              initializer_range=INIT_RANGE)
    text = LlamaConfig(vocab_size=32, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       initializer_range=INIT_RANGE,
                       pad_token_id=shapes.PAD_ID, bos_token_id=shapes.BOS_ID, eos_token_id=shapes.EOS_ID)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=shapes.IMAGE_ID,
                      image_seq_length=shapes.IMAGE_TOKENS, vision_feature_layer=-1,
                      vision_feature_select_strategy="default", initializer_range=INIT_RANGE)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def build_untrained(attn_implementation: str = "sdpa", seed: int = TRAIN_SEED) -> nn.Module:
    import torch
    from transformers import LlavaForConditionalGeneration

    config = demo_config()
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return model


def build_trained(attn_implementation: str = "sdpa", dtype: torch.dtype | None = None,
                  weights: Path | None = None) -> nn.Module:
    """The demo model with the trained weights of :data:`WEIGHTS` (or ``weights``)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(weights or WEIGHTS)
    if not path.is_file():
        raise FastVError(f"the trained weights of {PRESET} are missing ({path}); "
                         "train them with: python scripts/train_demo.py")
    model = build_untrained(attn_implementation)
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, OSError, SafetensorError) as exc:   # wrong keys or shapes, or not safetensors
        raise FastVError(f"{path} does not hold the {PRESET} weights ({str(exc).splitlines()[0]}); "
                         "retrain with: python scripts/train_demo.py") from None
    return model.to(dtype or torch.float32).eval()


# ---- training -----------------------------------------------------------------------------------

@dataclass
class TrainSettings:
    steps: int = 6000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    threads: int = 2
    seed: int = TRAIN_SEED
    eval_size: int = 600

    def to_dict(self) -> dict:
        return asdict(self)


def collate(samples: list[shapes.Sample], with_answer: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded batch of ``prompt + answer`` (training) with loss targets on the answer, or
    left-padded prompts (``with_answer=False``, for generation)."""
    import torch

    seqs = [s.prompt + s.answer if with_answer else s.prompt for s in samples]
    n = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), n), shapes.PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, (s, q) in enumerate(zip(samples, seqs)):
        if with_answer:
            ids[i, :len(q)] = torch.tensor(q)
            mask[i, :len(q)] = 1
            # position t predicts token t+1: the answer tokens are predicted from len(prompt)-1 on
            p = len(s.prompt)
            labels[i, p - 1:p - 1 + len(s.answer)] = torch.tensor(s.answer)
        else:
            ids[i, n - len(q):] = torch.tensor(q)
            mask[i, n - len(q):] = 1
    pixels = torch.from_numpy(np.stack([s.pixels for s in samples]))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}


def greedy_answers(model: nn.Module, samples: list[shapes.Sample], max_new_tokens: int = shapes.MAX_ANSWER_TOKENS,
                   batch: int = 64) -> list[list[int]]:
    """Greedy answers (up to and including ``</s>``) of an unmodified model, batched."""
    import torch

    out: list[list[int]] = []
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        inputs = collate(chunk, with_answer=False)
        inputs.pop("labels")
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=shapes.PAD_ID, eos_token_id=shapes.EOS_ID)
        for row in gen[:, inputs["input_ids"].shape[1]:].tolist():
            out.append(row[:row.index(shapes.EOS_ID) + 1] if shapes.EOS_ID in row else row)
    return out


def accuracy(model: nn.Module, samples: list[shapes.Sample]) -> dict[str, float]:
    """Exact-answer accuracy overall and per question kind."""
    answers = greedy_answers(model, samples)
    hits: dict[str, list[bool]] = {}
    for s, a in zip(samples, answers):
        hits.setdefault(s.kind, []).append(a == s.answer)
    result = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    result["all"] = sum(sum(v) for v in hits.values()) / max(1, len(samples))
    return result


def train(settings: TrainSettings, out: Path | None = None, progress: bool = True) -> dict:
    """Train the demo model from scratch; write its weights (atomically) to ``out``; return a
    summary (settings, seconds, final loss, test accuracy and chance level)."""
    import torch
    from safetensors.torch import save
    from tqdm import tqdm

    from fastv_export.files import atomic_write

    torch.set_num_threads(settings.threads)
    model = build_untrained(seed=settings.seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / settings.warmup) * max(
        0.05, 1 - s / settings.steps))
    start = time.perf_counter()
    bar = tqdm(range(settings.steps), desc=f"training {PRESET}", disable=not progress)
    ema = None
    for step in bar:
        batch = [shapes.make_sample(settings.seed * 1_000_000 + step * settings.batch + i)
                 for i in range(settings.batch)]
        inputs = collate(batch)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    test = shapes.split("test", settings.eval_size)
    acc = accuracy(model, test)
    summary = {"preset": PRESET, "settings": settings.to_dict(), "train_seconds": round(seconds, 1),
               "final_loss_ema": ema, "test_size": len(test), "test_accuracy": acc,
               "chance_accuracy": shapes.chance_accuracy(test)}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write(out, lambda f: f.write(save(state, metadata={"preset": PRESET})))
        log.info("wrote %s", out)
    return summary
