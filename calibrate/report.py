"""From per-prompt sweep results to a table (CSV, JSON, Markdown), Pareto frontiers, a recommendation under
a constraint, and PNG plots: quality against the Eq. 5 FLOPs ratio, and (with the quantization axis) the bytes
of decoder weights against the Eq. 5 FLOPs ratio."""
from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from fastv_export.calibrate.sweep import SweepResult, mean, point_key
from fastv_export.config import FastVConfig
from fastv_export.errors import FastVError
from fastv_export.files import atomic_write, atomic_write_json, atomic_write_text
from fastv_export.quantize import NONE, get_scheme

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
    quantize: str = NONE                  # the decoder weights' scheme (fastv_export.quantize.SCHEMES) or "none"
    weight_bytes: int | None = None       # bytes of the decoder layers' weights under that scheme (weight_bytes())
    accuracy_se: float | None = None      # standard error of ``accuracy`` (binomial, over the prompts)
    eq5_gflops: float | None = None       # paper Eq. 5 per-layer average, GFLOPs
    kv_bytes: float | None = None         # KV cache bytes after the prefill (mean over the prompts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Row":
        return cls(**d)

    @property
    def label(self) -> str:
        """The point's name, with its scheme even when unquantized (``none K=2 R=1/2 last``)."""
        return self.key if self.quantize != NONE else f"{NONE} {self.key}"

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
    #: per quantized scheme, its unpruned model against the unquantized one (accuracy, accuracy_se, kl, top1,
    #: sequence, weight_bytes)
    quantized: dict[str, dict[str, Any]] | None = None
    baseline_weight_bytes: int | None = None

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

    def has_weights(self) -> bool:
        return any(r.weight_bytes is not None for r in self.rows)


