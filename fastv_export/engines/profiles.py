"""Optimization profiles of a bundle's engines, from its manifest and the deployment limits.

Every LLM engine gets two profiles, ``prefill`` and ``decode``; the dims come from the graph spec
(``fastv_export.graphs.spec``), so a profile names exactly the graph's inputs:

=========  =======  =============================  ==========================================
engine     profile  seq                            cache (past_seq)
=========  =======  =============================  ==========================================
pre_k      prefill  1 .. n                         0
pre_k      decode   1                              1 .. n + T - 1
post_k     prefill  1 .. n' = n - M + keep(M)      0
post_k     decode   1                              1 .. n' + T - 1
embed      prefill  1 .. n  (image_tokens 0..B*M)  -
embed      decode   1       (image_tokens 0)       -
vision     -        (static: one image of the exported size; fixed layout)
vision     media    a dynamic layout's call: 1 merge block or tile .. 16x the exported image's patches
                    (patch_grid: up to 4x its side) or max(its tiles, 16) tiles/frames (tiles)
=========  =======  =============================  ==========================================

n: ``max_prompt`` (prompt tokens, image tokens included), M: image tokens of ``images`` images,
T: ``max_new_tokens``, B: ``max_batch``. The post-K engine is built for the pruned length n', which
is where FastV's saving shows in the engine (activations and KV cache sized for n', not n). A
prompt served by these engines holds at most n tokens and exactly ``images`` images (fewer image
tokens would leave more than n' tokens after pruning).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Mapping

from fastv_export.bundle.view import Lengths
from fastv_export.errors import FastVError
from fastv_export.graphs import op, spec

if TYPE_CHECKING:
    from fastv_export.bundle import Manifest

#: a profile: input name -> (min, opt, max) shapes
Shapes = dict[str, tuple[list[int], list[int], list[int]]]


#: text tokens beside the images when ``max_prompt`` is not given
DEFAULT_TEXT_TOKENS = 64


@dataclass(frozen=True)
class BuildLimits:
    """What the engines must serve: batch, prompt length (image tokens included; None: the images'
    prompt tokens + :data:`DEFAULT_TEXT_TOKENS`), images per prompt, generated tokens."""

    max_batch: int = 1
    max_prompt: int | None = None
    images: int = 1
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name == "max_prompt" and value is None:
                continue
            low = 0 if name == "images" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise FastVError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def lengths(manifest: Manifest, limits: BuildLimits) -> Lengths:
    """n, M, n' and T of ``limits`` for the bundle described by ``manifest``."""
    m = limits.images * manifest.tokens_per_image
    prompt_tokens = limits.images * len(manifest.image_prompt_tokens())
    n = prompt_tokens + DEFAULT_TEXT_TOKENS if limits.max_prompt is None else limits.max_prompt
    if prompt_tokens >= n:
        raise FastVError(f"--max-prompt {n} leaves no room for text: {limits.images} image(s) take "
                         f"{prompt_tokens} prompt tokens; raise --max-prompt or lower --images")
    f = manifest.fastv
    kept = op.kept_length(n, m, f.r.numerator, f.r.denominator, -1 if f.keep is None else f.keep)
    return Lengths(prompt=n, image_tokens=m, kept=kept, new_tokens=limits.max_new_tokens)


def _dim_ranges(profile: str, seq_max: int, limits: BuildLimits, n: Lengths) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every dynamic dim in one profile; ``seq_max`` is n or n'."""
    b = limits.max_batch
    if profile == "prefill":
        seq = (1, seq_max, seq_max)
        past = (0, 0, 0)
        candidates = (0, n.image_tokens, n.image_tokens)
        images = (0, b * n.image_tokens, b * n.image_tokens)
    else:
        seq = (1, 1, 1)
        most = seq_max + n.new_tokens - 1
        past = (1, most, most)
        candidates = (0, 0, 0)
        images = (0, 0, 0)
    total = tuple(p + s for p, s in zip(past, seq))
    return {"batch": (1, b, b), "seq": seq, "past_seq": past, "total_seq": total,
            "num_candidates": candidates, "image_tokens": images}


