"""The graph I/O contract of a fastv-export bundle: every input and output of every graph.

This module is the only place where graph I/O names and shapes are spelled; the export, graph
surgery, the manifest, the runners and validation all read it. ``float`` is the bundle's
precision (fp32 or fp16); ``{i}`` is the model's own layer index (post_k's first cache is
``past_key_values.{K}.key``). Dynamic dims (named in every exported graph and in the manifest):

- ``batch``: prompts per batch (left-padded);
- ``seq``: tokens fed to this call (the prompt in prefill, 1 in decode); ``total_seq = past_seq + seq``;
- ``past_seq``: tokens already in this graph's KV cache (0 in prefill);
- ``num_candidates``: image tokens of a row (M; 0 in decode, which makes TokenSelect the identity);
- ``kept_seq``: TokenSelect's output length ``seq - num_candidates + keep(num_candidates)``;
- ``image_tokens``: image features of the whole batch, in prompt order;
- vision graphs of a dynamic layout (``image_tokens.vision_layout`` in the manifest): ``patches`` (patch
  rows of one call), ``merged_patches`` (``patches`` / merge**2), ``window_bounds`` (windows + 1),
  ``tiles`` (tiles or frames of one call), ``unit_tokens`` (features one call returns).

DeepStack families (Qwen3-VL; the manifest's ``source_model.deepstack_layers`` = L > 0) add after each
decoder layer l < L the features of one vision level at the visual positions. Their graphs carry one
tensor per level ``{l}``: the vision graph returns them beside the main features, the embed graph places
them at the image tokens (zeros elsewhere), pre_k adds levels l < K after its layer l and returns the
levels l >= K gathered at the kept positions (TokenSelect's ``kept_indices``), which post_k adds after
its layer l. Families without DeepStack have none of these tensors.

Model constants (numbers in the exported graphs): ``hidden_size``, ``num_kv_heads``, ``head_dim``,
``vocab_size``, ``tokens_per_image`` (image tokens of one image); ``pixel_values`` has the fixed
shape of one image as the model's vision tower takes it (the manifest records it).

======  ===  ===================================  =====  =================================================
graph   I/O  name                                 dtype  shape
======  ===  ===================================  =====  =================================================
vision  in   pixel_values                         float  one image, model-specific (e.g. [1, 3, 336, 336])
vision  out  image_features                       float  [tokens_per_image, hidden_size]
vision  out  deepstack_features.{l}, l<L          float  [tokens_per_image, hidden_size]  (DeepStack)
vision  in   pixel_values (patch_grid)            float  patch rows, model-specific: [patches, 3*2*14*14]
vision  in   vision_position_ids (patch_grid)     int64  [patches, 2]  (row, column of each patch)
vision  in   window_index (patch_grid)            int64  [merged_patches]  (merged patches, window order)
vision  in   cu_window_seqlens (patch_grid)       int64  [window_bounds]  (0, then each window's end)
vision  in   pixel_values (tiles)                 float  tiles, model-specific: [tiles, 3, 384, 384]
vision  in   pack_index (tiles)                   int64  [unit_tokens]  (rows of tile / pooled / newline)
vision  out  image_features (dynamic layouts)     float  [unit_tokens, hidden_size]
embed   in   input_ids                            int64  [batch, seq]
embed   in   image_features                       float  [image_tokens, hidden_size]
embed   in   deepstack_features.{l}, l<L          float  [image_tokens, hidden_size]  (DeepStack)
embed   out  inputs_embeds                        float  [batch, seq, hidden_size]
embed   out  deepstack_embeds.{l}, l<L            float  [batch, seq, hidden_size]  (DeepStack)
pre_k   in   inputs_embeds                        float  [batch, seq, hidden_size]
pre_k   in   attention_mask                       int64  [batch, total_seq]  (1 = token, 0 = padding)
pre_k   in   position_ids                         int64  [batch, seq], M-RoPE: [3, batch, seq]
pre_k   in   past_key_values.{i}.key|value, i<K   float  [batch, num_kv_heads, past_seq, head_dim]
pre_k   in   deepstack_embeds.{l}, l<L            float  [batch, seq, hidden_size]  (DeepStack)
pre_k   in   candidate_positions                  int64  [batch, num_candidates]  (ascending)
pre_k   out  hidden_states                        float  [batch, kept_seq, hidden_size]
pre_k   out  selected_position_ids                int64  [batch, kept_seq], M-RoPE: [3, batch, kept_seq]
pre_k   out  kept_indices                         int64  [batch, kept_seq]  (kept prompt positions)
pre_k   out  kept_deepstack_embeds.{l}, K<=l<L    float  [batch, kept_seq, hidden_size]  (DeepStack)
pre_k   out  present.{i}.key|value, i<K           float  [batch, num_kv_heads, total_seq, head_dim]
post_k  in   hidden_states                        float  [batch, seq, hidden_size]
post_k  in   attention_mask                       int64  [batch, total_seq]  (over the kept tokens)
post_k  in   position_ids                         int64  [batch, seq], M-RoPE: [3, batch, seq]
post_k  in   past_key_values.{i}.key|value, i>=K  float  [batch, num_kv_heads, past_seq, head_dim]
post_k  in   kept_deepstack_embeds.{l}, K<=l<L    float  [batch, seq, hidden_size]  (DeepStack)
post_k  out  logits                               float  [batch, 1, vocab_size]  (last position only)
post_k  out  present.{i}.key|value, i>=K          float  [batch, num_kv_heads, total_seq, head_dim]
======  ===  ===================================  =====  =================================================

``fastv::TokenSelect`` (the last node of pre_k; contract: docs/token_select.md) has its own
formal parameters, :data:`TOKEN_SELECT_INPUTS` and :data:`TOKEN_SELECT_OUTPUTS`. Before graph
surgery, the exported pre_k ends in :data:`PRE_K_EXPORT_OUTPUTS` (layer K-1's hidden states and
its post-rotary query and key), which surgery wires into that node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

FLOAT = "float"   # the bundle's precision
INT64 = "int64"
#: a bundle's precision -> the numpy/torch name of its float tensors
PRECISIONS = {"fp32": "float32", "fp16": "float16"}

# dims that change from call to call; every other named dim is a model constant
DYNAMIC_DIMS = ("batch", "seq", "kept_seq", "past_seq", "total_seq", "num_candidates", "image_tokens",
                "unit_tokens", "patches", "merged_patches", "window_bounds", "tiles")
MODEL_DIMS = ("hidden_size", "num_kv_heads", "head_dim", "vocab_size", "tokens_per_image")

GRAPHS = ("vision", "embed", "pre_k", "post_k")

#: what one call of the vision graph takes (the manifest's ``image_tokens.vision_layout.kind``):
#: ``fixed``: one image of the exported size; ``patch_grid`` (Qwen2.5-VL): one image or one temporal patch
#: of a video, any size the patch grid divides, with the grid-derived rotary positions and window layout;
#: ``tiles`` (LLaVA-OneVision): the anyres tiles of one image or the frames of one video, and the rows
#: of the features to return in prompt order
VISION_LAYOUTS = ("fixed", "patch_grid", "tiles")


# ---- names ------------------------------------------------------------------------------------
PIXEL_VALUES = "pixel_values"
#: vision-graph inputs of the dynamic layouts (:data:`VISION_LAYOUTS`), computed by the runtime from each
#: medium's size (fastv_export/runtime/vision_feeds.py)
VISION_POSITION_IDS = "vision_position_ids"
WINDOW_INDEX = "window_index"
CU_WINDOW_SEQLENS = "cu_window_seqlens"
PACK_INDEX = "pack_index"
IMAGE_FEATURES = "image_features"
INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
CANDIDATE_POSITIONS = "candidate_positions"
HIDDEN_STATES = "hidden_states"
SELECTED_POSITION_IDS = "selected_position_ids"
KEPT_INDICES = "kept_indices"
LOGITS = "logits"
PAST_PREFIX = "past_key_values"
#: DeepStack (one tensor per level l): the vision levels' features, placed at the image tokens, kept rows
DEEPSTACK_FEATURES = "deepstack_features"
DEEPSTACK_EMBEDS = "deepstack_embeds"
KEPT_DEEPSTACK_EMBEDS = "kept_deepstack_embeds"
PRESENT_PREFIX = "present"
KV_KINDS = ("key", "value")

#: the exported pre_k's outputs before surgery: layer K-1's output and its post-rotary query / key
LAYER_HIDDEN, LAYER_QUERY, LAYER_KEY = "layer_hidden", "layer_query", "layer_key"
PRE_K_EXPORT_OUTPUTS = (LAYER_HIDDEN, LAYER_QUERY, LAYER_KEY)

#: fastv::TokenSelect's formal inputs and outputs (docs/token_select.md)
TOKEN_SELECT_INPUTS = (HIDDEN_STATES, "query", "key", ATTENTION_MASK, POSITION_IDS, CANDIDATE_POSITIONS)
TOKEN_SELECT_OUTPUTS = ("selected_hidden_states", SELECTED_POSITION_IDS, KEPT_INDICES)


def past_name(layer: int, kind: str) -> str:
    return f"{PAST_PREFIX}.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"{PRESENT_PREFIX}.{layer}.{kind}"


def past_names(layers: range) -> list[str]:
    return [past_name(i, t) for i in layers for t in KV_KINDS]


def present_names(layers: range) -> list[str]:
    return [present_name(i, t) for i in layers for t in KV_KINDS]


def level_name(prefix: str, level: int) -> str:
    """``deepstack_features.{l}`` and the other DeepStack per-level names."""
    return f"{prefix}.{level}"


def level_names(prefix: str, levels: range) -> list[str]:
    return [level_name(prefix, level) for level in levels]


def is_present(name: str) -> bool:
    return name.startswith(PRESENT_PREFIX + ".")


def present_to_past(name: str) -> str:
    """``present.{i}.key`` -> ``past_key_values.{i}.key`` (a decode step feeds back its presents)."""
    return PAST_PREFIX + name[len(PRESENT_PREFIX):]


# ---- specs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ``dims`` holds dim names (dynamic or model constants) and numbers."""

    name: str
    dtype: str
    dims: tuple[str | int, ...]
    doc: str = ""

    def shape(self, sizes: Mapping[str, int]) -> list[str | int]:
        """The shape with model constants replaced by ``sizes`` (dynamic dims stay names)."""
        return [sizes[d] if isinstance(d, str) and d in sizes else d for d in self.dims]

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if d in DYNAMIC_DIMS}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"graph {self.name} has no input or output {name!r}")

    def io_table(self, sizes: Mapping[str, int], float_dtype: str) -> dict[str, list[dict]]:
        """Inputs and outputs as a bundle's manifest lists them: name, numpy dtype name (``float``: the
        bundle's ``float_dtype``), shape with the model constants of ``sizes`` resolved."""
        def row(t: TensorSpec) -> dict:
            return {"name": t.name, "dtype": float_dtype if t.dtype == FLOAT else t.dtype, "shape": t.shape(sizes)}
        return {"inputs": [row(t) for t in self.inputs], "outputs": [row(t) for t in self.outputs]}

    def dims_of(self, name: str) -> tuple[str | int, ...] | None:
        """Dims of input/output ``name`` (None if the graph has no such tensor)."""
        try:
            return self.tensor(name).dims
        except KeyError:
            return None