# ---- bytes of weights -------------------------------------------------------------------------------

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def weight_bytes(shapes: list[tuple[int, int]], scheme: str = NONE, dtype: str = "fp32") -> int:
    """Bytes of the decoder-layer Linear weights ``shapes`` ((out, in) each) stored under ``scheme``: float
    elements of ``dtype`` for ``none``; else ``bits``-bit integers (packed two to a byte for 4 bits, rounded up
    per weight) and float scales of ``dtype``: one per output channel (``block_size`` 0) or one per output channel
    and block of ``block_size`` rows of the reduction (input) axis (fastv_export/quantize/onnx_weights.py)."""
    elem = DTYPE_BYTES[dtype]
    q = get_scheme(scheme)
    total = 0
    for out, inp in shapes:
        n = out * inp
        if q is None:
            total += n * elem
            continue
        scales = out * (-(-inp // min(q.block_size, inp)) if q.block_size else 1)
        total += -(-n * q.bits // 8) + scales * elem
    return total


def parse_bytes(text: str) -> int:
    """``300MB``, ``1.5GiB``, ``2e9``, ``512 KiB``, ``1000`` -> bytes (k/M/G/T: powers of 1000; Ki/Mi/Gi/Ti: of
    1024; a trailing B optional, case ignored). FastVError for anything else."""
    import re

    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]i?)?b?\s*", str(text), re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise FastVError(f"--max-weight-bytes {text!r} is not a size: give a positive number of bytes, optionally "
                         "with a unit, e.g. 300MB, 1.5GiB or 2000000")
    return int(float(m.group(1)) * units[(m.group(2) or "").lower()])


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _se(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    p = sum(vals) / len(vals)
    return math.sqrt(p * (1 - p) / len(vals))


def summarize(result: SweepResult, model_name: str, data: str, shape,
              weight_shapes: list[tuple[int, int]] | None = None, dtype: str = "fp32") -> Table:
    """Average per-prompt results into a :class:`Table`; costs from ``analysis.flops.estimate`` on
    each prompt's own image / text token counts (ratios averaged, GFLOPs averaged; KV bytes in ``dtype``);
    bytes of weights from ``weight_shapes`` (:func:`~fastv_export.calibrate.sweep.decoder_linear_shapes`) and
    each point's scheme (:func:`weight_bytes`)."""
    from fastv_export.analysis.flops import estimate

    def wbytes(scheme: str) -> int | None:
        return None if weight_shapes is None else weight_bytes(weight_shapes, scheme, dtype)

    rows = []
    base_gflops = []
    for it in result.items:
        b = it["baseline"]
        base_gflops.append(estimate(shape, b["image_tokens"], b["text_tokens"], k=0, ratio=0).exact_baseline / 1e9)
    for scheme, cfg in result.points():
        key = point_key(scheme, cfg)
        res = result.item_results(key)
        costs = [estimate(shape, r.image_tokens, r.text_tokens, k=cfg.k, ratio=cfg.r, dtype=dtype) for r in res]
        rows.append(Row(
            key=key, k=cfg.k, r=f"{cfg.r.numerator}/{cfg.r.denominator}", ranking=cfg.ranking,
            kept_image_tokens=mean(r.kept_image_tokens for r in res), image_tokens=mean(r.image_tokens for r in res),
            kl=mean(r.kl for r in res), top1=mean(r.top1 for r in res), sequence=mean(r.sequence for r in res),
            prefix=mean(r.prefix for r in res), accuracy=mean(r.correct for r in res),
            rerank_sequence=mean(r.rerank_sequence for r in res), rerank_accuracy=mean(r.rerank_correct for r in res),
            kept_attention=mean(r.kept_attention for r in res),
            eq5_ratio=mean(c.eq5_ratio for c in costs), exact_ratio=mean(c.exact_ratio for c in costs),
            exact_gflops=mean(c.exact_fastv / 1e9 for c in costs), kv_ratio=mean(c.kv_cache_ratio for c in costs),
            quantize=scheme, weight_bytes=wbytes(scheme), accuracy_se=_se(r.correct for r in res),
            eq5_gflops=mean(float(c.eq5_fastv_per_layer) / 1e9 for c in costs),
            kv_bytes=mean(c.kv_fastv_bytes for c in costs)))
    quantized = None
    if any(s != NONE for s in result.spec.quantize):
        quantized = {}
        for scheme in result.spec.quantize:
            if scheme == NONE:
                continue
            runs = [it["quantized"][scheme] for it in result.items]
            quantized[scheme] = {"accuracy": mean(b["correct"] for b in runs),
                                 "accuracy_se": _se(b["correct"] for b in runs),
                                 "kl": mean(b["kl"] for b in runs), "top1": mean(b["top1"] for b in runs),
                                 "sequence": mean(b["sequence"] for b in runs), "weight_bytes": wbytes(scheme)}
    return Table(model=model_name, data=data, prompts=len(result.items),
                 baseline_accuracy=mean(it["baseline"]["correct"] for it in result.items),
                 baseline_exact_gflops=mean(base_gflops), rows=rows, seed=result.spec.seed,
                 seconds=round(result.seconds, 2), quantized=quantized, baseline_weight_bytes=wbytes(NONE))


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


def weight_front(rows: list[Row], metric: str) -> list[Row]:
    """The Pareto front over bytes of weights x Eq. 5 FLOPs ratio with ``metric`` as the constraint: the rows no
    other row dominates (weight bytes <=, FLOPs ratio <= and metric >=, one of them strictly), i.e. for each
    quality reached, the points that need no more weight bytes AND no more FLOPs for it. Rows without the metric or
    without weight bytes are left out; sorted by weight bytes, then FLOPs."""
    pts = [r for r in rows if r.quality(metric) is not None and r.weight_bytes is not None]

    def better_or_equal(o: Row, r: Row) -> bool:
        return (o.weight_bytes <= r.weight_bytes and o.eq5_ratio <= r.eq5_ratio
                and o.quality(metric) >= r.quality(metric))

    def same(o: Row, r: Row) -> bool:
        return (o.weight_bytes, o.eq5_ratio, o.quality(metric)) == (r.weight_bytes, r.eq5_ratio, r.quality(metric))

    front = [r for r in pts if not any(better_or_equal(o, r) and not same(o, r) for o in pts if o is not r)]
    return sorted(front, key=lambda r: (r.weight_bytes, r.eq5_ratio, -r.quality(metric), r.key))


@dataclass
class Recommendation:
    row: Row
    metric: str
    constraint: str

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.row.key, "k": self.row.k, "r": self.row.r, "ranking": self.row.ranking,
                "quantize": self.row.quantize, "weight_bytes": self.row.weight_bytes,
                "metric": self.metric, "quality": self.row.quality(self.metric), "eq5_ratio": self.row.eq5_ratio,
                "exact_ratio": self.row.exact_ratio, "kv_ratio": self.row.kv_ratio, "constraint": self.constraint}


