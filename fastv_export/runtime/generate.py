"""Generation over any :class:`~fastv_export.runtime.runner.Runner`, written once (greedy, or a
:class:`~fastv_export.runtime.sampling.Sampler` over the logits, a callback per token):
vision -> embed -> pre_k (TokenSelect) -> post_k in prefill, then decode steps over the two KV
caches (layers < K hold n prompt tokens, layers >= K the n' kept ones), exactly as the manifest's
``pipeline`` section describes. The prefill's feeds and outputs of every graph are kept
(:class:`StageIO`) so that validation can check each graph on the very inputs it saw.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from fastv_export.errors import FastVError
from fastv_export.graphs import spec
from fastv_export.media import Media
from fastv_export.runtime.positions import decode_positions, prefill_positions
from fastv_export.runtime.runner import Runner
from fastv_export.runtime.vision_feeds import vision_calls

#: how the prefill's pre_k call is made: (runner, feeds) -> outputs. The default runs the graph; a
#: comparator may substitute a selection of its own (see fastv_export.validate.forced_selection).
PreKStep = Callable[[Runner, Mapping[str, np.ndarray]], dict[str, np.ndarray]]
#: chooses the next token of each row: logits [B, V] float32 -> ids [B] int64 (e.g. a runtime.sampling.Sampler)
ChooseToken = Callable[[np.ndarray], np.ndarray]
#: called once per chosen token, in order: (step, tokens [B]); returning True stops after that token
OnToken = Callable[[int, np.ndarray], "bool | None"]


@dataclass
class StageIO:
    """Feeds and outputs of one graph call, by name."""
    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


@dataclass
class DecodeState:
    """What the next decode step needs: both KV caches (layers < K over the n prompt tokens, layers >= K
    over the n' kept ones, plus the tokens generated so far), the attention masks over them, the prompt's
    position ids, the logits that choose the next token and the step it is."""
    pre_past: dict[str, np.ndarray]
    post_past: dict[str, np.ndarray]
    attention_mask: np.ndarray             # [B, n + t]
    post_mask: np.ndarray                  # [B, n' + t]
    positions: np.ndarray                  # the prompt's position ids ([B, n] or [3, B, n])
    logits: np.ndarray                     # [B, V]
    step: int = 0

    def repeat(self, times: int) -> "DecodeState":
        """Every row ``times`` times (row r becomes rows r*times .. r*times + times - 1): a batch whose
        decode steps cost what ``times`` such prompts cost, from one prefill (benchmarks of batch decode)."""
        def rows(x: np.ndarray, axis: int = 0) -> np.ndarray:
            return np.repeat(x, times, axis=axis)

        return DecodeState({n: rows(v) for n, v in self.pre_past.items()},
                           {n: rows(v) for n, v in self.post_past.items()}, rows(self.attention_mask),
                           rows(self.post_mask), rows(self.positions, self.positions.ndim - 2), rows(self.logits),
                           self.step)


@dataclass
class Generation:
    tokens: np.ndarray                     # [B, T] generated token ids
    step_logits: list[np.ndarray]          # T x [B, V] logits that chose each token
    kept: np.ndarray                       # [B, n'] kept prompt positions
    prefill: dict[str, StageIO] = field(default_factory=dict)   # graph -> its prefill call
    timings: dict[str, float] = field(default_factory=dict)
    state: DecodeState | None = None       # the caches after the prompt and every token but the last


def find_candidates(input_ids: np.ndarray, image_token_ids) -> np.ndarray:
    """Positions [B, M] (ascending) of the image tokens of each row; every row must hold M."""
    is_image = np.isin(input_ids, np.asarray(image_token_ids))
    counts = is_image.sum(axis=1)
    if len(set(counts.tolist())) > 1:
        raise FastVError(f"the prompts of this batch hold different numbers of image tokens ({counts.tolist()})")
    return np.stack([np.nonzero(row)[0] for row in is_image]).astype(np.int64).reshape(len(input_ids), -1)


def empty_past(runner: Runner, batch: int, layers: range) -> dict[str, np.ndarray]:
    """Zero-length KV caches of ``layers`` (what a prefill feeds)."""
    heads, head_dim = runner.bundle.kv_shape
    z = np.zeros((batch, heads, 0, head_dim), dtype=runner.bundle.float_dtype)
    return {name: z for name in spec.past_names(layers)}


def _next_past(outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {spec.present_to_past(n): v for n, v in outputs.items() if spec.is_present(n)}


def _vision_outputs(bundle) -> list[str]:
    """The vision graph's outputs: the features, then one DeepStack level each (DeepStack families)."""
    return [spec.IMAGE_FEATURES] + spec.level_names(spec.DEEPSTACK_FEATURES, range(bundle.deepstack_layers))


def encode_media(runner: Runner, images: list[np.ndarray],
                 media: Sequence[Media] | None = None) -> dict[str, np.ndarray]:
    """The vision graph on each call's pixels (``images``: one image of the exported size each, or the units
    of the bundle's dynamic layout, whose other feeds come from ``media``): each of its outputs (features,
    DeepStack levels), concatenated in order."""
    bundle = runner.bundle
    names = _vision_outputs(bundle)
    if not images:
        return {n: np.zeros((0, bundle.hidden_size), dtype=bundle.float_dtype) for n in names}
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feeds in vision_calls(bundle, images, media, bundle.float_dtype):
        out = runner.infer("vision", feeds)
        for n in names:
            parts[n].append(out[n])
    return {n: np.concatenate(v, axis=0) for n, v in parts.items()}


def encode_images(runner: Runner, images: list[np.ndarray], media: Sequence[Media] | None = None) -> np.ndarray:
    """The vision graph's features of each call, concatenated in order."""
    return encode_media(runner, images, media)[spec.IMAGE_FEATURES]


def _levels(outputs: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The DeepStack per-level tensors among ``outputs`` whose names start with ``prefix``."""
    return {n: v for n, v in outputs.items() if n.startswith(prefix + ".")}


def _run_pre_k(runner: Runner, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return runner.infer("pre_k", feeds)


def generate(runner: Runner, input_ids: np.ndarray, attention_mask: np.ndarray, images: list[np.ndarray],
             max_new_tokens: int, *, eos_token_id: int | Sequence[int] | None = None,
             pre_k_step: PreKStep = _run_pre_k, video_seconds: Sequence[float] | None = None,
             media: Sequence[Media] | None = None, sampler: ChooseToken | None = None,
             on_token: OnToken | None = None) -> Generation:
    """Generation of up to ``max_new_tokens`` tokens (a row stops at ``eos_token_id``: one id or several, as a
    generation config lists them), greedy or chosen by
    ``sampler``, ``on_token`` called for each (see :func:`decode`).
    ``images``: the pixels of each vision-graph call in prompt order (rows in order): one per image, and per
    temporal patch (Qwen2-VL family) or per whole video (tiles layout) of a video; ``media``: every row's
    media, rows in order, for bundles with a dynamic vision layout or images of other sizes (None: images
    of the exported size); ``video_seconds``: seconds per temporal patch of each video of the batch
    (families whose video positions follow time, see the manifest's ``positions``)."""
    bundle = runner.bundle
    k, num_layers = bundle.k, bundle.num_layers
    timings: dict[str, float] = {}
    record: dict[str, StageIO] = {}
    t0 = time.perf_counter()
    input_ids = input_ids.astype(np.int64)
    attention_mask = attention_mask.astype(np.int64)
    b = input_ids.shape[0]
    vision = encode_media(runner, images, media)
    record["vision"] = StageIO({}, vision)
    timings["vision"] = time.perf_counter() - t0
    positions = prefill_positions(bundle, input_ids, attention_mask, video_seconds, media)

    t1 = time.perf_counter()
    feeds = {spec.INPUT_IDS: input_ids, **vision}
    embed_out = runner.infer("embed", feeds)
    embeds = embed_out[spec.INPUTS_EMBEDS]
    record["embed"] = StageIO(feeds, embed_out)
    feeds = {spec.INPUTS_EMBEDS: embeds, spec.ATTENTION_MASK: attention_mask, spec.POSITION_IDS: positions,
             **empty_past(runner, b, range(k)), **_levels(embed_out, spec.DEEPSTACK_EMBEDS),
             spec.CANDIDATE_POSITIONS: find_candidates(input_ids, bundle.image_token_ids)}
    pre = pre_k_step(runner, feeds)
    record["pre_k"] = StageIO(feeds, pre)
    kept = pre[spec.KEPT_INDICES]
    pre_past = _next_past(pre)
    post_mask = np.take_along_axis(attention_mask, kept, axis=1)
    timings["pre_k"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    feeds = {spec.HIDDEN_STATES: pre[spec.HIDDEN_STATES], spec.ATTENTION_MASK: post_mask,
             spec.POSITION_IDS: pre[spec.SELECTED_POSITION_IDS], **empty_past(runner, b, range(k, num_layers)),
             **_levels(pre, spec.KEPT_DEEPSTACK_EMBEDS)}
    post = runner.infer("post_k", feeds)
    record["post_k"] = StageIO(feeds, post)
    post_past = _next_past(post)
    logits = post[spec.LOGITS][:, -1].astype(np.float32)
    timings["post_k"] = time.perf_counter() - t2
    timings["prefill"] = time.perf_counter() - t0

    state = DecodeState(pre_past, post_past, attention_mask, post_mask, positions, logits)
    t3 = time.perf_counter()
    tokens, step_logits = decode(runner, state, max_new_tokens, eos_token_id=eos_token_id, sampler=sampler,
                                 on_token=on_token)
    timings["decode_per_token"] = (time.perf_counter() - t3) / max(1, len(tokens) - 1)
    return Generation(np.stack(tokens, axis=1), step_logits, kept, record, timings, state)


def decode(runner: Runner, state: DecodeState, max_new_tokens: int, *,
           eos_token_id: int | Sequence[int] | None = None, sampler: ChooseToken | None = None,
           on_token: OnToken | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Decoding from ``state`` (advanced in place): the next ``max_new_tokens`` tokens [B] and the
    logits [B, V] that chose each. The first token comes from ``state.logits``; each further one costs one
    decode step (embed, pre_k, post_k) on the token before it; the last token chosen is not fed, so
    ``state.logits`` stays the logits that chose it. A row stops at any id of ``eos_token_id`` (then pads).
    ``sampler`` chooses each token from the logits (None: greedy argmax, the lowest id among equal maxima);
    ``on_token(step, tokens)`` is called once per chosen token (step 0, 1, ..., the tokens as returned, pads
    included), and its returning True stops decoding after that token."""
    bundle = runner.bundle
    b = state.logits.shape[0]
    hidden = bundle.hidden_size
    no_features = np.zeros((0, hidden), dtype=bundle.float_dtype)
    no_media = {n: no_features for n in _vision_outputs(bundle)}
    no_candidates = np.zeros((b, 0), dtype=np.int64)
    ones = np.ones((b, 1), dtype=np.int64)
    finished = np.zeros(b, dtype=bool)
    eos = None if eos_token_id is None else np.atleast_1d(np.asarray(eos_token_id, dtype=np.int64))
    tokens, step_logits = [], []
    for i in range(max_new_tokens):
        nxt = (state.logits.argmax(-1) if sampler is None else sampler(state.logits)).astype(np.int64)
        if eos is not None and eos.size:
            nxt = np.where(finished, bundle.pad_token_id, nxt)
            finished |= np.isin(nxt, eos)
        tokens.append(nxt)
        step_logits.append(state.logits)
        stop = on_token is not None and bool(on_token(i, nxt.copy()))
        if stop or i == max_new_tokens - 1 or finished.all():
            break
        emb = runner.infer("embed", {spec.INPUT_IDS: nxt[:, None], **no_media})
        state.attention_mask = np.concatenate([state.attention_mask, ones], axis=1)
        state.post_mask = np.concatenate([state.post_mask, ones], axis=1)
        o = runner.infer("pre_k", {spec.INPUTS_EMBEDS: emb[spec.INPUTS_EMBEDS],
                                   spec.ATTENTION_MASK: state.attention_mask,
                                   spec.POSITION_IDS: decode_positions(state.positions, state.step), **state.pre_past,
                                   **_levels(emb, spec.DEEPSTACK_EMBEDS), spec.CANDIDATE_POSITIONS: no_candidates})
        state.pre_past = _next_past(o)
        res = runner.infer("post_k", {spec.HIDDEN_STATES: o[spec.HIDDEN_STATES], spec.ATTENTION_MASK: state.post_mask,
                                      spec.POSITION_IDS: o[spec.SELECTED_POSITION_IDS], **state.post_past,
                                      **_levels(o, spec.KEPT_DEEPSTACK_EMBEDS)})
        state.post_past = _next_past(res)
        state.logits = res[spec.LOGITS][:, -1].astype(np.float32)
        state.step += 1
    return tokens, step_logits