def _positions(seq: str, rank: int, doc: str) -> TensorSpec:
    dims = ("batch", seq) if rank == 2 else (3, "batch", seq)
    return TensorSpec(POSITION_IDS if seq == "seq" else SELECTED_POSITION_IDS, INT64, dims, doc)


def _kv(names: Sequence[str], seq: str) -> tuple[TensorSpec, ...]:
    doc = "KV cache of one layer, [batch, kv heads, tokens, head dim]"
    return tuple(TensorSpec(n, FLOAT, ("batch", "num_kv_heads", seq, "head_dim"), doc) for n in names)


def _levels(prefix: str, levels: range, dims: tuple[str, ...], doc: str) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(n, FLOAT, dims, doc) for n in level_names(prefix, levels))


def vision_graph(pixel_dims: Sequence[int | str], deepstack: int = 0, layout: str = "fixed") -> GraphSpec:
    """The vision graph of ``layout`` (:data:`VISION_LAYOUTS`); ``pixel_dims``: its pixel input's dims."""
    if layout == "fixed":
        inputs: tuple[TensorSpec, ...] = (TensorSpec(PIXEL_VALUES, FLOAT, tuple(pixel_dims), "one preprocessed image"),)
        tokens = "tokens_per_image"
    elif layout == "patch_grid":
        inputs = (
            TensorSpec(PIXEL_VALUES, FLOAT, ("patches", *pixel_dims[-1:]),
                       "the patches of one image or one temporal patch of a video (the processor's order)"),
            TensorSpec(VISION_POSITION_IDS, INT64, ("patches", 2), "each patch's (row, column) in the patch grid"),
            TensorSpec(WINDOW_INDEX, INT64, ("merged_patches",), "merged patches in window order"),
            TensorSpec(CU_WINDOW_SEQLENS, INT64, ("window_bounds",), "window boundaries over the patches, from 0"),
        )
        tokens = "unit_tokens"
    elif layout == "tiles":
        inputs = (
            TensorSpec(PIXEL_VALUES, FLOAT, ("tiles", *pixel_dims[-3:]),
                       "the tiles of one image or the frames of one video"),
            TensorSpec(PACK_INDEX, INT64, ("unit_tokens",),
                       "rows of [tile features; pooled tile features; image_newline] in prompt order"),
        )
        tokens = "unit_tokens"
    else:
        raise ValueError(f"unknown vision layout {layout!r}; one of {VISION_LAYOUTS}")
    return GraphSpec("vision", inputs, (
        TensorSpec(IMAGE_FEATURES, FLOAT, (tokens, "hidden_size"), "its language-model features"),
        *_levels(DEEPSTACK_FEATURES, range(deepstack), (tokens, "hidden_size"),
                 "its DeepStack features of one level"),
    ))