def recommend(table: Table, metric: str, max_flops_ratio: float | None = None,
              min_agreement: float | None = None, max_weight_bytes: int | None = None,
              tolerance: float = 0.0) -> Recommendation:
    """``min_agreement``: the cheapest point (Eq. 5 ratio, then bytes of weights) whose ``metric`` is at least
    that (within the budgets too when given); budgets alone (``max_flops_ratio``, ``max_weight_bytes``): the most
    accurate point within them, where a ``metric`` within ``tolerance`` of the best counts as equal and the cheapest
    of those (Eq. 5 ratio, then bytes of weights) is chosen. Raises FastVError (one line) when nothing qualifies;
    when no point fits ``max_weight_bytes`` at all, the line names the smallest point's bytes."""
    checked_metric(table, metric)
    if max_flops_ratio is None and min_agreement is None and max_weight_bytes is None:
        raise FastVError("give a constraint: --max-flops-ratio or --max-weight-bytes (best quality within them) or "
                         "--min-agreement (cheapest that meets it)")
    if tolerance < 0:
        raise FastVError(f"--tolerance must be >= 0, got {tolerance:g}")
    rows = [r for r in table.rows if r.quality(metric) is not None]
    parts = []
    if max_weight_bytes is not None:
        if not table.has_weights():
            raise FastVError("--max-weight-bytes needs the bytes of weights of each point, which this table lacks; "
                             "run calibrate again")
        parts.append(f"weight_bytes <= {max_weight_bytes}")
        smallest = min(rows, key=lambda r: (r.weight_bytes, r.key))
        rows = [r for r in rows if r.weight_bytes <= max_weight_bytes]
        if not rows:
            raise FastVError(f"no swept point fits --max-weight-bytes {max_weight_bytes} "
                             f"({human_bytes(max_weight_bytes)}): the smallest, {smallest.label}, needs "
                             f"{smallest.weight_bytes} bytes ({human_bytes(smallest.weight_bytes)}) of decoder "
                             "weights; "
                             "raise the budget or add a smaller scheme to --quantize")
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

    def cost(r: Row) -> tuple:
        return r.eq5_ratio, (r.weight_bytes if r.weight_bytes is not None else 0)

    if min_agreement is not None:
        row = min(rows, key=lambda r: (*cost(r), -r.quality(metric), r.key))
    else:
        best = max(r.quality(metric) for r in rows)
        if tolerance > 0:
            constraint += f" ({metric} within {tolerance:g} of the best, {best:.4f}, counts as equal)"
        near = [r for r in rows if r.quality(metric) >= best - tolerance - 1e-12]
        row = min(near, key=lambda r: (-r.quality(metric), *cost(r), r.key) if tolerance == 0 else
                  (*cost(r), -r.quality(metric), r.key))
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
    quant = table.quantized is not None
    wfront = {r.key for r in weight_front(table.rows, metric)} if quant and table.has(metric) else set()
    width = max([22] + [len(r.key) + 1 for r in table.rows])
    head = f"{'':2}{'config':{width}}" + (f"{'weights':>11}" if quant else "")
    head += f"{'kept':>7}{'FLOPs':>7}{'KV':>6}{'KL':>9}{'top1%':>7}{'seq%':>7}"
    head += (f"{'acc%':>7}" + (f"{'+-se':>5}" if quant else "")) if acc else ""
    head += f"{'rr seq%':>8}" + (f"{'rr acc%':>8}" if acc else "") if rr else ""
    head += f"{'attn%':>7}"
    lines = [f"model {table.model}, data {table.data}: {table.prompts} prompts"
             + (f"; unpruned accuracy {_fmt(table.baseline_accuracy)}%" if table.baseline_accuracy is not None else ""),
             "FLOPs = Eq. 5 ratio to the unpruned prefill, KV = deep-cache ratio, kept = image tokens kept, "
             "attn% = share of layer K-1 attention on image tokens held by the kept ones; * = Pareto frontier "
             f"({metric} vs FLOPs)" + ("; weights = bytes of decoder-layer weights, + = Pareto front over weights x "
                                      f"FLOPs with {metric} as the constraint; KL and agreement against the "
                                      "unquantized unpruned model" if quant else ""), head]
    for r in table.rows:
        mark = ("*" if r.key in front else " ") + ("+" if r.key in wfront else " ")
        line = f"{mark:2}{r.key:{width}}" + (f"{human_bytes(r.weight_bytes):>11}" if quant else "")
        line += f"{r.kept_image_tokens:7.1f}{r.eq5_ratio:7.3f}{r.kv_ratio:6.2f}{r.kl:9.4f}{_fmt(r.top1):>7}" \
                f"{_fmt(r.sequence):>7}"
        line += (f"{_fmt(r.accuracy):>7}" + (f"{_fmt(r.accuracy_se):>5}" if quant else "")) if acc else ""
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
    groups: dict[tuple[str, int, str], list[Row]] = {}
    for r in table.rows:
        if r.quality(metric) is not None:
            groups.setdefault((r.quantize, r.k, r.ranking), []).append(r)
    markers = {"last": "o", "mean": "s", "random": "^"}
    for (scheme, k, ranking), rows in sorted(groups.items(), key=lambda g: (g[0][0] != NONE, g[0])):
        rows = sorted(rows, key=lambda r: r.eq5_ratio)
        ax.plot([r.eq5_ratio for r in rows], [100 * r.quality(metric) for r in rows], marker=markers.get(ranking, "o"),
                linestyle="-" if ranking != "random" else ":",
                label=f"K={k} {ranking}" if scheme == NONE else f"{scheme} K={k} {ranking}")
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


