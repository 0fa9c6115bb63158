"""Where decoding attention goes, per layer (paper §3, Eq. 2-4, Figs. 3-4).

During greedy decoding of each response we take, in every decoder layer, the attention
distribution alpha of each output token (averaged over heads) and sum it per token type:

* ``sys``  the system prompt (the BOS token and the system tokens),
* ``img``  the image segments of the prompt (for Qwen2-VL including the vision start/end delimiters),
* ``ins``  the user instruction,
* ``out``  the output tokens generated so far, the query token itself included.

so that ``alpha_sys + alpha_img + alpha_ins + alpha_out = 1`` (Eq. 2). Per layer j:

* allocation ``lambda_t^j = sum_i alpha_t^{i,j}`` over the n output tokens of a response (Eq. 3),
  and the same normalised per output token (``lambda / n``: the share of attention, comparable
  across responses of different length; the four shares sum to 1);
* efficiency ``eps_t^j = lambda_t^j / |t|`` (Eq. 4), ``|out|`` being the number n of output tokens;

each averaged over heads and over the prompts.

Which query rows are counted. Output token ``y_i`` is produced by the query row at the position of
the token before it: ``y_1`` by the last prompt row of the prefill (the last instruction token),
``y_i`` (i >= 2) by the decode step whose input is ``y_{i-1}``. By default every output token is
counted ("each output token", n = number of generated tokens), the first one through the prefill's
last row; that row sees no output token yet, so its ``alpha_out`` is 0. With
``include_first_token=False`` only the KV-cached decode steps are counted (n - 1 rows, and n - 1 is
then the n of Eq. 3-4). The last generated token is never a query (nothing is predicted after it).

Attentions come from ``model.generate(..., output_attentions=True, return_dict_in_generate=True)``
with the model loaded with ``attn_implementation="eager"`` (the prefill step gives [P, P] maps, each
decode step a [1, P + s] row); checked against an uncached forward of the full sequence by the tests.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from fastv_export.errors import FastVError
from fastv_export.files import atomic_write

TYPES: tuple[str, ...] = ("sys", "img", "ins", "out")
TYPE_NAMES = {"sys": "system prompt", "img": "image tokens", "ins": "user instruction", "out": "output tokens"}
COLORS = {"sys": "#4c72b0", "img": "#dd8452", "ins": "#55a868", "out": "#c44e52"}
SHALLOW_LAYERS = 2  # the paper: "the first 2 layers as shallow layers"


# --------------------------------------------------------------------------------------------
# token types


def type_labels(segments, length: int) -> np.ndarray:
    """Type index (0 sys, 1 img, 2 ins, 3 out) of positions ``0..length-1`` of one unpadded row.

    ``segments`` is an :class:`fastv_export.prompts.Segments`; everything from the instruction's end
    on is output. Raises FastVError when a position belongs to no type (Eq. 2 would not hold)."""
    labels = np.full(length, -1, dtype=np.int64)
    ranges = [(0, segments.system)] + [(1, r) for r in segments.images] + [(2, segments.instruction)]
    for t, (a, b) in ranges:
        labels[a:min(b, length)] = t
    labels[segments.instruction[1]:] = 3
    if (labels < 0).any():
        missing = np.flatnonzero(labels < 0).tolist()
        raise FastVError(f"prompt positions {missing[:8]} belong to no token type (sys/img/ins/out); "
                         "the prompt segments must cover the whole prompt")
    return labels


def _shift(segments, offset: int):
    from fastv_export.prompts import Segments

    s = segments
    return Segments((s.system[0] - offset, s.system[1] - offset), [(a - offset, b - offset) for a, b in s.images],
                    (s.instruction[0] - offset, s.instruction[1] - offset))


# --------------------------------------------------------------------------------------------
# statistics


@dataclass
class PromptRecord:
    """One response: its tokens, type sizes and the raw head-averaged per-token sums."""
    prompt_tokens: int
    output_tokens: list[int]
    type_sizes: dict[str, int]          # |sys|, |img|, |ins| and |out| = n (counted output tokens)
    alpha: np.ndarray                   # [n, L, 4]: alpha_t^{i,j}, i over the counted output tokens


@dataclass
class AttentionStats:
    """Per-layer attention statistics of the decoding process (paper §3).

    Arrays are [L, 4] with columns in :data:`TYPES` order, averaged over heads and prompts:
    ``allocation`` (lambda, Eq. 3), ``allocation_share`` (lambda / n: the share of one output
    token's attention, rows sum to 1), ``efficiency`` (eps = lambda / |type|, Eq. 4)."""
    model: str
    num_layers: int
    allocation: np.ndarray
    allocation_share: np.ndarray
    efficiency: np.ndarray
    prompts: list[PromptRecord]
    include_first_token: bool = True
    shallow_layers: int = SHALLOW_LAYERS
    types: tuple[str, ...] = TYPES
    # attention maps [L, Q, Q] (head-averaged, prompt + response) of the first response, for Fig. 4
    example_maps: np.ndarray | None = field(default=None, repr=False)
    example_segments: Any = field(default=None, repr=False)

    # -- derived ---------------------------------------------------------------------------
    @property
    def shallow(self) -> slice:
        return slice(0, self.shallow_layers)

    @property
    def deep(self) -> slice:
        return slice(self.shallow_layers, self.num_layers)

    def token_share(self) -> np.ndarray:
        """[4]: each type's share of the tokens (prompt + counted outputs), averaged over prompts."""
        sizes = np.array([[p.type_sizes[t] for t in TYPES] for p in self.prompts], dtype=np.float64)
        return (sizes / sizes.sum(1, keepdims=True)).mean(0)

    def share(self, layers: slice) -> dict[str, float]:
        """Mean attention share per type over ``layers``."""
        return {t: float(v) for t, v in zip(TYPES, self.allocation_share[layers].mean(0))}

    def to_dict(self, per_token: bool = True) -> dict:
        def table(a):
            return [{t: float(v) for t, v in zip(TYPES, row)} for row in a]

        prompts = []
        for p in self.prompts:
            d = {"prompt_tokens": p.prompt_tokens, "output_tokens": p.output_tokens, "type_sizes": p.type_sizes}
            if per_token:
                d["alpha"] = np.round(p.alpha, 8).tolist()  # [n][L][4]
            prompts.append(d)
        return {
            "model": self.model,
            "num_layers": self.num_layers,
            "types": list(TYPES),
            "type_names": TYPE_NAMES,
            "num_prompts": len(self.prompts),
            "include_first_token": self.include_first_token,
            "counting": ("every output token; the first through the prefill's last row (alpha_out = 0 there)"
                         if self.include_first_token else "KV-cached decode steps only (the first output "
                         "token, produced by the prefill's last row, is not counted)"),
            "shallow_layers": list(range(self.shallow.start, self.shallow.stop)),
            "deep_layers": list(range(self.deep.start, self.deep.stop)),
            "token_share": {t: float(v) for t, v in zip(TYPES, self.token_share())},
            "shallow_share": self.share(self.shallow),
            "deep_share": self.share(self.deep) if self.deep.start < self.num_layers else None,
            "layers": [{"layer": j, "allocation": table(self.allocation)[j],
                        "allocation_share": table(self.allocation_share)[j],
                        "efficiency": table(self.efficiency)[j]} for j in range(self.num_layers)],
            "prompts": prompts,
            "alpha_layout": "prompts[p].alpha[i][layer][type], type in `types` order",
        }


def _check_eager(model) -> None:
    impl = getattr(model.config, "_attn_implementation", None)
    text_cfg = getattr(model.config, "text_config", None)
    impl = getattr(text_cfg, "_attn_implementation", impl) or impl
    if impl not in (None, "eager"):
        raise FastVError(f"the model uses attn_implementation={impl!r}, which returns no attention weights; "
                         "load it with attn_implementation='eager' (load_model(name, attn_implementation='eager'))")


def _iter_rows(prompts, adapter):
    """(single-row Prompt without padding, its Segments) for every row of every prompt batch."""
    for prompt in prompts:
        if not prompt.segments:
            raise FastVError("analyze_attention needs prompts with segments (from fastv_export.prompts.make_prompt)")
        for i, seg in enumerate(prompt.segments):
            if prompt.input_ids.shape[0] == 1 and bool(prompt.attention_mask.all()):
                yield prompt, seg
                continue
            offset = int((prompt.attention_mask[i] == 0).sum())
            yield prompt.row(i, adapter, len(seg.images)), _shift(seg, offset)


def analyze_attention(model, prompts: Sequence, max_new_tokens: int = 16, *, include_first_token: bool = True,
                      shallow_layers: int = SHALLOW_LAYERS, keep_maps: bool = True, progress: bool = True,
                      model_name: str | None = None) -> AttentionStats:
    """Greedy-decode every row of ``prompts`` (``Prompt`` batches from ``make_prompt``; rows are run one
    at a time, padding stripped) and collect the decoding attention per layer and token type.

    ``model`` must be loaded with ``attn_implementation="eager"``. Generation stops at
    ``max_new_tokens`` or at the EOS token (which is then the last counted output token)."""
    import torch
    from tqdm.auto import tqdm

    from fastv_export.adapters import get_adapter

    if max_new_tokens < 1:
        raise FastVError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not include_first_token and max_new_tokens < 2:
        raise FastVError("without the first output token, max_new_tokens must be >= 2 (the first decode step "
                         "produces the second output token)")
    _check_eager(model)
    adapter = get_adapter(model)
    num_layers = adapter.decoder_shape().num_layers
    if not 1 <= shallow_layers <= num_layers:
        raise FastVError(f"shallow_layers must be in 1..{num_layers} (the model has {num_layers} layers), "
                         f"got {shallow_layers}")
    rows = list(_iter_rows(prompts, adapter))
    if not rows:
        raise FastVError("no prompts to analyze")
    image_ids = torch.tensor(adapter.image_token_ids())

    records: list[PromptRecord] = []
    example_maps = example_segments = None
    for prompt, seg in tqdm(rows, desc="analyze", unit="prompt", disable=not progress or None, leave=False):
        ids = prompt.input_ids
        if not bool(torch.isin(ids, image_ids).any()) or not seg.images:
            raise FastVError("the prompt holds no image tokens: the analysis measures the attention image tokens "
                             "receive; use a vision-language model and prompts with at least one image")
        n_prompt = ids.shape[1]
        labels_prompt = type_labels(seg, n_prompt)
        with torch.no_grad():
            out = model.generate(**prompt.model_inputs(), max_new_tokens=max_new_tokens, do_sample=False,
                                 output_attentions=True, return_dict_in_generate=True)
        steps = out.attentions
        generated = out.sequences[0, n_prompt:].tolist()
        if steps is None or len(steps) != len(generated) or any(s is None or len(s) != num_layers for s in steps):
            raise FastVError("model.generate returned no per-step attentions for every layer; load the model with "
                             "attn_implementation='eager'")
        n = len(generated)
        total = n_prompt + n - 1                 # positions that are ever a query (y_n never is)
        labels = np.concatenate([labels_prompt, np.full(n, 3, dtype=np.int64)])
        onehot = torch.from_numpy(np.eye(4)[labels]).to(torch.float64)   # [P + n, 4]
        alpha = np.zeros((n, num_layers, 4))
        maps = np.zeros((num_layers, total, total), dtype=np.float32) if keep_maps and example_maps is None else None
        for s, layers in enumerate(steps):
            for j, a in enumerate(layers):
                a = a[0].to(torch.float64).mean(0)          # [q, k] head average; q = P at s == 0, else 1
                k = a.shape[-1]
                if k != n_prompt + s:
                    raise FastVError(f"unexpected attention shape {tuple(a.shape)} at decode step {s}")
                alpha[s, j] = (a[-1] @ onehot[:k]).numpy()
                if maps is not None:
                    if s == 0:
                        maps[j, :n_prompt, :n_prompt] = a.numpy()
                    elif n_prompt + s - 1 < total:
                        maps[j, n_prompt + s - 1, :k] = a[-1].numpy()
        if not include_first_token:
            alpha = alpha[1:]
        counted = alpha.shape[0]
        sizes = {t: int((labels_prompt == i).sum()) for i, t in enumerate(TYPES[:3])}
        sizes["out"] = counted
        records.append(PromptRecord(n_prompt, generated, sizes, alpha))
        if maps is not None:
            example_maps, example_segments = maps, seg

    used = [r for r in records if r.alpha.shape[0] > 0]
    if not used:
        raise FastVError("no output token to count: every response ended after its first token")
    lam = np.stack([r.alpha.sum(0) for r in used])                           # [N, L, 4]
    n_tok = np.array([r.alpha.shape[0] for r in used], dtype=np.float64)
    size = np.array([[r.type_sizes[t] for t in TYPES] for r in used], dtype=np.float64)  # [N, 4]
    eps = lam / size[:, None, :]
    return AttentionStats(
        model=model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        num_layers=num_layers, allocation=lam.mean(0), allocation_share=(lam / n_tok[:, None, None]).mean(0),
        efficiency=eps.mean(0), prompts=records, include_first_token=include_first_token,
        shallow_layers=min(shallow_layers, num_layers), example_maps=example_maps, example_segments=example_segments)


# --------------------------------------------------------------------------------------------
# figures


def _save_figure(fig, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=fig.dpi, bbox_inches="tight"))


