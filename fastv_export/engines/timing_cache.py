"""TensorRT timing caches: which file a build may reuse, and handing one to a builder config.

A timing cache holds kernel timings of one TensorRT (or TensorRT-RTX) version on one GPU (or, ahead of
time, one set of compute-capability targets). Its file name says which (:func:`cache_name`), so a build
reads only a cache written by the same backend, version and GPU; any other is never handed to TensorRT.
:func:`apply_timing_cache` sets a cache on a builder config and falls back to a new one, with one logged
line, when TensorRT cannot read or refuses the one given.
"""
from __future__ import annotations

import logging
import re
from typing import Sequence

from fastv_export.errors import FastVError

log = logging.getLogger(__name__)

#: the name builds before per-backend names used (never reused: it says nothing about where it came from)
LEGACY_NAME = "timing.cache"
_PREFIX, _SUFFIX = "timing.", ".cache"


def cache_name(backend: str, version: str, targets: Sequence[str]) -> str:
    """``timing.<backend>-<version>-<targets>.cache``: the file a build with this backend, version and
    GPU (TensorRT 10: the GPU's name and compute capability) or targets (TensorRT-RTX) reads and writes."""
    if not targets:
        raise ValueError("a timing cache is named by at least one GPU or target")
    key = "-".join([backend, version, *targets])
    return _PREFIX + re.sub(r"[^A-Za-z0-9.+-]+", "_", key) + _SUFFIX


def is_cache_name(name: str) -> bool:
    """Whether ``name`` is a timing cache file of any backend (the legacy name included)."""
    return name == LEGACY_NAME or (name.startswith(_PREFIX) and name.endswith(_SUFFIX))


def apply_timing_cache(config, data: bytes) -> None:
    """Set a timing cache built from ``data`` on ``config`` (a TensorRT or TensorRT-RTX IBuilderConfig);
    ``b""``: a new cache. A cache TensorRT cannot read (``create_timing_cache`` returns None) or refuses
    (``set_timing_cache`` returns False: another device or version) is replaced by a new one, logged once."""
    if data:
        cache = config.create_timing_cache(data)
        if cache is not None and config.set_timing_cache(cache, False) is not False:
            return
        log.warning("the timing cache given (%d bytes) %s; starting a new one", len(data),
                    "could not be read" if cache is None else "does not match this TensorRT and GPU")
    cache = config.create_timing_cache(b"")
    if cache is None or config.set_timing_cache(cache, False) is False:
        raise FastVError("TensorRT could not create a new timing cache; check the TensorRT installation "
                         "(its version and libraries)")


def serialized_timing_cache(config) -> bytes:
    """The config's timing cache after a build, serialized (``b""`` when there is none)."""
    cache = config.get_timing_cache()
    return b"" if cache is None else bytes(cache.serialize())