def embed_graph(deepstack: int = 0) -> GraphSpec:
    return GraphSpec("embed", (
        TensorSpec(INPUT_IDS, INT64, ("batch", "seq"), "token ids (image placeholders included)"),
        TensorSpec(IMAGE_FEATURES, FLOAT, ("image_tokens", "hidden_size"),
                   "every image's features in prompt order; [0, hidden_size] in decode"),
        *_levels(DEEPSTACK_FEATURES, range(deepstack), ("image_tokens", "hidden_size"),
                 "every image's DeepStack features of one level, in prompt order; [0, hidden_size] in decode"),
    ), (
        TensorSpec(INPUTS_EMBEDS, FLOAT, ("batch", "seq", "hidden_size"),
                   "token embeddings with the image features at the image tokens"),
        *_levels(DEEPSTACK_EMBEDS, range(deepstack), ("batch", "seq", "hidden_size"),
                 "one DeepStack level's features at the image tokens, zeros elsewhere"),
    ))


def _decoder_inputs(first: str, position_rank: int, layers: range) -> tuple[TensorSpec, ...]:
    return (
        TensorSpec(first, FLOAT, ("batch", "seq", "hidden_size"), "hidden states entering the first layer"),
        TensorSpec(ATTENTION_MASK, INT64, ("batch", "total_seq"), "1 = token, 0 = padding, over cache + new"),
        _positions("seq", position_rank, "position ids of the new tokens (original positions)"),
        *_kv(past_names(layers), "past_seq"),
    )


