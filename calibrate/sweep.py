"""The K x R x ranking sweep, with the shared computation reused.

Per prompt, ONE unpruned prefill (:func:`~fastv_export.reference.decode.prefill`) records what
every configuration needs: the input of each pruning layer K (hidden states and the layer's mask /
rotary / position arguments), the post-rotary query and key of each layer K-1
(:func:`~fastv_export.reference.capture.capture_query_key`; the ranking scores come from the
reference's own :func:`~fastv_export.reference.selection.candidate_scores`), the KV cache of every
layer, the prompt's position ids and the unpruned first-token logits. Then each configuration
selects its kept tokens (:func:`~fastv_export.reference.selection.select_kept`) and re-runs only
layers >= K on them (:mod:`~fastv_export.reference.gather`); its cache is the shared cache of
layers < K plus its own for layers >= K, from which the reference's
:func:`~fastv_export.reference.decode.greedy_decode` continues (decode step t at the row's largest
prompt position + 1 + t, 1-D or M-RoPE). This is exactly what
:func:`~fastv_export.reference.fastv.apply_fastv` with ``generate`` computes from scratch (the tests
check both agree).

Quantized weights (``SweepSpec.quantize``: ``none`` and the weight-only schemes of
:data:`fastv_export.quantize.SCHEMES`) add an axis: each scheme runs the same configurations on the
quantized model's PyTorch reference (a model with the bundle's integer weights dequantized,
:mod:`fastv_export.quantize.reference`), and compares them with the UNquantized unpruned model (its
first-token logits and greedy tokens from the float pass, recomputed when a resumed sweep skipped it).

The authors' re-rank-every-step semantics (:func:`~fastv_export.reference.rerank.generate_rerank`)
cannot share anything (every step re-ranks and re-runs the whole sequence); it runs per
configuration when asked for.

Results are appended per prompt to a JSONL file, so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from fastv_export.adapters import get_adapter
from fastv_export.calibrate.dataset import CalibrationItem
from fastv_export.config import FastVConfig, parse_ratio
from fastv_export.errors import FastVError
from fastv_export.files import atomic_write_text
from fastv_export.graphs.op import RANKINGS
from fastv_export.quantize import NONE, get_scheme
from fastv_export.reference.capture import capture_query_key
from fastv_export.reference.decode import Prefilled, greedy_decode, prefill
from fastv_export.reference.fastv import apply_fastv
from fastv_export.reference.gather import gather_seq, prefill_substitutions
from fastv_export.reference.rerank import generate_rerank
from fastv_export.reference.selection import candidate_scores, select_kept

log = logging.getLogger(__name__)

SEMANTICS = ("prefill", "rerank")


# ---- what to sweep ------------------------------------------------------------------------------

def config_key(cfg: FastVConfig) -> str:
    """A stable name of a configuration: ``K=2 R=1/2 last``."""
    return f"K={cfg.k} R={cfg.r.numerator}/{cfg.r.denominator} {cfg.ranking}"


def point_key(scheme: str, cfg: FastVConfig) -> str:
    """A point of the sweep: the configuration's name, after the scheme for quantized weights
    (``int4 K=2 R=1/2 last``; unquantized: ``K=2 R=1/2 last``)."""
    return config_key(cfg) if scheme == NONE else f"{scheme} {config_key(cfg)}"


def decoder_linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(out, in) of every Linear weight in the decoder layers: the weights the quantization schemes replace."""
    return [tuple(m.weight.shape) for layer in get_adapter(model).layers() for m in layer.modules()
            if isinstance(m, nn.Linear)]


