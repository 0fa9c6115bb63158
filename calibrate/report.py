"""From per-prompt sweep results to a table (CSV, JSON), a Pareto frontier, a recommendation under
a constraint, and a PNG plot of quality against the Eq. 5 FLOPs ratio."""
from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from fastv_export.calibrate.sweep import SweepResult, config_key, mean
from fastv_export.config import FastVConfig
from fastv_export.errors import FastVError
from fastv_export.files import atomic_write, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

#: quality metrics a frontier and a recommendation can use (all: higher is better)
METRICS = {
    "top1": "first-token agreement with the unpruned model",
    "sequence": "greedy-sequence agreement with the unpruned model (prune once in prefill)",
    "accuracy": "task accuracy against the reference answers (prune once in prefill)",
    "rerank_sequence": "greedy-sequence agreement, authors' re-rank-every-step decoding",
    "rerank_accuracy": "task accuracy, authors' re-rank-every-step decoding",
}


@dataclass
class Row:
    """One configuration, averaged over the calibration set (``None``: not measured)."""
    key: str
    k: int
    r: str
    ranking: str
    kept_image_tokens: float
    image_tokens: float
    kl: float
    top1: float
    sequence: float
    prefix: float
    accuracy: float | None
    rerank_sequence: float | None
    rerank_accuracy: float | None
    kept_attention: float | None
    eq5_ratio: float
    exact_ratio: float
    exact_gflops: float
    kv_ratio: float
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Row":
        return cls(**d)

    def config(self, seed: int = 0) -> FastVConfig:
        return FastVConfig(k=self.k, ratio=Fraction(self.r), ranking=self.ranking, seed=seed)

    def quality(self, metric: str) -> float | None:
        return getattr(self, metric)


@dataclass
class Table:
    """The sweep's summary: the unpruned model and one :class:`Row` per configuration."""
    model: str
    data: str
    prompts: int
    baseline_accuracy: float | None
    baseline_exact_gflops: float
    rows: list[Row]
    seed: int = 0
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [r.to_dict() for r in self.rows]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Table":
        d = dict(d)
        d["rows"] = [Row.from_dict(r) for r in d["rows"]]
        return cls(**d)

    def has(self, metric: str) -> bool:
        return any(r.quality(metric) is not None for r in self.rows)


def summarize(result: SweepResult, model_name: str, data: str, shape) -> Table:
    """Average per-prompt results into a :class:`Table`; costs from ``analysis.flops.estimate`` on
    each prompt's own image / text token counts (ratios averaged, GFLOPs averaged)."""
    from fastv_export.analysis.flops import estimate

    rows = []
    base_gflops = []
    for it in result.items:
        b = it["baseline"]
        base_gflops.append(estimate(shape, b["image_tokens"], b["text_tokens"], k=0, ratio=0).exact_baseline / 1e9)
    for cfg in result.configs:
        key = config_key(cfg)
        res = result.item_results(key)
        costs = [estimate(shape, r.image_tokens, r.text_tokens, k=cfg.k, ratio=cfg.r) for r in res]
        rows.append(Row(
            key=key, k=cfg.k, r=f"{cfg.r.numerator}/{cfg.r.denominator}", ranking=cfg.ranking,
            kept_image_tokens=mean(r.kept_image_tokens for r in res), image_tokens=mean(r.image_tokens for r in res),
            kl=mean(r.kl for r in res), top1=mean(r.top1 for r in res), sequence=mean(r.sequence for r in res),
            prefix=mean(r.prefix for r in res), accuracy=mean(r.correct for r in res),
            rerank_sequence=mean(r.rerank_sequence for r in res), rerank_accuracy=mean(r.rerank_correct for r in res),
            kept_attention=mean(r.kept_attention for r in res),
            eq5_ratio=mean(c.eq5_ratio for c in costs), exact_ratio=mean(c.exact_ratio for c in costs),
            exact_gflops=mean(c.exact_fastv / 1e9 for c in costs), kv_ratio=mean(c.kv_cache_ratio for c in costs)))
    return Table(model=model_name, data=data, prompts=len(result.items),
                 baseline_accuracy=mean(it["baseline"]["correct"] for it in result.items),
                 baseline_exact_gflops=mean(base_gflops), rows=rows, seed=result.spec.seed,
                 seconds=round(result.seconds, 2))