def _deepstack_inputs(deepstack: int) -> tuple[TensorSpec, ...]:
    return _levels(DEEPSTACK_EMBEDS, range(deepstack), ("batch", "seq", "hidden_size"),
                   "one DeepStack level at the image tokens (zeros elsewhere), added after layer l")


def pre_k_export_graph(k: int, position_rank: int, deepstack: int = 0) -> GraphSpec:
    """pre_k as torch.onnx exports it, before graph surgery inserts TokenSelect (and the DeepStack
    levels l >= K, which surgery gathers at the kept positions)."""
    return GraphSpec("pre_k", _decoder_inputs(INPUTS_EMBEDS, position_rank, range(k)) + _deepstack_inputs(deepstack), (
        TensorSpec(LAYER_HIDDEN, FLOAT, ("batch", "seq", "hidden_size"), "layer K-1's output"),
        TensorSpec(LAYER_QUERY, FLOAT, ("batch", "num_heads", "query_rows", "head_dim"),
                   "layer K-1's post-rotary query (last row, or all rows for ranking mean)"),
        TensorSpec(LAYER_KEY, FLOAT, ("batch", "num_kv_heads", "total_seq", "head_dim"),
                   "layer K-1's post-rotary key, past included"),
        *_kv(present_names(range(k)), "total_seq"),
    ))


def _kept_deepstack(k: int, deepstack: int, seq: str) -> tuple[TensorSpec, ...]:
    return _levels(KEPT_DEEPSTACK_EMBEDS, range(k, max(k, deepstack)), ("batch", seq, "hidden_size"),
                   "one DeepStack level at the kept tokens (zeros at kept text tokens), added after layer l")


def pre_k_graph(k: int, position_rank: int, deepstack: int = 0) -> GraphSpec:
    return GraphSpec("pre_k", _decoder_inputs(INPUTS_EMBEDS, position_rank, range(k)) + _deepstack_inputs(deepstack)
                     + (TensorSpec(CANDIDATE_POSITIONS, INT64, ("batch", "num_candidates"),
                                   "positions of the image tokens, ascending; [batch, 0] in decode"),), (
        TensorSpec(HIDDEN_STATES, FLOAT, ("batch", "kept_seq", "hidden_size"), "kept tokens' hidden states"),
        _positions("kept_seq", position_rank, "kept tokens' ORIGINAL position ids"),
        TensorSpec(KEPT_INDICES, INT64, ("batch", "kept_seq"), "kept prompt positions, ascending"),
        *_kept_deepstack(k, deepstack, "kept_seq"),
        *_kv(present_names(range(k)), "total_seq"),
    ))