@dataclass(frozen=True)
class SweepSpec:
    """The grid: every K with every ranking and every R (K = 0 admits only ``random``: a ranking
    that needs attention is skipped there), ``tokens`` greedy tokens per prompt, and the decode
    ``semantics`` to measure (``prefill``: prune once, this project's; ``rerank``: the authors'), for each
    weight ``quantize`` scheme (``none``: the model as loaded)."""
    ks: tuple[int, ...] = (0, 1, 2, 3)
    ratios: tuple[Fraction, ...] = (Fraction(1, 2), Fraction(3, 4), Fraction(9, 10))
    rankings: tuple[str, ...] = ("last", "mean")
    tokens: int = 6
    semantics: tuple[str, ...] = ("prefill",)
    seed: int = 0
    quantize: tuple[str, ...] = (NONE,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", tuple(sorted(set(int(k) for k in self.ks))))
        object.__setattr__(self, "ratios", tuple(sorted(set(parse_ratio(r) for r in self.ratios))))
        object.__setattr__(self, "rankings", tuple(dict.fromkeys(self.rankings)))
        object.__setattr__(self, "semantics", tuple(dict.fromkeys(self.semantics)))
        object.__setattr__(self, "quantize", tuple(dict.fromkeys(self.quantize)))
        if not self.quantize:
            raise FastVError(f"the quantization axis is empty: give at least one scheme, e.g. {NONE}")
        for name in self.quantize:
            get_scheme(name)                   # one line naming the choices for an unknown scheme
        if not self.ks or not self.ratios or not self.rankings:
            raise FastVError("the sweep is empty: give at least one K, one R and one ranking")
        if any(k < 0 for k in self.ks):
            raise FastVError(f"K must be >= 0, got {list(self.ks)}")
        bad = [r for r in self.rankings if r not in RANKINGS]
        if bad:
            raise FastVError(f"unknown ranking(s) {bad}: choose from {', '.join(RANKINGS)}")
        bad = [s for s in self.semantics if s not in SEMANTICS]
        if bad or "prefill" not in self.semantics:
            raise FastVError(f"semantics must include 'prefill' and may add 'rerank', got {list(self.semantics)}")
        if self.tokens < 1:
            raise FastVError(f"tokens (greedy tokens compared per prompt) must be >= 1, got {self.tokens}")

    def configs(self) -> list[FastVConfig]:
        out = []
        for k in self.ks:
            rankings = ["random"] if k == 0 else list(self.rankings)
            for ranking in rankings:
                for r in self.ratios:
                    out.append(FastVConfig(k=k, ratio=r, ranking=ranking, seed=self.seed))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {"ks": list(self.ks), "ratios": [f"{r.numerator}/{r.denominator}" for r in self.ratios],
             "rankings": list(self.rankings), "tokens": self.tokens, "semantics": list(self.semantics),
             "seed": self.seed}
        if self.quantize != (NONE,):           # results files of unquantized sweeps keep their header
            d["quantize"] = list(self.quantize)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepSpec":
        return cls(ks=tuple(d["ks"]), ratios=tuple(Fraction(r) for r in d["ratios"]), rankings=tuple(d["rankings"]),
                   tokens=int(d["tokens"]), semantics=tuple(d["semantics"]), seed=int(d.get("seed", 0)),
                   quantize=tuple(d.get("quantize", [NONE])))


@dataclass
class ItemResult:
    """One configuration on one prompt (prune-once semantics unless named ``rerank_*``)."""
    kl: float                      # KL(unpruned || FastV) of the first-token distributions (nats)
    top1: bool                     # same first token
    sequence: bool                 # same greedy tokens (up to ``tokens`` or end of sequence)
    prefix: float                  # length of the common prefix / length of the unpruned sequence
    correct: bool | None           # greedy answer equals the reference answer (None: no answer given)
    kept_attention: float | None   # share of the image tokens' layer-(K-1) attention held by the kept ones
    image_tokens: int
    kept_image_tokens: int
    text_tokens: int
    rerank_sequence: bool | None = None
    rerank_correct: bool | None = None
    tokens: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ItemResult":
        return cls(**d)


# ---- the shared prefix --------------------------------------------------------------------------

@dataclass
class Prefix:
    """What one unpruned prefill leaves for every configuration."""
    n: int
    candidates: torch.Tensor                         # [1, M]
    logits: torch.Tensor                             # [V] float32, last prompt position
    positions: torch.Tensor                          # the prompt's position ids [1, n] or [3, 1, n] (M-RoPE)
    layer_inputs: dict[int, tuple[torch.Tensor, dict]]   # K -> (hidden [1, n, D], layer kwargs)
    qk: dict[int, tuple[torch.Tensor, torch.Tensor, float]]  # layer K-1 -> post-rotary query, key, scale
    kv: list[tuple[torch.Tensor, torch.Tensor]]      # per layer, the n cached keys / values


class Session:
    """A model prepared for sweeping: each prefill records, through hooks installed for that prefill
    only, what the configurations of ``spec`` need (layer K's inputs, layer K-1's query and key)."""

    def __init__(self, model: nn.Module, spec: SweepSpec) -> None:
        self.model = model
        self.spec = spec
        self.adapter = get_adapter(model)
        self.layers = self.adapter.layers()
        num_layers = len(self.layers)
        for k in spec.ks:
            FastVConfig(k=k, ratio=0, ranking="random").check_layers(num_layers)
        self.eos = self.adapter.text_config.eos_token_id
        #: the unpruned first-token logits [V] of the prompt :func:`evaluate_item` ran last
        self.unpruned_logits: torch.Tensor | None = None

    @torch.no_grad()
    def prefix(self, item: CalibrationItem) -> Prefix:
        store: dict[int, tuple] = {}
        seen: dict[int, tuple] = {}
        hooks, undo = [], []
        try:
            for k in self.spec.ks:
                def hook(mod, args, kwargs, k=k):
                    hidden = args[0] if args else kwargs["hidden_states"]
                    seen[k] = (hidden, {a: b for a, b in kwargs.items() if a != "hidden_states"})
                hooks.append(self.layers[k].register_forward_pre_hook(hook, with_kwargs=True))
                if k >= 1:
                    def keep(query, key, scale, layer=k - 1):
                        store[layer] = (query.detach(), key.detach(), scale)
                    undo.append(capture_query_key(self.layers[k - 1].self_attn, keep))
            state = prefill(self.model, item.model_inputs())
        finally:
            for h in hooks:
                h.remove()
            for u in reversed(undo):
                u()
        kv = [(layer.keys, layer.values) for layer in state.cache.layers]
        return Prefix(n=item.input_ids.shape[1], candidates=self.adapter.find_candidates(item.input_ids),
                      logits=state.logits[0], positions=state.positions, layer_inputs=seen, qk=store, kv=kv)

    # ---- one configuration on top of the prefix -----------------------------------------------
    def reuses_prefix(self, cfg: FastVConfig) -> bool:
        """Whether ``cfg`` runs on the shared prefix. Not when K is below a DeepStack family's injecting
        layers (Qwen3-VL): its text model adds vision features after each of its first layers inside its
        own loop, which re-running layers >= K alone would skip; such a configuration runs from scratch
        (:func:`evaluate_from_scratch`)."""
        return cfg.k >= self.adapter.deepstack_layers()

    def scores(self, prefix: Prefix, cfg: FastVConfig, ranking: str | None = None) -> torch.Tensor:
        ranking = ranking or cfg.ranking
        if ranking == "random":
            return candidate_scores("random", prefix.candidates, seed=cfg.seed)
        q, k, scale = prefix.qk[cfg.k - 1]
        valid = torch.ones(1, prefix.n, dtype=torch.bool)
        return candidate_scores(ranking, prefix.candidates, query=q, key=k, key_valid=valid, scale=scale)

    @torch.no_grad()
    def run_config(self, prefix: Prefix, cfg: FastVConfig,
                   scores: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """First-token logits [V], the configuration's KV cache and the kept positions [1, n']."""
        from transformers import DynamicCache

        m = prefix.candidates.shape[1]
        keep = cfg.keep_count(m)
        kept = select_kept(scores, prefix.candidates, prefix.n, keep)
        cache = DynamicCache()
        for i in range(cfg.k):
            cache.update(*prefix.kv[i], i)
        hidden, kwargs = prefix.layer_inputs[cfg.k]
        kwargs = dict(kwargs)
        if keep < m:
            kwargs.update(prefill_substitutions(kwargs, kept, prefix.n))
            hidden = gather_seq(hidden, kept)
        kwargs["past_key_values"] = cache
        kwargs["use_cache"] = True
        for layer in self.layers[cfg.k:]:
            hidden = layer(hidden, **kwargs)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        logits = self._head(hidden[:, -1:])
        return logits, cache, kept

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter.lm_head()(self.adapter.text_model().norm(hidden))[0, -1].float()

    def greedy(self, prefix: Prefix, first_logits: torch.Tensor, cache) -> list[int]:
        """Greedy tokens from the first-token logits [V], decoding on ``cache`` at the prompt's
        positions (the reference's :func:`~fastv_export.reference.decode.greedy_decode`) until
        ``tokens`` tokens or the end-of-sequence token."""
        state = Prefilled(first_logits[None], cache, prefix.positions)
        return greedy_decode(self.model, state, self.spec.tokens, eos_token_id=self.eos,
                             pad_token_id=self.adapter.text_config.pad_token_id or 0)[0]

    def baseline_tokens(self, prefix: Prefix) -> list[int]:
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(prefix.kv):
            cache.update(k, v, i)
        return self.greedy(prefix, prefix.logits, cache)

    def rerank_tokens(self, item: CalibrationItem, cfg: FastVConfig) -> list[int]:
        inputs = item.model_inputs()
        res = generate_rerank(self.model, cfg, max_new_tokens=self.spec.tokens, eos_token_id=self.eos,
                              pad_token_id=self.adapter.text_config.pad_token_id or 0, **inputs)
        return _until_eos(res.tokens[0].tolist(), self.eos)


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


def kl_divergence(base_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(p || q) in nats of the softmax distributions of two logit vectors (float64)."""
    p = torch.log_softmax(base_logits.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return max(0.0, float((p.exp() * (p - q)).sum()))


def compare(base_tokens: list[int], tokens: list[int]) -> tuple[bool, float]:
    """(same sequence, common-prefix length / length of the unpruned sequence)."""
    common = 0
    for a, b in zip(base_tokens, tokens):
        if a != b:
            break
        common += 1
    return base_tokens == tokens, common / max(1, len(base_tokens))


def _correct(answer: list[int] | None, tokens: list[int]) -> bool | None:
    return None if answer is None else tokens[:len(answer)] == answer


def kept_share(scores: torch.Tensor, kept: torch.Tensor, candidates: torch.Tensor) -> float:
    """Share of the candidates' total score held by the kept candidates."""
    is_kept = torch.isin(candidates[0], kept[0])
    total = float(scores[0].double().sum())
    return float(scores[0].double()[is_kept].sum()) / total if total > 0 else float("nan")


@dataclass
class Reference:
    """What the points of a prompt are compared with: the unquantized, unpruned model's first-token logits [V]
    and greedy tokens."""
    logits: torch.Tensor
    tokens: list[int]


def evaluate_item(session: Session, item: CalibrationItem, configs: list[FastVConfig], scheme: str = NONE,
                  reference: Reference | None = None) -> tuple[dict, dict]:
    """All configurations on one prompt: (baseline record, {point_key: ItemResult}). ``session``'s model carries
    ``scheme``'s weights; the comparison is with ``reference`` (default: this model's own unpruned run). The
    baseline record of a quantized scheme also holds its unpruned run's comparison (``kl``, ``top1``,
    ``sequence``, ``prefix``) and, for the float pass, the unpruned first-token ``logits`` are kept out of it
    (:func:`run_sweep` holds them in memory)."""
    prefix = session.prefix(item)
    own_tokens = session.baseline_tokens(prefix)
    ref = reference or Reference(prefix.logits, own_tokens)
    base_tokens = ref.tokens
    m, n = prefix.candidates.shape[1], prefix.n
    baseline = {"tokens": own_tokens, "correct": _correct(item.answer, own_tokens), "image_tokens": m,
                "text_tokens": n - m}
    if reference is not None:
        same, pre = compare(base_tokens, own_tokens)
        baseline.update(kl=kl_divergence(ref.logits, prefix.logits), top1=int(prefix.logits.argmax()) == base_tokens[0],
                        sequence=same, prefix=pre)
    out: dict[str, ItemResult] = {}
    score_cache: dict[tuple[int, str], torch.Tensor] = {}
    for cfg in configs:
        if session.reuses_prefix(cfg):
            key = (cfg.k, cfg.ranking)
            if key not in score_cache:
                score_cache[key] = session.scores(prefix, cfg)
            logits, cache, kept = session.run_config(prefix, cfg, score_cache[key])
            tokens = session.greedy(prefix, logits, cache)
        else:
            logits, tokens, kept = _from_scratch(session.model, item, cfg, session.spec.tokens)
        same, pre = compare(base_tokens, tokens)
        if cfg.k >= 1:
            share_key = (cfg.k, "last" if cfg.ranking == "random" else cfg.ranking)
            if share_key not in score_cache:
                score_cache[share_key] = session.scores(prefix, cfg, share_key[1])
            share = kept_share(score_cache[share_key], kept, prefix.candidates) if m else None
        else:
            share = None
        res = ItemResult(kl=kl_divergence(ref.logits, logits), top1=int(logits.argmax()) == base_tokens[0],
                         sequence=same, prefix=pre, correct=_correct(item.answer, tokens), kept_attention=share,
                         image_tokens=m, kept_image_tokens=cfg.keep_count(m), text_tokens=n - m, tokens=tokens)
        if "rerank" in session.spec.semantics:
            rr = session.rerank_tokens(item, cfg)
            res.rerank_sequence = rr == base_tokens
            res.rerank_correct = _correct(item.answer, rr)
        out[point_key(scheme, cfg)] = res
    session.unpruned_logits = prefix.logits.clone()
    return baseline, out


# ---- from scratch (the comparison for tests and the benchmark) ------------------------------------

@torch.no_grad()
def evaluate_from_scratch(model: nn.Module, item: CalibrationItem, cfg: FastVConfig,
                          tokens: int) -> tuple[torch.Tensor, list[int]]:
    """First-token logits [V] and greedy tokens of ONE configuration, computed with the reference
    (:func:`apply_fastv` on the whole model, Hugging Face ``generate``): no sharing at all."""
    logits, out, _ = _from_scratch(model, item, cfg, tokens)
    return logits, out


@torch.no_grad()
def _from_scratch(model: nn.Module, item: CalibrationItem, cfg: FastVConfig,
                  tokens: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """:func:`evaluate_from_scratch` and the kept positions [1, n'] of the prefill."""
    adapter = get_adapter(model)
    eos = adapter.text_config.eos_token_id
    inputs = item.model_inputs()
    with apply_fastv(model, cfg) as handle:
        logits = model(**inputs).logits[0, -1].float()
        kept = handle.kept_positions
        kept = torch.arange(item.input_ids.shape[1])[None] if kept is None else kept.clone()   # None: none dropped
        if tokens == 1:
            out = [int(logits.argmax())]
        else:
            gen = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=adapter.text_config.pad_token_id or 0)
            out = _until_eos(gen[0, item.input_ids.shape[1]:].tolist(), eos)
    return logits, out, kept


# ---- the resumable results file -----------------------------------------------------------------

class ResultsFile:
    """JSONL: a header line (the sweep and the data), then one line per finished prompt and weight scheme (a
    quantized scheme's lines name it in ``quantize``)."""

    def __init__(self, path: str | Path | None, header: dict[str, Any]) -> None:
        self.path = Path(path) if path else None
        self.header = header
        self.done: dict[tuple[str, int], dict] = {}
        if self.path is None:
            return
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            records = []
            for line in lines:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break                      # an interrupted write: drop it and what follows
            if not records or records[0].get("header") != header:
                raise FastVError(f"{self.path} holds the results of a different sweep (model, data or grid); "
                                 "delete it or pass another --results file")
            for rec in records[1:]:
                self.done[self.key(rec)] = rec
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))
            log.info("resuming %s: %d prompts already done", self.path, len(self.done))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"header": header}) + "\n")

    @staticmethod
    def key(record: dict) -> tuple[str, int]:
        return record.get("quantize", NONE), int(record["index"])

    def append(self, record: dict) -> None:
        self.done[self.key(record)] = record
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()