def _mark_shallow(ax, shallow: int, num_layers: int) -> None:
    """Dashed boundary between the shallow and the deep layers, labelled above the plot."""
    if shallow >= num_layers:
        return
    ax.axvline(shallow - 0.5, color="0.25", ls="--", lw=1.2, zorder=4)
    trans = ax.get_xaxis_transform()
    ax.text((shallow - 1) / 2, 1.01, "shallow", transform=trans, ha="center", va="bottom", fontsize=8, color="0.3")
    ax.text((shallow + num_layers - 1) / 2, 1.01, "deep", transform=trans, ha="center", va="bottom", fontsize=8,
            color="0.3")


def plot_allocation(stats: AttentionStats, path: str | os.PathLike) -> None:
    """A PNG in the style of the paper's Figure 3: per-layer attention share per type (stacked bars),
    efficiency per type (log scale), and shallow vs deep layers beside each type's share of tokens."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    L = stats.num_layers
    x = np.arange(L)
    fig = Figure(figsize=(16, 4.8), dpi=110, layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3, width_ratios=[1.25, 1.25, 1])
    tick_step = max(1, math.ceil(L / 16))

    # (1) allocation share per layer, stacked
    bottom = np.zeros(L)
    for i, t in enumerate(TYPES):
        v = stats.allocation_share[:, i]
        ax1.bar(x, v, bottom=bottom, color=COLORS[t], label=TYPE_NAMES[t], width=0.8, zorder=2)
        if L <= 16:
            for xi, (b, vi) in enumerate(zip(bottom, v)):
                if vi >= 0.04:
                    ax1.text(xi, b + vi / 2, f"{vi:.0%}", ha="center", va="center", fontsize=7, color="white")
        bottom += v
    _mark_shallow(ax1, stats.shallow_layers, L)
    ax1.set_ylim(0, 1)
    ax1.set_xlim(-0.6, L - 0.4)
    ax1.set_xticks(x[::tick_step])
    ax1.set_xlabel("layer")
    ax1.set_ylabel("attention share per output token  (λ / n)")
    ax1.set_title("attention allocation λ per layer", pad=16)

    # (2) efficiency per layer, log scale
    for i, t in enumerate(TYPES):
        ax2.plot(x, np.clip(stats.efficiency[:, i], 1e-12, None), marker="o", ms=4, color=COLORS[t],
                 label=TYPE_NAMES[t], zorder=3)
    _mark_shallow(ax2, stats.shallow_layers, L)
    ax2.set_yscale("log")
    ax2.set_xlim(-0.6, L - 0.4)
    ax2.set_xticks(x[::tick_step])
    ax2.set_xlabel("layer")
    ax2.set_ylabel("ε = λ / |type|   (log)")
    ax2.set_title("attention efficiency ε per layer", pad=16)
    ax2.grid(True, which="major", axis="y", alpha=0.3)
    lo, hi = ax2.get_ylim()
    if hi / lo < 30:   # less than ~1.5 decades: label the minor ticks too
        from matplotlib.ticker import FormatStrFormatter

        ax2.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
        ax2.tick_params(axis="y", which="minor", labelsize=7)

    # (3) shallow vs deep against each type's share of the tokens
    groups = [("share of tokens", stats.token_share(), "0.6", "//"),
              (f"attention, shallow (layers 0-{stats.shallow_layers - 1})",
               np.array(list(stats.share(stats.shallow).values())), None, None)]
    if stats.shallow_layers < L:
        groups.append((f"attention, deep (layers {stats.shallow_layers}-{L - 1})",
                       np.array(list(stats.share(stats.deep).values())), None, "..."))
    w = 0.8 / len(groups)
    for g, (label, vals, color, hatch) in enumerate(groups):
        pos = np.arange(4) + (g - (len(groups) - 1) / 2) * w
        colors = [color or COLORS[t] for t in TYPES]
        alpha = 1.0 if g != 1 else 0.6
        bars = ax3.bar(pos, vals, width=w, color=colors, hatch=hatch, alpha=alpha, edgecolor="0.25", lw=0.5,
                       label=label)
        for b, v in zip(bars, vals):
            ax3.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.0%}", ha="center", va="bottom", fontsize=7)
    ax3.set_xticks(np.arange(4), [f"{t}\n{TYPE_NAMES[t]}" for t in TYPES], fontsize=8)
    ax3.set_ylim(0, 1.08)
    ax3.set_ylabel("share")
    ax3.set_title("tokens vs attention: shallow / deep layers")
    ax3.legend(handles=[Patch(facecolor="0.6", hatch="//", edgecolor="0.25", label=groups[0][0])]
               + [Patch(facecolor="white", edgecolor="0.25", hatch=h, label=lab)
                  for lab, _, _, h in groups[1:]], fontsize=8, loc="upper left")

    from matplotlib.lines import Line2D

    handles, labels = ax1.get_legend_handles_labels()
    handles.append(Line2D([], [], color="0.25", ls="--", lw=1.2))
    labels.append(f"shallow (first {stats.shallow_layers}) | deep layers")
    fig.legend(handles, labels, loc="outside lower center", ncol=5, fontsize=9, frameon=False)
    first = "first output token counted" if stats.include_first_token else "first output token not counted"
    n_out = np.mean([p.type_sizes["out"] for p in stats.prompts])
    fig.suptitle(f"{stats.model}: decoding attention over {len(stats.prompts)} response{'s' * (len(stats.prompts) > 1)} "
                 f"(avg {n_out:.1f} output tokens; {first}; averaged over heads and prompts)", fontsize=11)
    _save_figure(fig, path)


def plot_attention_maps(attn_per_layer, segments, path: str | os.PathLike, *, title: str | None = None,
                        max_pixels: int = 256) -> None:
    """A PNG like the paper's Figure 4: one attention map per layer (query rows x keys, head-averaged,
    log colour scale) of one response, with the sys / img / ins / out boundaries drawn.

    ``attn_per_layer`` is [L, Q, K] (or a list of [Q, K]); the Q query rows are the last Q of the K
    positions (Q == K: the whole prompt + response). ``segments`` is the row's ``Segments``;
    everything after the instruction is output. Maps larger than ``max_pixels`` are average-pooled."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    maps = np.asarray([np.asarray(m, dtype=np.float64) for m in attn_per_layer])
    if maps.ndim != 3:
        raise FastVError(f"attention maps must be [layers, queries, keys], got shape {maps.shape}")
    L, Q, K = maps.shape
    first_row = K - Q
    pool = max(1, math.ceil(K / max_pixels))
    if pool > 1:   # average-pool both axes (keys padded with zeros, which are not attention)
        qp, kp = math.ceil(Q / pool) * pool, math.ceil(K / pool) * pool
        padded = np.zeros((L, qp, kp))
        padded[:, :Q, :K] = maps
        maps = padded.reshape(L, qp // pool, pool, kp // pool, pool).mean((2, 4))
    positive = maps[maps > 0]
    vmin = max(float(np.quantile(positive, 0.02)) if positive.size else 1e-4, 1e-6)
    vmax = float(maps.max()) if maps.size else 1.0
    norm = LogNorm(vmin=vmin, vmax=max(vmax, vmin * 10))

    spans = [("sys", *segments.system)] + [("img", a, b) for a, b in segments.images] + \
        [("ins", *segments.instruction), ("out", segments.instruction[1], K)]
    spans = [(t, a, min(b, K)) for t, a, b in spans if a < min(b, K)]
    ncols = min(L, max(4, math.ceil(math.sqrt(L))))
    nrows = math.ceil(L / ncols)
    side = 3.9 if ncols <= 4 else 3.0
    fig = Figure(figsize=(side * ncols + 0.8, side * nrows + 0.9), dpi=110, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    rows_px, keys_px = maps.shape[1] * pool, maps.shape[2] * pool     # token positions the pixels span
    extent = (-0.5, keys_px - 0.5, first_row + rows_px - 0.5, first_row - 0.5)
    im = None
    for j in range(len(axes)):
        ax = axes[j]
        if j >= L:
            ax.set_visible(False)
            continue
        m = np.where(maps[j] > 0, maps[j], np.nan)
        im = ax.imshow(m, norm=norm, cmap="viridis", extent=extent, interpolation="nearest", aspect="auto")
        ax.set_xlim(-0.5, K - 0.5)
        ax.set_ylim(K - 0.5, first_row - 0.5)
        ax.set_facecolor("white")
        for k, (t, a, b) in enumerate(spans):
            if a > 0:
                ax.axvline(a - 0.5, color="white", lw=0.8, ls="--")
                if a > first_row:
                    ax.axhline(a - 0.5, color="white", lw=0.8, ls="--")
            # type label along the top edge, over the segment's middle
            # (staggered in height where a neighbouring segment is narrow, so labels do not collide)
            narrow = any(bb - aa < 0.08 * K for _, aa, bb in spans[max(k - 1, 0):k + 2])
            ax.annotate(t, ((a + b) / 2 - 0.5, first_row - 0.5), xytext=(0, 1 + 8 * (k % 2) * narrow),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8, color=COLORS[t],
                        fontweight="bold", annotation_clip=False)
        ax.set_title(f"layer {j}", fontsize=10, pad=20)
        ax.tick_params(labelsize=7)
        if j % ncols == 0:
            ax.set_ylabel("query position")
        if j // ncols == nrows - 1 or j + ncols >= L:
            ax.set_xlabel("key position")
    if im is not None:
        fig.colorbar(im, ax=axes[:L].tolist(), shrink=0.8 if nrows == 1 else 0.5, aspect=25 * max(1, nrows // 2),
                     label="attention (head average, log)")
    fig.suptitle(title or "attention maps of one response (prompt + response, dashed: sys | img | ins | out)",
                 fontsize=11)
    _save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# text


def format_table(stats: AttentionStats) -> str:
    """Per layer: the attention share (lambda / n) and the efficiency epsilon of each token type."""
    lines = []
    head = "  ".join(f"{t:>6}" for t in TYPES)
    lines.append(f"{'layer':>5}  {'':5}  {'λ share per output token':^{len(head)}}  |  "
                 f"{'ε = λ / |type|':^{len(head) + 8}}")
    lines.append(f"{'':>5}  {'':5}  {head}  |  " + "  ".join(f"{t:>8}" for t in TYPES))
    for j in range(stats.num_layers):
        kind = "shal." if j < stats.shallow_layers else "deep"
        share = "  ".join(f"{v:6.1%}" for v in stats.allocation_share[j])
        eps = "  ".join(f"{v:8.2e}" for v in stats.efficiency[j])
        lines.append(f"{j:>5}  {kind:5}  {share}  |  {eps}")
    return "\n".join(lines)