def post_k_graph(k: int, num_layers: int, position_rank: int, deepstack: int = 0) -> GraphSpec:
    return GraphSpec("post_k", _decoder_inputs(HIDDEN_STATES, position_rank, range(k, num_layers))
                     + _kept_deepstack(k, deepstack, "seq"), (
        TensorSpec(LOGITS, FLOAT, ("batch", 1, "vocab_size"), "next-token logits (last position only)"),
        *_kv(present_names(range(k, num_layers)), "total_seq"),
    ))


def bundle_graphs(k: int, num_layers: int, position_rank: int, pixel_dims: Sequence[int],
                  deepstack: int = 0, vision_layout: str = "fixed") -> dict[str, GraphSpec]:
    """The four graphs of a bundle, in pipeline order; ``deepstack``: the model's DeepStack levels L."""
    return {"vision": vision_graph(pixel_dims, deepstack, vision_layout), "embed": embed_graph(deepstack),
            "pre_k": pre_k_graph(k, position_rank, deepstack),
            "post_k": post_k_graph(k, num_layers, position_rank, deepstack)}


class BundleShape(Protocol):
    """What the spec needs to know of a bundle (``fastv_export.bundle.Manifest`` provides it)."""
    k: int
    num_layers: int
    position_rank: int
    vision_input_shape: Sequence[int | str]
    deepstack_layers: int
    vision_layout: Mapping
    hidden_size: int
    vocab_size: int
    kv_shape: tuple[int, int]
    tokens_per_image: int


def graph_specs(bundle: BundleShape) -> dict[str, GraphSpec]:
    """The four graphs of an exported bundle (:func:`bundle_graphs` with the bundle's numbers)."""
    return bundle_graphs(bundle.k, bundle.num_layers, bundle.position_rank, bundle.vision_input_shape,
                         bundle.deepstack_layers, bundle.vision_layout["kind"])


def model_sizes(bundle: BundleShape) -> dict[str, int]:
    """The values of :data:`MODEL_DIMS` for a bundle (``TensorSpec.shape(sizes)`` resolves dims with them)."""
    heads, head_dim = bundle.kv_shape
    return {"hidden_size": bundle.hidden_size, "vocab_size": bundle.vocab_size, "num_kv_heads": heads,
            "head_dim": head_dim, "tokens_per_image": bundle.tokens_per_image}


def pipeline_description() -> dict:
    """How a runtime drives the graphs, step by step (recorded in the manifest)."""
    return {
        "embedding": f"own graph (embed.onnx): token embedding with {IMAGE_FEATURES} placed at the image "
                     "tokens in order",
        "prefill": [
            f"vision: each image's {PIXEL_VALUES} -> {IMAGE_FEATURES}; concatenate in prompt order",
            f"embed: {INPUT_IDS} [B,n] + {IMAGE_FEATURES} -> {INPUTS_EMBEDS}",
            f"pre_k: {INPUTS_EMBEDS}, {ATTENTION_MASK} [B,n], {POSITION_IDS}, {CANDIDATE_POSITIONS} [B,M], "
            f"empty past -> {HIDDEN_STATES} [B,n',D], {SELECTED_POSITION_IDS}, {KEPT_INDICES}, "
            f"{PRESENT_PREFIX}.{{i<K}}",
            f"post_k: {HIDDEN_STATES}, {ATTENTION_MASK}[:, {KEPT_INDICES}], {SELECTED_POSITION_IDS}, empty past "
            f"-> {LOGITS} [B,1,V] (last position: the next token), {PRESENT_PREFIX}.{{i>=K}}",
        ],
        "decode": [
            f"embed: {INPUT_IDS} [B,1] + {IMAGE_FEATURES} [0,D] -> {INPUTS_EMBEDS}",
            f"pre_k: {CANDIDATE_POSITIONS} [B,0] (TokenSelect is the identity), {ATTENTION_MASK} over "
            f"n + t + 1 tokens, past = pre_k presents",
            f"post_k: {ATTENTION_MASK} over n' + t + 1 tokens, past = post_k presents",
        ],
    }
