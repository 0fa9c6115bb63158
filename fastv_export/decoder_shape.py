"""The shape of a decoder-only language model: the one description that adapters, the FLOPs model,
the export and the manifest share. Pure Python (no torch, no transformers at import)."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from fastv_export.errors import FastVError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderShape:
    """The shapes of a decoder-only language model that matter for FLOPs and the KV cache."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FastVError(f"decoder shape: {name} must be a positive integer, got {value!r}")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], source: str = "config") -> "DecoderShape":
        """From HF config keys; a nested ``text_config`` (LLaVA, Qwen2-VL, ...) takes precedence."""
        text = raw.get("text_config")
        keys = dict(text) if isinstance(text, Mapping) else {}
        merged = {**{k: v for k, v in raw.items() if k != "text_config"}, **keys} if keys else dict(raw)
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in required if merged.get(k) is None]
        if missing:
            raise FastVError(f"{source}: missing {', '.join(missing)} (looked at the top level and under "
                             f"'text_config')")
        heads = merged["num_attention_heads"]
        kv_heads = merged.get("num_key_value_heads") or heads
        head_dim = merged.get("head_dim") or (merged["hidden_size"] // heads if heads else 0)
        return cls(hidden_size=merged["hidden_size"], intermediate_size=merged["intermediate_size"],
                   num_layers=merged["num_hidden_layers"], num_heads=heads, num_kv_heads=kv_heads,
                   head_dim=head_dim, vocab_size=merged["vocab_size"])

    @classmethod
    def from_config(cls, cfg: Any) -> "DecoderShape":
        """From a transformers config: its ``text_config`` if it has one, else the config itself."""
        text = getattr(cfg, "text_config", None)
        if text is None and not hasattr(cfg, "hidden_size") and hasattr(cfg, "get_text_config"):
            text = cfg.get_text_config()
        text = text if text is not None else cfg
        names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size")
        return cls.from_mapping({k: getattr(text, k, None) for k in names}, source=type(cfg).__name__)

    @classmethod
    def from_json(cls, path: str | Path) -> "DecoderShape":
        """From a Hugging Face ``config.json`` (or a checkpoint directory holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise FastVError(f"model config file {str(p)!r} not found")
        try:
            raw = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FastVError(f"cannot read {str(p)!r} as JSON: {exc}".replace("\n", " ")) from None
        if not isinstance(raw, dict):
            raise FastVError(f"{str(p)!r} does not hold a JSON object")
        try:
            return cls.from_mapping(raw, source=str(p))
        except FastVError:
            # e.g. LLaVA's config.json lists only the non-default text keys: let transformers fill them in
            shape = _shape_via_transformers(raw)
            if shape is None:
                raise
            return shape


def _shape_via_transformers(raw: dict[str, Any]) -> DecoderShape | None:
    """Fill missing keys from transformers' defaults for ``raw['model_type']``; None if impossible."""
    if "model_type" not in raw:
        return None
    try:
        from transformers import AutoConfig
        kwargs = {k: v for k, v in raw.items() if k != "model_type"}
        return DecoderShape.from_config(AutoConfig.for_model(raw["model_type"], **kwargs))
    except (FastVError, ValueError, KeyError, TypeError) as exc:
        log.debug("transformers could not complete the config: %s", exc)
        return None
