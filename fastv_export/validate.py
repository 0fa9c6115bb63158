"""Validate a bundle against the PyTorch reference on the same inputs (docs/design.md §5).

A comparator over the reference and any :class:`~fastv_export.runtime.runner.Runner` (ONNX Runtime
by default). Per batch size, the reference FastV (apply_fastv on the source model) and the runner
(through the one generation loop, fastv_export.runtime.generate) generate greedily from the same
synthetic prompts. Compared:
- each graph's outputs on the prefill: the graph's own prefill feeds (recorded by the loop) go
  through the matching PyTorch module (Polygraphy RunResults of both saved beside the report);
- the selection, tie-aware: kept sets must match except for candidates whose reference scores lie
  within ``score_tol`` of the cut-off; such swaps are reported and the generation is repeated with
  the reference's selection forced, so a borderline swap never hides a numeric bug;
- logits at every step and the greedy tokens (identical).
Float tensors pass when every element is close (:func:`compare_close`: |a - b| <= atol + rtol x |b|, b
the reference), with tolerances by precision (``TOLERANCES``) or given (``--atol/--rtol``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fastv_export.adapters import Media, get_adapter
from fastv_export.bundle import Bundle, config_hash, load_bundle
from fastv_export.config import FastVConfig
from fastv_export.errors import FastVError
from fastv_export.files import atomic_write_json
from fastv_export.graphs import spec
from fastv_export.memory import release_freed
from fastv_export.presets import load_model
from fastv_export.prompts import Prompt, make_prompt
from fastv_export.reference import apply_fastv
from fastv_export.runtime.generate import Generation, PreKStep, generate
from fastv_export.runtime.runner import Runner

log = logging.getLogger(__name__)

# fp32: docs/design.md §5. fp16: the graphs run in fp16 (ORT CPU), the reference in fp32. fp16 rounds to
# ~4.9e-4 relative per op; over the 4 tiny layers the logits (|logit| ~ 5-10) drift ~1e-2 (measured
# 4.7e-2 worst), and residual-stream hidden states (|h| up to ~27) carry errors that scale with
# the tensor's magnitude, not the element's (measured 0.105 on an element of 0.59 in a tensor whose
# max is 26.7): fp16 graph outputs are compared with atol = graph x max(1, max|reference|).
# "logits" and "graph" are the absolute terms (atol), "rtol" the relative term of both comparisons
# (|a - b| <= atol + rtol x |b|): float32 rounding grows with the magnitude, and logits of real checkpoints
# reach |10| and more (a Qwen2.5-VL-style checkpoint: errors 1.1e-4 to 1.9e-4 on logits ~10, relative 2e-5,
# tokens and selection identical), so fp32 allows 1e-4 relative beside 1e-4 absolute; fp16 1e-2 relative
# (~20 of its 4.9e-4 relative roundings, the factor of its scaled graph tolerance).
TOLERANCES = {"fp32": {"logits": 1e-4, "graph": 1e-4, "rtol": 1e-4, "graph_scaled": False, "score": 1e-6},
              "fp16": {"logits": 1e-1, "graph": 1e-2, "rtol": 1e-2, "graph_scaled": True, "score": 2e-3}}


@dataclass
class Closeness:
    """How far ``actual`` is from ``reference``: the worst absolute error, the worst relative error
    |a - b| / |b| (over elements with b != 0), and the worst ratio of error to allowed error
    |a - b| / (atol + rtol x |b|); ``passed`` when every element is within its allowed error."""
    max_abs_error: float
    max_rel_error: float
    error_to_tolerance: float
    passed: bool


def compare_close(actual: np.ndarray, reference: np.ndarray, atol: float, rtol: float) -> Closeness:
    """Element-wise allclose semantics against the reference: |a - b| <= atol + rtol x |b| everywhere
    (numpy.isclose's rule, b the reference); tensors of different shapes, or NaN, never pass."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        return Closeness(math.inf, math.inf, math.inf, False)
    if a.size == 0:
        return Closeness(0.0, 0.0, 0.0, True)
    diff = np.abs(a - b)
    allowed = atol + rtol * np.abs(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(b != 0, diff / np.abs(b), 0.0)
        ratio = np.where(allowed > 0, diff / allowed, np.where(diff == 0, 0.0, math.inf))
    passed = bool(np.all(diff <= allowed))                       # NaN compares False: fails
    if not np.all(np.isfinite(diff)):                             # NaN or inf on either side
        return Closeness(math.nan, math.nan, math.nan, False)
    return Closeness(float(diff.max()), float(rel.max()), float(ratio.max()), passed)


def tolerances(precision: str, atol: float | None = None, rtol: float | None = None) -> dict:
    """The tolerances of a bundle's precision (``TOLERANCES``), with ``atol`` (the absolute term of the logits
    and graph comparisons) and ``rtol`` (their relative term) replacing the defaults when given."""
    tol = dict(TOLERANCES[precision])
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise FastVError(f"{name} (--{name}) must be a finite number >= 0, got {value!r}")
    if atol is not None:
        tol["logits"] = tol["graph"] = float(atol)
    if rtol is not None:
        tol["rtol"] = float(rtol)
    return tol


@dataclass
class CaseReport:
    batch: int
    prompt_tokens: int
    image_tokens: int
    kept_tokens: int
    max_logits_error: float
    tokens_identical: bool
    selection_identical: bool
    borderline_swaps: list = field(default_factory=list)
    max_logits_rel_error: float = 0.0
    logits_error_to_tolerance: float = 0.0     # max |a - b| / (atol + rtol x |b|) over every step's logits
    logits_close: bool = False                  # ... <= 1: every element within its tolerance
    forced_max_logits_error: float | None = None
    forced_logits_close: bool | None = None
    forced_tokens_identical: bool | None = None
    graphs: dict = field(default_factory=dict)
    passed: bool = False
    failure: str = ""


def _images(prompt: Prompt, adapter) -> list[np.ndarray]:
    return [u.numpy() for u in prompt.vision_units(adapter)]


def _video_seconds(prompt: Prompt) -> list[float] | None:
    s = prompt.vision.get("second_per_grid_ts")
    return None if s is None else s.tolist()


def _reference(model, cfg: FastVConfig, prompt: Prompt, steps: int):
    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id
    gen_cfg.eos_token_id = None  # exactly `steps` tokens, as the graphs generate them
    try:
        with apply_fastv(model, cfg) as h, torch.no_grad():
            out = model.generate(**prompt.model_inputs(), max_new_tokens=steps, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
    finally:
        gen_cfg.eos_token_id = eos
    kept, scores, cands = h.kept_positions, h.candidate_scores, h.candidates
    n = prompt.input_ids.shape[1]
    logits = torch.stack(out.logits, dim=1).float().numpy()       # [B, T, V]
    return out.sequences[:, n:].numpy(), logits, kept, scores, cands


def compare_selection(ref_kept: torch.Tensor, other: np.ndarray, cands: torch.Tensor, scores: torch.Tensor,
                      keep: int, tol: float) -> tuple[bool, list, str]:
    """(identical, borderline swaps, failure) — a swap is borderline when both candidates' reference
    scores lie within ``tol`` of the cut-off (the keep-th best reference score)."""
    if ref_kept is None:
        return True, [], ""
    other = torch.as_tensor(other)
    if ref_kept.shape == other.shape and torch.equal(ref_kept, other):
        return True, [], ""
    if ref_kept.shape != other.shape:
        return False, [], f"kept {tuple(other.shape)} tokens, reference {tuple(ref_kept.shape)}"
    swaps = []
    for r in range(ref_kept.shape[0]):
        a, b = set(ref_kept[r].tolist()), set(other[r].tolist())
        if a == b:
            continue
        score_of = dict(zip(cands[r].tolist(), scores[r].tolist()))
        cut = sorted(scores[r].tolist(), reverse=True)[keep - 1] if keep else float("inf")
        for pos in sorted(a ^ b):
            s = score_of.get(pos)
            if s is None or abs(s - cut) > tol:
                return False, swaps, (f"row {r}: position {pos} (reference score {s}) differs from the "
                                      f"reference selection by more than {tol} from the cut-off {cut}")
            swaps.append({"row": r, "position": pos, "kept_by": "reference" if pos in a else "graphs",
                          "score": s, "cutoff": cut})
    return False, swaps, ""


def forced_selection(kept: np.ndarray) -> PreKStep:
    """A prefill pre_k step that keeps exactly ``kept`` [B, n'] instead of the graph's choice: the
    graph runs with no candidates (TokenSelect is then the identity: all n hidden states, positions
    and the caches of layers < K), and the kept rows are gathered here."""
    kept = kept.astype(np.int64)

    def step(runner: Runner, feeds) -> dict[str, np.ndarray]:
        b = kept.shape[0]
        out = runner.infer("pre_k", {**feeds, spec.CANDIDATE_POSITIONS: np.zeros((b, 0), dtype=np.int64)})
        out[spec.HIDDEN_STATES] = np.take_along_axis(out[spec.HIDDEN_STATES], kept[:, :, None], axis=1)
        pos = feeds[spec.POSITION_IDS]
        out[spec.SELECTED_POSITION_IDS] = (np.take_along_axis(pos, kept, axis=1) if pos.ndim == 2 else
                                           np.stack([np.take_along_axis(p, kept, axis=1) for p in pos]))
        out[spec.KEPT_INDICES] = kept
        for name in [n for n in out if n.startswith(spec.KEPT_DEEPSTACK_EMBEDS + ".")]:   # DeepStack levels >= K
            out[name] = np.take_along_axis(out[name], kept[:, :, None], axis=1)
        return out
    return step


def _graph_checks(gen: Generation, adapter, cfg: FastVConfig, prompt: Prompt, runner_name: str, tol: float,
                  rtol: float, scaled: bool, out_dir: Path, tag: str) -> dict:
    """Each graph against its PyTorch module on the feeds the runner's prefill gave it (:func:`compare_close`
    on every output; both sides saved as Polygraphy RunResults). The reference modules run in fp32 whatever the
    graphs' precision."""
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.logger import G_LOGGER

    from fastv_export.export.modules import Embed, PostK, PreK
    from fastv_export.reference.selection import candidate_scores, select_kept

    G_LOGGER.module_severity = G_LOGGER.ERROR
    k = cfg.k
    io = gen.prefill
    pre_feeds, pre_out = io["pre_k"].feeds, io["pre_k"].outputs
    post_feeds = io["post_k"].feeds

    def t(x: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(x))
        return x.float() if x.is_floating_point() else x

    with torch.no_grad():
        # the model's own features of the prompt's media (its tower on each whole medium), in prompt order
        feats_t, *levels_t = adapter.media_features(prompt.media, prompt.vision)
        vision_t = {spec.IMAGE_FEATURES: feats_t,   # and the DeepStack levels (DeepStack families)
                    **{spec.level_name(spec.DEEPSTACK_FEATURES, level): d for level, d in enumerate(levels_t)}}
        emb_t = Embed(adapter)(prompt.input_ids, feats_t)
        # pre-K: layers < K on the graph's own inputs, then the selection, in torch
        pre = PreK(adapter, k, "all" if cfg.ranking == "mean" else "last")
        past = [t(pre_feeds[n]) for n in spec.past_names(range(k))]
        deepstack = adapter.deepstack_layers()
        levels = [t(pre_feeds[n]) for n in spec.level_names(spec.DEEPSTACK_EMBEDS, range(deepstack))]
        hidden, q, key, *_ = pre(t(pre_feeds[spec.INPUTS_EMBEDS]), t(pre_feeds[spec.ATTENTION_MASK]),
                                 t(pre_feeds[spec.POSITION_IDS]), *past, *levels)
        cands = t(pre_feeds[spec.CANDIDATE_POSITIONS])
        scores = candidate_scores(cfg.ranking, cands, seed=cfg.seed, query=q, key=key,
                                  key_valid=prompt.attention_mask.bool(), scale=pre.layers[k - 1].self_attn.scaling)
        kept_t = select_kept(scores, cands, hidden.shape[1], cfg.keep_count(cands.shape[1]))
        kept = pre_out[spec.KEPT_INDICES]
        same_sel = np.array_equal(kept, kept_t.numpy())
        sel_t = torch.gather(hidden, 1, torch.from_numpy(kept)[:, :, None].expand(-1, -1, hidden.shape[-1]))
        # post-K on the graph's own inputs
        past = [t(post_feeds[n]) for n in spec.past_names(range(k, adapter.decoder_shape().num_layers))]
        kept_levels = [t(post_feeds[n]) for n in spec.level_names(spec.KEPT_DEEPSTACK_EMBEDS,
                                                                   range(k, max(k, deepstack)))]
        logits_t = PostK(adapter, k)(t(post_feeds[spec.HIDDEN_STATES]), t(post_feeds[spec.ATTENTION_MASK]),
                                     t(post_feeds[spec.POSITION_IDS]), *past, *kept_levels)[0]
    pairs = {"vision": (vision_t, io["vision"].outputs),
             "embed": ({spec.INPUTS_EMBEDS: emb_t}, io["embed"].outputs),
             "pre_k": ({spec.HIDDEN_STATES: sel_t}, {spec.HIDDEN_STATES: pre_out[spec.HIDDEN_STATES]}),
             "post_k": ({spec.LOGITS: logits_t}, {spec.LOGITS: io["post_k"].outputs[spec.LOGITS]})}
    results = {}
    for graph, (t_out, o_out) in pairs.items():
        rr = RunResults()
        rr.append(("pytorch", [IterationResult({n: v.float().numpy() for n, v in t_out.items()},
                                                runner_name="pytorch")]))
        rr.append((runner_name, [IterationResult({n: np.asarray(o_out[n], dtype=np.float32) for n in t_out},
                                                 runner_name=runner_name)]))
        atol = tol * max([1.0] + [float(v.abs().max()) for v in t_out.values() if v.numel()]) if scaled else tol
        close = [compare_close(np.asarray(o_out[n], np.float32), t_out[n].float().numpy(), atol, rtol) for n in t_out]
        path = out_dir / f"{tag}_{graph}.polygraphy.json"
        rr.save(str(path))
        results[graph] = {"max_abs_error": max(c.max_abs_error for c in close),
                          "max_rel_error": max(c.max_rel_error for c in close),
                          "error_to_tolerance": max(c.error_to_tolerance for c in close),
                          "passed": all(c.passed for c in close), "tolerance": atol, "rtol": rtol,
                          "run_results": path.name}
    results["pre_k"]["selection_identical_to_torch_on_same_inputs"] = bool(same_sel)
    return results


def validate_bundle(bundle: Bundle | str | Path, max_new_tokens: int = 32, batch_sizes: tuple[int, ...] = (1, 3),
                    report_dir: str | Path | None = None, seed: int = 0, runner: Runner | None = None,
                    media: list[Media] | None = None, model: str | Path | None = None, atol: float | None = None,
                    rtol: float | None = None, requests: list | None = None,
                    open_runner: Callable[[Bundle], Runner] | None = None, fail_on_gap: bool = False) -> dict:
    """Compare ``runner`` (default: ONNX Runtime on ``bundle``, a verified Bundle or a directory verified
    here) with the PyTorch reference; writes validation.json (+ Polygraphy RunResults) and returns the
    report. ``media``: the images and videos of every prompt (default: one image of the exported size);
    ``model``: where the source model is (default: the preset, or the checkpoint the bundle records);
    ``atol``/``rtol``: the float comparisons' absolute and relative terms (default: by precision,
    ``TOLERANCES``); ``requests``: real requests (:class:`fastv_export.frontend.Request`, e.g. from
    ``load_requests``) instead of synthetic prompts, each one case, through the front end loaded from the
    bundle (its own tokenizer, processor and chat template). A quantized bundle is compared with its quantized
    reference; its gap to the unquantized model is reported with a verdict against its own tolerance
    (``fastv_export.quantize.gap.GAP_TOLERANCE``), which fails the validation only with ``fail_on_gap``.

    Memory: the PyTorch model and the runner are never held together (unless the caller passes an open
    ``runner``): the reference runs first for every prompt and only what is compared is kept, the model is
    freed, then the runner is opened (``open_runner(bundle)``, default ONNX Runtime), generates and is closed,
    and the model is loaded again for the graph checks on the feeds the runner's prefill gave each graph."""
    if runner is not None:
        bundle = runner.bundle                        # a runner holds a verified bundle
    elif not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    cfg = bundle.fastv
    precision = bundle.precision
    tol = tolerances(precision, atol, rtol)
    source = model or bundle.source
    if model is None and bundle.source_checkpoint is not None and not Path(source).is_dir():
        raise FastVError(f"the checkpoint this bundle was exported from is not at {source} (manifest field "
                         "'source_model.checkpoint', relative to the bundle); pass --model DIR")
    out_dir = Path(report_dir) if report_dir else bundle.path / "validation"

    # 1. the reference (the PyTorch model, no runner open): prompts, reference tokens, logits and selection
    torch_model = load_model(source)
    adapter = get_adapter(torch_model)
    if config_hash(adapter) != bundle.config_sha256:
        raise FastVError(f"{bundle.path}/manifest.json field 'source_model.config_sha256' does not match the "
                         f"model {str(source)!r}: the bundle is stale; re-export it")
    prompts = (_request_prompts(bundle, adapter, requests) if requests
               else [make_prompt(adapter, [12 + 5 * i for i in range(b)], num_images=1, seed=seed + b, media=media)
                     for b in batch_sizes])
    float_refs = None
    if bundle.quantization is not None:   # the unquantized model's run first (the gap), then the reference proper:
        float_refs = [_reference(torch_model, cfg, prompt, max_new_tokens)[:3] for prompt in prompts]
        _quantized_weights(torch_model, bundle)       # the bundle's integer weights dequantized in PyTorch
    refs = [_reference(torch_model, cfg, prompt, max_new_tokens) for prompt in prompts]
    inputs = [(_images(prompt, adapter), _video_seconds(prompt)) for prompt in prompts]
    del torch_model, adapter
    release_freed()

    # 2. the runner (the model freed): every generation, the forced-selection ones included
    owned = runner is None
    if owned:
        runner = open_runner(bundle) if open_runner is not None else _ort_runner(bundle)
    runner_name = runner.name
    out_dir.mkdir(parents=True, exist_ok=True)
    cases, gens, gaps = [], [], []
    for i, (prompt, (ref_tokens, ref_logits, ref_kept, scores, cands), (images, seconds)) in \
            enumerate(zip(prompts, refs, inputs)):
        b = int(prompt.input_ids.shape[0])
        ids, mask = prompt.input_ids.numpy(), prompt.attention_mask.numpy()
        gen = generate(runner, ids, mask, images, max_new_tokens, video_seconds=seconds, media=prompt.media)
        run_logits = np.stack(gen.step_logits, axis=1)
        keep = cfg.keep_count(cands.shape[1]) if cands is not None else 0
        same, swaps, failure = compare_selection(ref_kept, gen.kept, cands, scores, keep, tol["score"])
        close = compare_close(run_logits, ref_logits, tol["logits"], tol["rtol"])
        case = CaseReport(batch=b, prompt_tokens=int(ids.shape[1]),
                          image_tokens=0 if cands is None else int(cands.shape[1]),
                          kept_tokens=int(gen.kept.shape[1]),
                          max_logits_error=close.max_abs_error,
                          tokens_identical=bool(np.array_equal(gen.tokens, ref_tokens)),
                          selection_identical=same, borderline_swaps=swaps,
                          max_logits_rel_error=close.max_rel_error,
                          logits_error_to_tolerance=close.error_to_tolerance, logits_close=close.passed)
        ok = same and case.tokens_identical and case.logits_close
        if not same and not failure:
            forced = generate(runner, ids, mask, images, max_new_tokens, video_seconds=seconds, media=prompt.media,
                              pre_k_step=forced_selection(ref_kept.numpy()))
            forced_close = compare_close(np.stack(forced.step_logits, axis=1), ref_logits, tol["logits"], tol["rtol"])
            case.forced_max_logits_error = forced_close.max_abs_error
            case.forced_logits_close = forced_close.passed
            case.forced_tokens_identical = bool(np.array_equal(forced.tokens, ref_tokens))
            ok = case.forced_tokens_identical and forced_close.passed
            del forced
        case.failure, case.passed = failure, ok          # completed with the graph checks below
        cases.append(case)
        gens.append(gen)
        if float_refs is not None:
            from fastv_export.quantize.gap import quantization_gap
            gaps.append(quantization_gap(float_refs[i], gen.tokens, run_logits, gen.kept).to_dict())
    del refs
    if owned:
        runner = None                                     # the sessions closed before the model is loaded again
        release_freed()

    # 3. each graph against its PyTorch module on the feeds the runner's prefill gave it (the model again)
    torch_model = load_model(source)
    if bundle.quantization is not None:
        _quantized_weights(torch_model, bundle)
    adapter = get_adapter(torch_model)
    for case, gen, prompt in zip(cases, gens, prompts):
        case.graphs = _graph_checks(gen, adapter, cfg, prompt, runner_name, tol["graph"], tol["rtol"],
                                    tol["graph_scaled"], out_dir, f"batch{case.batch}")
        ok = case.passed and all(g["passed"] for g in case.graphs.values())
        failure = case.failure
        case.failure = failure or ("" if ok else _why(case, tol))
        case.passed = ok and not failure
    del torch_model, adapter, gens
    release_freed()
    report = {"bundle": str(bundle.path), "model": bundle.source_name, "runner": runner_name,
              "media": ([asdict(x) for x in prompts[0].media] if requests and prompts[0].media else
                        None if media is None else [asdict(x) for x in media]),
              "requests": len(requests) if requests else 0,
              "fastv": cfg.to_manifest(), "precision": precision, "tolerances": tol, "max_new_tokens": max_new_tokens,
              "cases": [asdict(c) for c in cases], "passed": all(c.passed for c in cases)}
    if float_refs is not None:
        from fastv_export.quantize.gap import GAP_TOLERANCE, over_tolerance

        over = over_tolerance(gaps, GAP_TOLERANCE)
        report["quantization"] = {"scheme": bundle.quantization_scheme, "reference": "the quantized model (the "
                                  "bundle's integer weights dequantized in PyTorch)", "gap_to_unquantized": gaps,
                                  "gap_tolerance": GAP_TOLERANCE, "gap_over_tolerance": over,
                                  "fail_on_gap": fail_on_gap}
        if over and fail_on_gap:
            report["passed"] = False
    atomic_write_json(out_dir / "validation.json", report)
    return report


def _quantized_weights(model, bundle: Bundle) -> None:
    """``model``'s quantized weights replaced (in place) by the bundle's integers dequantized in PyTorch."""
    from fastv_export.quantize.reference import apply_quantized_weights

    apply_quantized_weights(model, bundle.path, {g: bundle.file(g).name for g in ("pre_k", "post_k", "vision")})


def _ort_runner(bundle: Bundle) -> Runner:
    from fastv_export.runtime.ort import OrtRunner

    return OrtRunner(bundle)


def _request_prompts(bundle: Bundle, adapter, requests: list) -> list[Prompt]:
    """One prompt (batch 1) per request, as the front end makes it from the bundle's own serving files, with
    the vision inputs of the HF model's forward (what its processor returns) for the reference."""
    from fastv_export.frontend import Frontend
    from fastv_export.frontend.processor import model_vision_inputs

    front = Frontend.load(bundle.path, bundle)
    prompts = []
    for request in requests:
        prepared = front.prepare(request)
        ids = torch.from_numpy(prepared.input_ids)
        vision = {k: torch.from_numpy(np.ascontiguousarray(v))
                  for k, v in model_vision_inputs(prepared.processed[0], front.family).items()}
        prompts.append(Prompt(ids, torch.from_numpy(prepared.attention_mask), vision, adapter.text_inputs(ids),
                              media=list(prepared.media)))
    return prompts


def _why(case: CaseReport, tol: dict) -> str:
    bad = [g for g, r in case.graphs.items() if not r["passed"]]
    if bad:
        scaled = " x max(1, max|reference|)" if tol["graph_scaled"] else ""
        return f"graph outputs differ beyond {tol['graph']}{scaled} + {tol['rtol']} x |reference|: {', '.join(bad)}"
    if not case.tokens_identical and case.forced_tokens_identical is not True:
        return "greedy tokens differ"
    return f"logits differ by more than {tol['logits']} + {tol['rtol']} x |reference|"


def _describe(media: dict) -> str:
    size = "" if media["size"] is None else f" {media['size'][0]}x{media['size'][1]}"
    if media["kind"] == "video":
        return f"video of {media['frames']} frames{size}"
    return f"image{size or ' (exported size)'}"


def format_report(report: dict) -> str:
    tol = report["tolerances"]
    lines = [f"validation of {report['bundle']} ({report['model']}, K={report['fastv']['k']} "
             f"R={report['fastv']['ratio']} {report['fastv']['ranking']}, {report['precision']}; "
             f"tolerances |a - b| <= atol + rtol x |b|: logits atol {tol['logits']}, graphs atol {tol['graph']}"
             f"{' x max(1, max|b|)' if tol.get('graph_scaled') else ''}, rtol {tol.get('rtol', 0.0)})",
             "media per prompt: " + (", ".join(_describe(x) for x in report["media"]) if report.get("media")
                                     else "one image of the exported size"),
             f"{'batch':>5} {'n':>5} {'M':>4} {'n_kept':>6} {'logits err':>11} {'rel err':>9} {'err/tol':>7} "
             f"{'tokens':>7} {'selection':>10} "
             f"{'vision':>9} {'embed':>9} {'pre_k':>9} {'post_k':>9}  result"]
    for c in report["cases"]:
        sel = "same" if c["selection_identical"] else f"{len(c['borderline_swaps'])} swaps"
        g = c["graphs"]
        lines.append(f"{c['batch']:>5} {c['prompt_tokens']:>5} {c['image_tokens']:>4} {c['kept_tokens']:>6} "
                     f"{c['max_logits_error']:>11.2e} {c.get('max_logits_rel_error', 0.0):>9.1e} "
                     f"{c.get('logits_error_to_tolerance', 0.0):>7.2f} "
                     f"{'same' if c['tokens_identical'] else 'DIFF':>7} {sel:>10} "
                     + " ".join(f"{g[x]['max_abs_error']:>9.1e}" for x in ("vision", "embed", "pre_k", "post_k"))
                     + f"  {'PASS' if c['passed'] else 'FAIL: ' + c['failure']}")
        if c["forced_max_logits_error"] is not None:
            lines.append(f"      forced reference selection: logits err {c['forced_max_logits_error']:.2e}, "
                         f"tokens {'same' if c['forced_tokens_identical'] else 'DIFF'}")
    if report.get("quantization"):
        from fastv_export.quantize.gap import format_gaps
        lines.extend(format_gaps(report["quantization"]))
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)