# ---- frontier and recommendation ------------------------------------------------------------------

def checked_metric(table: Table, metric: str) -> None:
    """Refuse (one-line error) a quality metric that is unknown or that ``table`` did not measure."""
    if metric not in METRICS:
        raise FastVError(f"unknown quality metric {metric!r}: choose from {', '.join(METRICS)}")
    if not table.has(metric):
        why = ("the calibration set gives no reference answers" if "accuracy" in metric
               else "the sweep did not measure it (add --semantics rerank)")
        raise FastVError(f"metric {metric!r} is not available: {why}; choose another --metric")


def pareto_front(rows: list[Row], metric: str, cost: str = "eq5_ratio") -> list[Row]:
    """Rows not dominated by any other (lower-or-equal cost and higher-or-equal quality, one strictly),
    sorted by cost. Rows without the metric are left out."""
    pts = [r for r in rows if r.quality(metric) is not None]
    front = []
    for r in pts:
        c, q = getattr(r, cost), r.quality(metric)
        dominated = any(getattr(o, cost) <= c and o.quality(metric) >= q and
                        (getattr(o, cost) < c or o.quality(metric) > q) for o in pts if o is not r)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (getattr(r, cost), -r.quality(metric)))


@dataclass
class Recommendation:
    row: Row
    metric: str
    constraint: str

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.row.key, "k": self.row.k, "r": self.row.r, "ranking": self.row.ranking,
                "metric": self.metric, "quality": self.row.quality(self.metric), "eq5_ratio": self.row.eq5_ratio,
                "exact_ratio": self.row.exact_ratio, "kv_ratio": self.row.kv_ratio, "constraint": self.constraint}


def recommend(table: Table, metric: str, max_flops_ratio: float | None = None,
              min_agreement: float | None = None) -> Recommendation:
    """``min_agreement``: the cheapest configuration (Eq. 5 ratio) whose ``metric`` is at least that
    (within ``max_flops_ratio`` too when both are given); ``max_flops_ratio`` alone: the best ``metric``
    within that ratio (ties: the cheaper). Raises FastVError when no configuration qualifies."""
    checked_metric(table, metric)
    if max_flops_ratio is None and min_agreement is None:
        raise FastVError("give a constraint: --max-flops-ratio (best quality within it) or --min-agreement "
                         "(cheapest that meets it)")
    rows = [r for r in table.rows if r.quality(metric) is not None]
    parts = []
    if max_flops_ratio is not None:
        parts.append(f"eq5_ratio <= {max_flops_ratio:g}")
        rows = [r for r in rows if r.eq5_ratio <= max_flops_ratio + 1e-12]
    if min_agreement is not None:
        parts.append(f"{metric} >= {min_agreement:g}")
        rows = [r for r in rows if r.quality(metric) >= min_agreement - 1e-12]
    constraint = " and ".join(parts)
    if not rows:
        best = max(table.rows, key=lambda r: (r.quality(metric) or 0, -r.eq5_ratio))
        cheapest = min(table.rows, key=lambda r: r.eq5_ratio)
        raise FastVError(f"no swept configuration meets {constraint}: the best {metric} is "
                         f"{best.quality(metric):.4f} ({best.key}, FLOPs ratio {best.eq5_ratio:.3f}) and the cheapest "
                         f"FLOPs ratio {cheapest.eq5_ratio:.3f} ({cheapest.key}); relax the constraint or sweep "
                         "other K / R")
    if min_agreement is not None:
        row = min(rows, key=lambda r: (r.eq5_ratio, -r.quality(metric), r.key))
    else:
        row = min(rows, key=lambda r: (-r.quality(metric), r.eq5_ratio, r.key))
    return Recommendation(row, metric, constraint)


# ---- outputs ----------------------------------------------------------------------------------------

CSV_FIELDS = [f for f in Row.__dataclass_fields__]


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in table.rows:
        w.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v))
                    for k, v in r.to_dict().items()})
    return buf.getvalue()


def _fmt(v: float | None, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.4f}"