@dataclass
class SweepResult:
    spec: SweepSpec
    configs: list[FastVConfig]
    items: list[dict]              # per prompt: {"index", "name", "baseline", "results": {point_key: ItemResult dict},
    seconds: float                 #   "quantized": {scheme: its unpruned run's baseline record}} (quantized sweeps)

    def item_results(self, key: str) -> list[ItemResult]:
        return [ItemResult.from_dict(it["results"][key]) for it in self.items]

    def points(self) -> list[tuple[str, FastVConfig]]:
        """(scheme, configuration) of every point, scheme by scheme."""
        return [(scheme, cfg) for scheme in self.spec.quantize for cfg in self.configs]


#: a quantized model for a scheme name: the model's PyTorch reference with that scheme's weights
QuantizedModel = Callable[[str], nn.Module]


def run_sweep(model: nn.Module, items: list[CalibrationItem], spec: SweepSpec, results: str | Path | None = None,
              header: dict[str, Any] | None = None, progress: bool = True,
              quantized_model: QuantizedModel | None = None) -> SweepResult:
    """Measure every configuration of ``spec`` on every prompt of ``items`` (prefix reuse), for each weight scheme
    of ``spec.quantize``: ``none`` on ``model``, the others on ``quantized_model(scheme)`` (asked for only while a
    scheme has prompts left), compared with ``model``'s unpruned run."""
    from tqdm import tqdm

    if not items:
        raise FastVError("the calibration set is empty: give at least one prompt")
    longest = max((len(it.answer) for it in items if it.answer is not None), default=0)
    if longest > spec.tokens:
        raise FastVError(f"--tokens {spec.tokens} is shorter than the longest reference answer ({longest} tokens), "
                         f"so no answer could be complete: pass --tokens {longest} or more")
    quantized = [s for s in spec.quantize if s != NONE]
    if quantized and quantized_model is None:
        raise FastVError(f"the sweep asks for {', '.join(quantized)} weights but no quantized model was given")
    configs = spec.configs()
    session = Session(model, spec)
    head = {"spec": spec.to_dict(), "items": [it.name for it in items], **(header or {})}
    store = ResultsFile(results, head)
    start = time.perf_counter()
    todo = {s: [i for i in range(len(items)) if (s, i) not in store.done] for s in (NONE, *quantized)}
    total = len(items) * (1 + len(quantized))
    bar = tqdm(total=total, initial=total - sum(map(len, todo.values())), desc="calibrate", unit="prompt",
               disable=not progress)
    # the float pass: the unpruned reference of every prompt (and the unquantized points when swept)
    float_configs = configs if NONE in spec.quantize else []
    references: dict[int, torch.Tensor] = {}
    for i in todo[NONE]:
        baseline, res = evaluate_item(session, items[i], float_configs)
        references[i] = session.unpruned_logits
        store.append({"index": i, "name": items[i].name, "baseline": baseline,
                      "results": {k: v.to_dict() for k, v in res.items()}})
        bar.update(1)
    needed = sorted({i for s in quantized for i in todo[s]} - set(references))
    for i in needed:                              # a resumed sweep: the float logits again (no configuration)
        evaluate_item(session, items[i], [])
        references[i] = session.unpruned_logits
    for scheme in quantized:
        if not todo[scheme]:
            continue
        qsession = Session(quantized_model(scheme), spec)
        for i in todo[scheme]:
            ref = Reference(references[i], store.done[(NONE, i)]["baseline"]["tokens"])
            baseline, res = evaluate_item(qsession, items[i], configs, scheme, ref)
            store.append({"index": i, "name": items[i].name, "quantize": scheme, "baseline": baseline,
                          "results": {k: v.to_dict() for k, v in res.items()}})
            bar.update(1)
        del qsession
    bar.close()
    ordered = []
    for i in range(len(items)):
        rec = dict(store.done[(NONE, i)])
        if quantized:
            rec["results"] = dict(rec["results"])
            rec["quantized"] = {}
            for scheme in quantized:
                q = store.done[(scheme, i)]
                rec["results"].update(q["results"])
                rec["quantized"][scheme] = q["baseline"]
        ordered.append(rec)
    return SweepResult(spec, configs, ordered, time.perf_counter() - start)


def mean(values: Iterable[float | bool | None]) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None
