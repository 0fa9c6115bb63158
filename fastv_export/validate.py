"""Validate a bundle against the PyTorch reference on the same inputs (DESIGN §5).

Per batch size: the reference FastV (apply_fastv on the source model) and the ONNX Runtime graphs
generate greedily from the same synthetic prompts. Compared:
- each graph's outputs on the prefill (Polygraphy comparator; RunResults saved beside the report);
- the selection, tie-aware: kept sets must match except for candidates whose reference scores lie
  within ``score_tol`` of the cut-off; such swaps are reported and the generation is repeated with
  the reference's selection forced, so a borderline swap never hides a numeric bug;
- logits at every step (max abs error <= ``logits_tol``) and the greedy tokens (identical).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastv_export.adapters import get_adapter
from fastv_export.bundle import Bundle, config_hash, load_bundle
from fastv_export.config import FastVConfig
from fastv_export.errors import FastVError
from fastv_export.prompts import Prompt, make_prompt
from fastv_export.presets import load_model
from fastv_export.reference.fastv import apply_fastv
from fastv_export.runtime.ort import OrtRuntime

log = logging.getLogger(__name__)

# fp32: DESIGN §5. fp16: the graphs run in fp16 (ORT CPU), the reference in fp32. fp16 rounds to
# ~4.9e-4 relative per op; over the 4 tiny layers the logits (|logit| ~ 5-10) drift ~1e-2 (measured
# 4.7e-2 worst), and residual-stream hidden states (|h| up to ~27) carry errors that scale with
# the tensor's magnitude, not the element's (measured 0.105 on an element of 0.59 in a tensor whose
# max is 26.7): fp16 graph outputs are compared with atol = graph x max(1, max|reference|).
TOLERANCES = {"fp32": {"logits": 1e-4, "graph": 1e-4, "graph_scaled": False, "score": 1e-6},
              "fp16": {"logits": 1e-1, "graph": 1e-2, "graph_scaled": True, "score": 2e-3}}


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
    forced_max_logits_error: float | None = None
    forced_tokens_identical: bool | None = None
    graphs: dict = field(default_factory=dict)
    passed: bool = False
    failure: str = ""


def _images(prompt: Prompt, adapter, count: int) -> list[np.ndarray]:
    px = prompt.vision["pixel_values"].numpy()
    per = len(px) // count
    return [px[i * per:(i + 1) * per] for i in range(count)]


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
    kept, scores, cands = h.kept_positions, h.candidate_scores, h.candidate_positions
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


def _graph_checks(bundle: Bundle, adapter, cfg: FastVConfig, prompt: Prompt, runtime: OrtRuntime,
                  tol: float, scaled: bool, out_dir: Path, tag: str) -> dict:
    """Each graph against its PyTorch module on the prefill inputs (Polygraphy comparator)."""
    from polygraphy.comparator import CompareFunc, Comparator, IterationResult, RunResults
    from polygraphy.logger import G_LOGGER

    from fastv_export.export.modules import Embed, PostK, PreK
    from fastv_export.runtime.positions import prefill_positions
    from fastv_export.reference.selection import select_kept

    G_LOGGER.module_severity = G_LOGGER.ERROR
    manifest = bundle.manifest
    dtype = torch.float32  # the reference modules run in fp32 whatever the graphs' precision
    ids = prompt.input_ids.numpy()
    mask = prompt.attention_mask.numpy()
    images = _images(prompt, adapter, len(prompt.segments[0].images) * ids.shape[0])
    pos = prefill_positions(manifest, ids, mask)
    results = {}
    k = cfg.k
    with torch.no_grad():
        # vision + embed
        feats_t = torch.cat([adapter.image_features(torch.from_numpy(px).to(dtype)) for px in images])
        feats_o = runtime.image_features(images)
        emb_t = Embed(adapter)(prompt.input_ids, feats_t)
        emb_o = runtime.sessions["embed"].run(None, {"input_ids": ids, "image_features": feats_o})[0]
        # pre-K: layers < K then the selection, in torch
        pre = PreK(adapter, k, "all" if cfg.ranking == "mean" else "last")
        z = torch.zeros(ids.shape[0], runtime.kv_shape[0], 0, runtime.kv_shape[1], dtype=dtype)
        hidden, q, key, *_ = pre(torch.from_numpy(emb_o).float(), prompt.attention_mask, torch.from_numpy(pos),
                                 *([z] * (2 * k)))
        cands = torch.from_numpy(runtime.candidates(ids))
        m = cands.shape[1]
        from fastv_export.reference.selection import candidate_scores
        sc = candidate_scores(cfg.ranking, cands, seed=cfg.seed, query=q, key=key,
                              key_valid=prompt.attention_mask.bool(), scale=pre.layers[k - 1].self_attn.scaling)
        kept_t = select_kept(sc, cands, ids.shape[1], cfg.keep_count(m))
        pre_o = runtime.sessions["pre_k"]
        names = [o.name for o in pre_o.get_outputs()]
        feeds = {"inputs_embeds": emb_o, "attention_mask": mask, "position_ids": pos, "candidate_positions":
                 cands.numpy(), **runtime._empty_past(ids.shape[0], range(k))}
        outs = dict(zip(names, pre_o.run(None, feeds)))
        same_sel = np.array_equal(outs["kept_indices"], kept_t.numpy())
        kept = outs["kept_indices"]
        sel_t = torch.gather(hidden, 1, torch.from_numpy(kept)[:, :, None].expand(-1, -1, hidden.shape[-1]))
        # post-K on the graphs' own pre-K output
        post = PostK(adapter, k)
        post_mask = np.take_along_axis(mask, kept, axis=1)
        zp = [z] * (2 * (runtime.num_layers - k))
        logits_t = post(torch.from_numpy(outs["hidden_states"]).float(), torch.from_numpy(post_mask),
                        torch.from_numpy(outs["selected_position_ids"]), *zp)[0]
        post_o = runtime.sessions["post_k"].run(["logits"], {
            "hidden_states": outs["hidden_states"], "attention_mask": post_mask,
            "position_ids": outs["selected_position_ids"], **runtime._empty_past(ids.shape[0], range(k, runtime.num_layers))})[0]
    pairs = {"vision": ({"image_features": feats_t}, {"image_features": feats_o}),
             "embed": ({"inputs_embeds": emb_t}, {"inputs_embeds": emb_o}),
             "pre_k": ({"hidden_states": sel_t}, {"hidden_states": outs["hidden_states"]}),
             "post_k": ({"logits": logits_t}, {"logits": post_o})}
    for graph, (t_out, o_out) in pairs.items():
        rr = RunResults()
        rr.append(("pytorch", [IterationResult({k_: v.float().numpy() for k_, v in t_out.items()},
                                                runner_name="pytorch")]))
        rr.append(("onnxruntime", [IterationResult({k_: np.asarray(v, dtype=np.float32) for k_, v in o_out.items()},
                                                   runner_name="onnxruntime")]))
        atol = tol * max([1.0] + [float(v.abs().max()) for v in t_out.values()]) if scaled else tol
        acc = Comparator.compare_accuracy(rr, compare_func=CompareFunc.simple(atol=atol, rtol=0.0))
        err = max(float(np.abs(t_out[n_].float().numpy() - np.asarray(o_out[n_], np.float32)).max())
                  for n_ in t_out)
        path = out_dir / f"{tag}_{graph}.polygraphy.json"
        rr.save(str(path))
        results[graph] = {"max_abs_error": err, "passed": bool(acc), "tolerance": atol, "run_results": path.name}
    results["pre_k"]["selection_identical_to_torch_on_same_inputs"] = bool(same_sel)
    return results


def validate_bundle(path: str | Path, max_new_tokens: int = 32, batch_sizes: tuple[int, ...] = (1, 3),
                    report_dir: str | Path | None = None, seed: int = 0,
                    perturbed_runtime: OrtRuntime | None = None) -> dict:
    bundle = load_bundle(path)
    m = bundle.manifest
    f = m["fastv"]
    cfg = FastVConfig(k=f["k"], ratio=None if f["keep"] is not None else f["ratio"], keep=f["keep"],
                      ranking=f["ranking"], seed=f["seed"])
    precision = m["precision"]
    tol = TOLERANCES[precision]
    model = load_model(m["source_model"]["name"])
    adapter = get_adapter(model)
    if config_hash(adapter) != m["source_model"]["config_sha256"]:
        raise FastVError(f"{bundle.path}/manifest.json field 'source_model.config_sha256' does not match the "
                         f"model {m['source_model']['name']!r}: the bundle is stale; re-export it")
    runtime = perturbed_runtime or OrtRuntime(bundle, expose_layer_hidden=True)
    out_dir = Path(report_dir) if report_dir else bundle.path / "validation"
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for b in batch_sizes:
        prompt = make_prompt(adapter, [12 + 5 * i for i in range(b)], num_images=1, seed=seed + b)
        ref_tokens, ref_logits, ref_kept, scores, cands = _reference(model, cfg, prompt, max_new_tokens)
        images = _images(prompt, adapter, b)
        gen = runtime.generate(prompt.input_ids.numpy(), prompt.attention_mask.numpy(), images, max_new_tokens)
        ort_logits = np.stack(gen.step_logits, axis=1)
        keep = cfg.keep_count(cands.shape[1]) if cands is not None else 0
        same, swaps, failure = compare_selection(ref_kept, gen.kept_indices, cands, scores, keep, tol["score"])
        case = CaseReport(batch=b, prompt_tokens=int(prompt.input_ids.shape[1]),
                          image_tokens=0 if cands is None else int(cands.shape[1]),
                          kept_tokens=int(gen.kept_indices.shape[1]),
                          max_logits_error=float(np.abs(ort_logits - ref_logits).max()),
                          tokens_identical=bool(np.array_equal(gen.tokens, ref_tokens)),
                          selection_identical=same, borderline_swaps=swaps)
        ok = same and case.tokens_identical and case.max_logits_error <= tol["logits"]
        if not same and not failure:
            forced = runtime.generate(prompt.input_ids.numpy(), prompt.attention_mask.numpy(), images,
                                      max_new_tokens, forced_kept=ref_kept.numpy())
            fl = np.stack(forced.step_logits, axis=1)
            case.forced_max_logits_error = float(np.abs(fl - ref_logits).max())
            case.forced_tokens_identical = bool(np.array_equal(forced.tokens, ref_tokens))
            ok = case.forced_tokens_identical and case.forced_max_logits_error <= tol["logits"]
        case.graphs = _graph_checks(bundle, adapter, cfg, prompt, runtime, tol["graph"], tol["graph_scaled"], out_dir,
                                    f"batch{b}")
        ok = ok and all(g["passed"] for g in case.graphs.values())
        case.failure = failure or ("" if ok else _why(case, tol))
        case.passed = ok and not failure
        cases.append(case)
    report = {"bundle": str(bundle.path), "model": m["source_model"]["name"], "fastv": f, "precision": precision,
              "tolerances": tol, "max_new_tokens": max_new_tokens, "cases": [asdict(c) for c in cases],
              "passed": all(c.passed for c in cases)}
    tmp = out_dir / "validation.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out_dir / "validation.json")
    return report


def _why(case: CaseReport, tol: dict) -> str:
    bad = [g for g, r in case.graphs.items() if not r["passed"]]
    if bad:
        return f"graph outputs differ beyond {tol['graph']}: {', '.join(bad)}"
    if not case.tokens_identical and case.forced_tokens_identical is not True:
        return "greedy tokens differ"
    return f"logits differ by more than {tol['logits']}"


def format_report(report: dict) -> str:
    lines = [f"validation of {report['bundle']} ({report['model']}, K={report['fastv']['k']} "
             f"R={report['fastv']['ratio']} {report['fastv']['ranking']}, {report['precision']}; "
             f"tolerances: logits {report['tolerances']['logits']}, graphs {report['tolerances']['graph']})",
             f"{'batch':>5} {'n':>5} {'M':>4} {'n_kept':>6} {'logits err':>11} {'tokens':>7} {'selection':>10} "
             f"{'vision':>9} {'embed':>9} {'pre_k':>9} {'post_k':>9}  result"]
    for c in report["cases"]:
        sel = "same" if c["selection_identical"] else f"{len(c['borderline_swaps'])} swaps"
        g = c["graphs"]
        lines.append(f"{c['batch']:>5} {c['prompt_tokens']:>5} {c['image_tokens']:>4} {c['kept_tokens']:>6} "
                     f"{c['max_logits_error']:>11.2e} {'same' if c['tokens_identical'] else 'DIFF':>7} {sel:>10} "
                     + " ".join(f"{g[x]['max_abs_error']:>9.1e}" for x in ("vision", "embed", "pre_k", "post_k"))
                     + f"  {'PASS' if c['passed'] else 'FAIL: ' + c['failure']}")
        if c["forced_max_logits_error"] is not None:
            lines.append(f"      forced reference selection: logits err {c['forced_max_logits_error']:.2e}, "
                         f"tokens {'same' if c['forced_tokens_identical'] else 'DIFF'}")
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)
