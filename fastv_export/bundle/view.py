"""Typed, read-only views of a checked manifest: every reader of a bundle goes through these.

:class:`Manifest` names the fields a runtime, a builder or validation needs (docs/manifest.md);
:class:`Bundle` is a verified bundle directory with its manifest (what :func:`load_bundle` returns);
:class:`Engines` is the ``engines`` section that ``fastv-export build`` writes and the TensorRT
runner reads. Only the bundle package itself (the writer and the verifier) touches the raw JSON.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fastv_export.bundle.chat import ChatForm
from fastv_export.config import FastVConfig
from fastv_export.graphs import spec

MANIFEST = "manifest.json"


def expand_runs(runs: Sequence[Sequence[int]]) -> list[int]:
    """[[500, 3], [7, 1]] -> [500, 500, 500, 7]: a token sequence from the manifest's compact runs."""
    return [t for t, count in runs for _ in range(count)]


# ---------------------------------------------------------------------------------------------- engines
@dataclass(frozen=True)
class Lengths:
    """The sequence lengths an engine build's limits imply for one bundle."""

    prompt: int          # n
    image_tokens: int    # M
    kept: int            # n' = n - M + keep(M)
    new_tokens: int      # T


@dataclass(frozen=True)
class Profile:
    """One optimization profile of an engine: input name -> (min, opt, max) shapes."""
    name: str
    shapes: dict[str, tuple[list[int], list[int], list[int]]]

    def holds(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        """Whether every named shape lies within this profile's ranges (inputs it does not name: any)."""
        return all(name not in self.shapes or (len(dims) == len(self.shapes[name][0]) and all(
            lo <= d <= hi for lo, d, hi in zip(self.shapes[name][0], dims, self.shapes[name][2])))
            for name, dims in shapes.items())

    def to_dict(self) -> dict:
        return {"name": self.name, "shapes": {k: {"min": lo, "opt": opt, "max": hi}
                                              for k, (lo, opt, hi) in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> Profile:
        return cls(d["name"], {k: (r["min"], r["opt"], r["max"]) for k, r in d["shapes"].items()})


@dataclass(frozen=True)
class Engine:
    """One engine file as the build recorded it."""
    file: str
    sha256: str
    bytes: int
    profiles: list[Profile]
    kv_cache_bytes_at_max: int
    activation_bytes: int | None
    layers: int
    plugin_layers: int
    build_seconds: float

    def to_dict(self) -> dict:
        return dict(asdict(self), profiles=[p.to_dict() for p in self.profiles])

    @classmethod
    def from_dict(cls, d: Mapping) -> Engine:
        return cls(**dict(d, profiles=[Profile.from_dict(p) for p in d["profiles"]]))


@dataclass(frozen=True)
class Engines:
    """The manifest's ``engines`` section: what was built, for which targets and limits."""
    backend: str
    backend_version: str
    targets: list[str]
    precision: str
    strongly_typed: bool
    token_select: str                       # "plugin" or "onnx_function_body"
    plugin: dict | None                     # the plugin's identity and sha256 (None: function body)
    limits: dict                            # BuildLimits.to_dict()
    lengths: Lengths
    timing_cache: str
    trtexec_script: str
    engines: dict[str, Engine]

    def to_dict(self) -> dict:
        return dict(asdict(self), engines={g: e.to_dict() for g, e in self.engines.items()})

    @classmethod
    def from_dict(cls, d: Mapping) -> Engines:
        return cls(**dict(d, lengths=Lengths(**d["lengths"]),
                          engines={g: Engine.from_dict(e) for g, e in d["engines"].items()}))


# ---------------------------------------------------------------------------------------------- serving
@dataclass(frozen=True)
class Generation:
    """``serving.generation``: the ids generation stops at / starts with / pads with, and the checkpoint's
    sampling defaults (None: generation_config.json leaves it unset)."""
    eos_token_ids: list[int]
    bos_token_id: int | None
    pad_token_id: int | None
    do_sample: bool | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None
    max_new_tokens: int | None


@dataclass(frozen=True)
class Serving:
    """The manifest's ``serving`` section: which file of the bundle serves which role (a file name in the
    bundle directory, or None when the model has none), the generation settings and the pre-rendered chat
    template (None: no template, or one the pre-rendered form cannot reproduce)."""
    tokenizer: str | None
    tokenizer_config: str | None
    special_tokens_map: str | None
    chat_template: str | None
    image_processor: str | None
    video_processor: str | None
    processor: str | None
    generation_config: str
    tokenizer_adds_bos: bool | None
    generation: Generation
    chat: ChatForm | None

    @classmethod
    def from_dict(cls, d: Mapping) -> Serving:
        return cls(**dict(d, generation=Generation(**d["generation"]),
                          chat=None if d["chat"] is None else ChatForm.from_dict(d["chat"])))


# ---------------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class Manifest:
    """A checked ``manifest.json`` (``raw``: the parsed JSON, for the bundle package only)."""

    raw: Mapping[str, Any] = field(repr=False)

    # ---- the source model
    @property
    def source_name(self) -> str:
        """A built-in preset's name, or the checkpoint directory's name."""
        return self.raw["source_model"]["name"]

    @property
    def source_checkpoint(self) -> str | None:
        """The checkpoint directory relative to the bundle directory (None for presets)."""
        return self.raw["source_model"].get("checkpoint")

    @property
    def architecture(self) -> str:
        return self.raw["source_model"]["architecture"]

    @property
    def config_sha256(self) -> str:
        return self.raw["source_model"]["config_sha256"]

    @property
    def num_layers(self) -> int:
        return self.raw["source_model"]["num_layers"]

    @property
    def hidden_size(self) -> int:
        return self.raw["source_model"]["hidden_size"]

    @property
    def vocab_size(self) -> int:
        return self.raw["source_model"]["vocab_size"]

    @property
    def deepstack_layers(self) -> int:
        """DeepStack levels L of the model (0: none): the graphs carry one tensor per level."""
        return self.raw["source_model"].get("deepstack_layers", 0)

    @property
    def eos_token_id(self) -> int | list[int] | None:
        return self.raw["source_model"].get("eos_token_id")

    @property
    def pad_token_id(self) -> int:
        return self.raw["source_model"].get("pad_token_id") or 0

    # ---- FastV and precision
    @property
    def fastv(self) -> FastVConfig:
        return FastVConfig.from_manifest(self.raw["fastv"])

    @property
    def k(self) -> int:
        return self.raw["fastv"]["k"]

    @property
    def precision(self) -> str:
        return self.raw["precision"]

    @property
    def quantization(self) -> Mapping[str, Any] | None:
        """The ``quantization`` section of a quantized bundle (weight-only decoder weights), None otherwise."""
        return self.raw.get("quantization")

    @property
    def quantization_scheme(self) -> str | None:
        """"int8" or "int4" for a quantized bundle, None otherwise."""
        return (self.quantization or {}).get("scheme")

    @property
    def float_dtype(self) -> np.dtype:
        """numpy dtype of the graphs' float tensors (the bundle's precision)."""
        return np.dtype(spec.PRECISIONS[self.precision])

    # ---- image tokens and the vision graph
    @property
    def image_token_ids(self) -> list[int]:
        return self.raw["image_tokens"]["token_ids"]

    @property
    def tokens_per_image(self) -> int:
        """Image tokens (candidates) one image of the exported size gives."""
        return self.raw["image_tokens"]["per_image"]

    def image_prompt_tokens(self) -> list[int]:
        """The token ids one image takes in a prompt (placeholders and delimiters), expanded."""
        return expand_runs(self.raw["image_tokens"]["prompt_tokens_per_image"])

    @property
    def vision_input_shape(self) -> list:
        return self.raw["image_tokens"]["vision_input"]["shape"]

    @property
    def vision_layout(self) -> Mapping[str, Any]:
        """``{"kind": "fixed" | "patch_grid" | "tiles", ...the layout's numbers}``."""
        return self.raw["image_tokens"].get("vision_layout") or {"kind": "fixed"}

    @property
    def grid_thw(self) -> list[int] | None:
        """The exported image's patch grid (t, h, w) before merging (M-RoPE families)."""
        return self.raw["image_tokens"].get("grid_thw")

    # ---- positions and the KV cache
    @property
    def position_rank(self) -> int:
        """2: RoPE position ids [B, n]; 3: M-RoPE (t, h, w) triples [3, B, n]."""
        return self.raw["positions"]["rank"]

    @property
    def spatial_merge_size(self) -> int | None:
        return self.raw["positions"].get("spatial_merge_size")

    @property
    def video_token_id(self) -> int | None:
        return self.raw["positions"].get("video_token_id")

    @property
    def video_tokens_per_second(self) -> float | None:
        """Set when a video's temporal positions follow time (Qwen2.5-VL); None: index i."""
        return self.raw["positions"].get("video_tokens_per_second")

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(num_kv_heads, head_dim) of every layer's cache."""
        kv = self.raw["kv_cache"]
        return kv["num_kv_heads"], kv["head_dim"]

    @property
    def engines(self) -> Engines | None:
        """The engines section (None until ``fastv-export build``)."""
        section = self.raw["engines"]
        return None if section is None else Engines.from_dict(section)

    def with_engines(self, section: Engines) -> dict:
        """A copy of the raw manifest with ``section`` as its engines (for the writer)."""
        return dict(self.raw, engines=section.to_dict())

    @property
    def serving(self) -> Serving:
        """What serving needs (tokenizer, processors, chat template, generation settings): files of the bundle."""
        return Serving.from_dict(self.raw["serving"])

    @property
    def has_serving(self) -> bool:
        """Whether this manifest has a ``serving`` section (a bundle's always; a view of a loaded model has none)."""
        return "serving" in self.raw

    @property
    def files(self) -> dict[str, dict]:
        """Every file of the bundle but manifest.json: name -> {"sha256", "bytes"}."""
        return dict(self.raw["files"])


class Bundle(Manifest):
    """A verified bundle directory and its manifest (:func:`fastv_export.bundle.load_bundle`)."""

    def __init__(self, path: str | Path, raw: Mapping[str, Any]) -> None:
        super().__init__(raw)
        object.__setattr__(self, "path", Path(path))

    path: Path

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r})"

    def file(self, name: str) -> Path:
        """The file of graph ``name`` ("vision", "embed", "pre_k", "post_k")."""
        return self.path / self.raw["graphs"][name]["file"]

    @property
    def source(self) -> str:
        """What ``load_model`` rebuilds the source model from: the preset's name, or the checkpoint
        directory (``source_model.checkpoint``, relative to the bundle directory)."""
        rel = self.source_checkpoint
        return self.source_name if rel is None else str(self.path / rel)