def format_table(table: Table, metric: str) -> str:
    """A human-readable table, frontier rows marked with ``*``."""
    front = {r.key for r in pareto_front(table.rows, metric)} if table.has(metric) else set()
    acc = table.has("accuracy")
    rr = table.has("rerank_sequence")
    head = f"{'':2}{'config':22}{'kept':>7}{'FLOPs':>7}{'KV':>6}{'KL':>9}{'top1%':>7}{'seq%':>7}"
    head += f"{'acc%':>7}" if acc else ""
    head += f"{'rr seq%':>8}" + (f"{'rr acc%':>8}" if acc else "") if rr else ""
    head += f"{'attn%':>7}"
    lines = [f"model {table.model}, data {table.data}: {table.prompts} prompts"
             + (f"; unpruned accuracy {_fmt(table.baseline_accuracy)}%" if table.baseline_accuracy is not None else ""),
             "FLOPs = Eq. 5 ratio to the unpruned prefill, KV = deep-cache ratio, kept = image tokens kept, "
             "attn% = share of layer K-1 attention on image tokens held by the kept ones; * = Pareto frontier "
             f"({metric} vs FLOPs)", head]
    for r in table.rows:
        line = f"{'*' if r.key in front else ' ':2}{r.key:22}{r.kept_image_tokens:7.1f}{r.eq5_ratio:7.3f}" \
               f"{r.kv_ratio:6.2f}{r.kl:9.4f}{_fmt(r.top1):>7}{_fmt(r.sequence):>7}"
        line += f"{_fmt(r.accuracy):>7}" if acc else ""
        line += f"{_fmt(r.rerank_sequence):>8}" + (f"{_fmt(r.rerank_accuracy):>8}" if acc else "") if rr else ""
        line += f"{_fmt(r.kept_attention):>7}"
        lines.append(line)
    return "\n".join(lines)


def plot(table: Table, metric: str, path: str | Path) -> None:
    """PNG: ``metric`` against the Eq. 5 FLOPs ratio, one curve per (K, ranking), frontier marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checked_metric(table, metric)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    groups: dict[tuple[int, str], list[Row]] = {}
    for r in table.rows:
        if r.quality(metric) is not None:
            groups.setdefault((r.k, r.ranking), []).append(r)
    markers = {"last": "o", "mean": "s", "random": "^"}
    for (k, ranking), rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: r.eq5_ratio)
        ax.plot([r.eq5_ratio for r in rows], [100 * r.quality(metric) for r in rows], marker=markers.get(ranking, "o"),
                linestyle="-" if ranking != "random" else ":", label=f"K={k} {ranking}")
    front = pareto_front(table.rows, metric)
    ax.plot([r.eq5_ratio for r in front], [100 * r.quality(metric) for r in front], color="black", linewidth=2.5,
            alpha=0.35, zorder=0, label="Pareto frontier")
    ax.scatter([r.eq5_ratio for r in front], [100 * r.quality(metric) for r in front], s=140, facecolors="none",
               edgecolors="black", zorder=3)
    if metric == "accuracy" and table.baseline_accuracy is not None:
        ax.axhline(100 * table.baseline_accuracy, color="gray", linestyle="--", label="unpruned")
    ax.set_xlabel("prefill FLOPs ratio (paper Eq. 5, FastV / unpruned)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{table.model}: {METRICS[metric]}\n({table.prompts} prompts of {table.data})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def write_outputs(table: Table, out_dir: str | Path, metric: str, recommendation: Recommendation | None = None
                  ) -> dict[str, Path]:
    """``calibration.csv``, ``calibration.json`` (table, frontier, recommendation) and ``pareto.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "calibration.csv", "json": out / "calibration.json", "png": out / "pareto.png"}
    atomic_write_text(paths["csv"], to_csv(table))
    doc = table.to_dict()
    doc["metric"] = metric
    doc["frontier"] = [r.key for r in pareto_front(table.rows, metric)] if table.has(metric) else []
    doc["recommendation"] = recommendation.to_dict() if recommendation else None
    atomic_write_json(paths["json"], doc)
    if table.has(metric):
        plot(table, metric, paths["png"])
    else:
        paths.pop("png")
    return paths