def plot_weights(table: Table, metric: str, path: str | Path) -> None:
    """PNG: bytes of decoder weights (x, log scale) against the Eq. 5 FLOPs ratio (y), one marker per scheme, each
    point coloured by ``metric``; the Pareto front over (weights, FLOPs) with ``metric`` as the constraint circled
    and labelled with its quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checked_metric(table, metric)
    rows = [r for r in table.rows if r.quality(metric) is not None and r.weight_bytes is not None]
    if not rows:
        raise FastVError("no point has bytes of weights to plot")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    schemes = list(dict.fromkeys(r.quantize for r in rows))
    lo, hi = min(100 * r.quality(metric) for r in rows), max(100 * r.quality(metric) for r in rows)
    scatter = None
    for i, scheme in enumerate(schemes):
        pts = [r for r in rows if r.quantize == scheme]
        scatter = ax.scatter([r.weight_bytes / 2**20 for r in pts], [r.eq5_ratio for r in pts],
                             c=[100 * r.quality(metric) for r in pts], cmap="viridis", vmin=min(lo, hi - 1), vmax=hi,
                             marker=markers[i % len(markers)], s=60, edgecolors="gray", linewidths=0.5, label=scheme)
    front = weight_front(rows, metric)
    ax.scatter([r.weight_bytes / 2**20 for r in front], [r.eq5_ratio for r in front], s=220, facecolors="none",
               edgecolors="black", linewidths=1.5, zorder=3, label="Pareto front")
    for r in front:
        ratio = "0" if Fraction(r.r) == 0 else r.r
        ax.annotate(f"{r.quantize} K={r.k} R={ratio}: {100 * r.quality(metric):.1f}%",
                    (r.weight_bytes / 2**20, r.eq5_ratio),
                    textcoords="offset points", xytext=(8, 4), fontsize=7)
    if len({r.weight_bytes for r in rows}) > 1:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ticks = sorted({r.weight_bytes / 2**20 for r in rows})
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.15)
    fig.colorbar(scatter, ax=ax, label=f"{metric} (%)")
    ax.set_xlabel("decoder-layer weights (MiB)")
    ax.set_ylabel("prefill FLOPs ratio (paper Eq. 5, FastV / unpruned)")
    ax.set_title(f"{table.model}: weights x FLOPs, {metric} as the constraint\n({table.prompts} prompts of "
                 f"{table.data}; circled: not dominated in weights, FLOPs and {metric})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    legend = ax.legend(fontsize=8, loc="best")
    for handle, text in zip(legend.legend_handles, legend.get_texts()):
        if text.get_text() != "Pareto front":
            handle.set_array(None)
            handle.set_facecolor("lightgray")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _md(v: float | None, se: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def to_markdown(table: Table, metric: str, recommendation: Recommendation | None = None) -> str:
    """The report in Markdown: every point (scheme, K, R, ranking) with accuracy ± standard error, KL, top-1
    agreement, bytes of weights, Eq. 5 FLOPs, KV bytes; the Pareto fronts; the recommendation."""
    acc = table.has("accuracy")
    lines = [f"# Calibration: {table.model}", "",
             f"{table.prompts} prompts of {table.data}"
             + (f"; unpruned, unquantized accuracy {_md(table.baseline_accuracy)}%" if acc else "") + ". "
             "KL (nats) and top-1 agreement are against the unquantized, unpruned model; weights = bytes of the "
             "decoder layers' weights (integers + scales for a quantized scheme); FLOPs = paper Eq. 5 per layer "
             "(ratio to the unpruned prefill); KV = KV-cache bytes after the prefill.", ""]
    if table.quantized:
        lines += ["Unpruned, per weight scheme:", "", "| weights | bytes of weights | accuracy % | KL | top-1 % |",
                  "|---|---|---|---|---|",
                  f"| none | {table.baseline_weight_bytes} | {_md(table.baseline_accuracy)} | 0 | 100.0 |"]
        for scheme, q in table.quantized.items():
            lines.append(f"| {scheme} | {q['weight_bytes']} | {_md(q['accuracy'], q['accuracy_se'])} | "
                         f"{q['kl']:.4f} | {_md(q['top1'])} |")
        lines.append("")
    lines += ["| point | weights | K | R | ranking | accuracy % | KL | top-1 % | bytes of weights | Eq. 5 GFLOPs "
              "| FLOPs ratio | KV bytes |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.rows:
        lines.append(f"| {r.key} | {r.quantize} | {r.k} | {r.r} | {r.ranking} | {_md(r.accuracy, r.accuracy_se)} "
                     f"| {r.kl:.4f} | {_md(r.top1)} | {'-' if r.weight_bytes is None else r.weight_bytes} | "
                     f"{'-' if r.eq5_gflops is None else f'{r.eq5_gflops:.6g}'} | {r.eq5_ratio:.3f} | "
                     f"{'-' if r.kv_bytes is None else f'{r.kv_bytes:.0f}'} |")
    if table.has(metric) and table.has_weights():
        lines += ["", f"Pareto front over bytes of weights x Eq. 5 FLOPs with {metric} as the constraint (no other "
                  "point has fewer-or-equal bytes, fewer-or-equal FLOPs and higher-or-equal quality):", ""]
        lines += [f"- {r.label}: {human_bytes(r.weight_bytes)}, FLOPs ratio {r.eq5_ratio:.3f}, {metric} "
                  f"{_md(r.quality(metric), r.accuracy_se if metric == 'accuracy' else None)}%"
                  for r in weight_front(table.rows, metric)]
    if table.has(metric):
        lines += ["", f"Pareto frontier of {metric} against the FLOPs ratio: "
                  + ", ".join(r.label for r in pareto_front(table.rows, metric))]
    if recommendation is not None:
        r = recommendation.row
        lines += ["", f"**Recommended** under {recommendation.constraint}: {r.label} ({metric} "
                  f"{_md(r.quality(metric))}%, {'-' if r.weight_bytes is None else human_bytes(r.weight_bytes)} of "
                  f"weights, FLOPs ratio {r.eq5_ratio:.3f})"]
    return "\n".join(lines) + "\n"


def write_outputs(table: Table, out_dir: str | Path, metric: str, recommendation: Recommendation | None = None
                  ) -> dict[str, Path]:
    """``calibration.csv``, ``calibration.json`` (table, frontiers, recommendation), ``calibration.md``,
    ``pareto.png`` and, with bytes of weights, ``pareto_weights.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "calibration.csv", "json": out / "calibration.json", "md": out / "calibration.md",
             "png": out / "pareto.png", "weights_png": out / "pareto_weights.png"}
    atomic_write_text(paths["csv"], to_csv(table))
    doc = table.to_dict()
    doc["metric"] = metric
    doc["frontier"] = [r.key for r in pareto_front(table.rows, metric)] if table.has(metric) else []
    doc["weight_frontier"] = [r.key for r in weight_front(table.rows, metric)] if table.has(metric) else []
    doc["recommendation"] = recommendation.to_dict() if recommendation else None
    atomic_write_json(paths["json"], doc)
    atomic_write_text(paths["md"], to_markdown(table, metric, recommendation))
    if table.has(metric):
        plot(table, metric, paths["png"])
    else:
        paths.pop("png")
    if table.has(metric) and table.has_weights():
        plot_weights(table, metric, paths["weights_png"])
    else:
        paths.pop("weights_png")
    return paths