def _shapes(graph: spec.GraphSpec, ranges: Mapping[str, tuple[int, int, int]],
            sizes: Mapping[str, int]) -> Shapes:
    out: Shapes = {}
    for t in graph.inputs:
        dims = t.shape(sizes)
        if all(isinstance(d, int) for d in dims):
            continue          # a static input needs no range
        lo, opt, hi = ([d if isinstance(d, int) else ranges[d][i] for d in dims] for i in range(3))
        out[t.name] = (lo, opt, hi)
    return out


def engine_profiles(manifest: Manifest, limits: BuildLimits) -> dict[str, dict[str, Shapes]]:
    """graph -> profile name -> input shapes, for every graph of the bundle (vision: no profile)."""
    n = lengths(manifest, limits)
    graphs = spec.graph_specs(manifest)
    sizes = spec.model_sizes(manifest)
    seq_of = {"embed": n.prompt, "pre_k": n.prompt, "post_k": n.kept}
    out: dict[str, dict[str, Shapes]] = {"vision": _vision_profiles(manifest, graphs["vision"], sizes)}
    for name in ("embed", "pre_k", "post_k"):
        out[name] = {p: _shapes(graphs[name], _dim_ranges(p, seq_of[name], limits, n), sizes)
                     for p in ("prefill", "decode")}
    return out


#: how far a dynamic vision engine reaches beyond the exported image: patches (patch_grid), tiles (tiles)
VISION_PATCH_SCALE = 16
VISION_MAX_TILES = 16


def _vision_profiles(manifest: Manifest, graph: spec.GraphSpec, sizes: Mapping[str, int]) -> dict[str, Shapes]:
    """The vision engine's one profile ``media`` for a dynamic layout (none for the fixed layout)."""
    layout = manifest.vision_layout
    per_image = manifest.tokens_per_image
    if layout["kind"] == "patch_grid":
        unit = layout["spatial_merge_size"] ** 2
        opt, hi = per_image * unit, per_image * unit * VISION_PATCH_SCALE
        ranges = {"patches": (unit, opt, hi), "merged_patches": (1, opt // unit, hi // unit),
                  "window_bounds": (2, opt // unit + 1, hi // unit + 1)}
    elif layout["kind"] == "tiles":
        opt = layout["default_tiles"]
        hi = max(opt, VISION_MAX_TILES)
        per_tile = layout["patches_per_side"] ** 2
        ranges = {"tiles": (1, opt, hi), "unit_tokens": (1, per_image, hi * 2 * per_tile + 1)}
    else:
        return {}
    return {"media": _shapes(graph, ranges, sizes)}


def kv_cache_bytes(manifest: Manifest, limits: BuildLimits, graph: str) -> int:
    """Device bytes of the KV caches (present tensors) of ``graph`` at the decode profile's maximum."""
    n = lengths(manifest, limits)
    k, layers = manifest.k, manifest.num_layers
    count = {"pre_k": k, "post_k": layers - k}.get(graph, 0)
    tokens = (n.prompt if graph == "pre_k" else n.kept) + n.new_tokens
    heads, head_dim = manifest.kv_shape
    return count * 2 * limits.max_batch * heads * tokens * head_dim * manifest.float_dtype.itemsize


def trtexec_shape_flags(profiles: Mapping[str, Shapes]) -> list[str]:
    """``--minShapes/--optShapes/--maxShapes`` for each profile in order (trtexec makes one
    optimization profile per repeated set)."""
    flags = []
    for shapes in profiles.values():
        for i, flag in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
            flags.append(f"{flag}=" + ",".join(f"{name}:{'x'.join(str(d) for d in dims[i])}"
                                               for name, dims in shapes.items()))
    return flags
