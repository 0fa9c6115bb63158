"""A graph's weights handed to TensorRT's ONNX parser in place, so that an engine build holds them once.

TensorRT's builder copies every weight into its own memory while it builds; whatever else holds the weights
(an ``onnx.ModelProto``, its serialized bytes, the parser's copy of external data) doubles or triples the peak.
Here the parser gets a weight-less skeleton of the graph (``OnnxParser.load_model_proto``) and each initializer
as a pointer into a read-only memory map of the file that holds its bytes (``load_initializer``):

- :func:`skeleton` scans the ``.onnx`` file's protobuf wire format (never parsing the weights into Python) and
  returns the graph with every inline ``raw_data`` initializer turned into an external reference to the
  ``.onnx`` file itself (offset and length of its bytes there); initializers already in external data keep
  their references;
- :class:`MappedWeights` maps the files those references name and gives each initializer's address; while a
  build runs, a thread drops the mapping's resident pages every few milliseconds (``MADV_DONTNEED`` on a
  read-only file mapping: a later read faults the bytes back in from the page cache), so the weights the
  builder has already copied are not counted twice;
- :func:`stream_writer` makes a TensorRT ``IStreamWriter`` that writes the serialized engine to a file and
  hashes it as it goes (``build_serialized_network_to_stream``), so the plan never sits whole in Python.
"""
from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx

from fastv_export.errors import FastVError

log = logging.getLogger(__name__)

#: how often the build's weight mappings drop their resident pages (seconds)
DROP_INTERVAL_S = 0.02

# field numbers of onnx.proto3 (ModelProto.graph, GraphProto.initializer, TensorProto.*)
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_NAME, _TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 9, 13, 14
_EXTERNAL = 1                                          # TensorProto.DataLocation.EXTERNAL


# ---------------------------------------------------------------------------------------------- wire format
def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated varint")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf, start: int, end: int):
    """(field number, wire type, start of the field's key, start of its value, end of its value) of one message."""
    pos = start
    while pos < end:
        key_start = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, value_end = _read_varint(buf, pos, end)
        elif wire == 1:
            value_end = pos + 8
        elif wire == 5:
            value_end = pos + 4
        elif wire == 2:
            length, pos = _read_varint(buf, pos, end)
            value_end = pos + length
        else:
            raise ValueError(f"wire type {wire} is not used by ONNX")
        if value_end > end:
            raise ValueError("a field runs past its message")
        yield number, wire, key_start, pos, value_end
        pos = value_end


def _length_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _external_entry(key: str, value: str) -> bytes:
    entry = _length_field(1, key.encode()) + _length_field(2, value.encode())
    return _length_field(_TENSOR_EXTERNAL_DATA, entry)


def _tensor_skeleton(buf, start: int, end: int, location: str) -> bytes:
    fields = list(_fields(buf, start, end))
    raw = [(vs, ve) for n, w, _, vs, ve in fields if n == _TENSOR_RAW_DATA and w == 2]
    if not raw:                                        # external already, or typed data fields: as it is
        return bytes(buf[start:end])
    (offset, stop), = raw[-1:]                         # protobuf keeps the last of a field given twice
    out = bytearray()
    for n, _, ks, _, ve in fields:
        if n not in (_TENSOR_RAW_DATA, _TENSOR_DATA_LOCATION, _TENSOR_EXTERNAL_DATA):
            out += buf[ks:ve]
    out += _external_entry("location", location) + _external_entry("offset", str(offset))
    out += _external_entry("length", str(stop - offset))
    out += _varint(_TENSOR_DATA_LOCATION << 3) + _varint(_EXTERNAL)
    return bytes(out)


def _graph_skeleton(buf, start: int, end: int, location: str) -> bytes:
    out = bytearray()
    for n, w, ks, vs, ve in _fields(buf, start, end):
        if n == _GRAPH_INITIALIZER and w == 2:
            out += _length_field(n, _tensor_skeleton(buf, vs, ve, location))
        else:
            out += buf[ks:ve]
    return bytes(out)


def skeleton(path: str | os.PathLike) -> onnx.ModelProto:
    """The graph at ``path`` without its weights: inline initializers become external references to ``path``
    itself (their ``raw_data`` bytes' offset and length in the file), external ones keep theirs. Reads the file
    through a memory map; the weights are never copied."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            out = bytearray()
            for n, w, ks, vs, ve in _fields(mm, 0, len(mm)):
                if n == _MODEL_GRAPH and w == 2:      # a graph given twice is merged by protobuf: each in turn
                    out += _length_field(n, _graph_skeleton(mm, vs, ve, path.name))
                else:
                    out += mm[ks:ve]
            mm.madvise(mmap.MADV_DONTNEED)
        return onnx.load_from_string(bytes(out))
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and the like: one line
        what = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise FastVError(f"{path} could not be read for the engine build ({what}); re-export the bundle") from None


# ---------------------------------------------------------------------------------------------- references
@dataclass(frozen=True)
class WeightRef:
    """Where one initializer's bytes lie: ``file`` (absolute), ``offset``, ``length``."""
    name: str
    file: Path
    offset: int
    length: int


def _nbytes(tensor: onnx.TensorProto) -> int | None:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return math.prod(tensor.dims) * itemsize


def weight_refs(model: onnx.ModelProto, graph_path: str | os.PathLike) -> list[WeightRef]:
    """The external references of ``model``'s graph initializers (the skeleton of ``graph_path``), resolved
    against the graph's folder; a location outside it, or bytes past the end of the file, is refused."""
    folder = Path(graph_path).resolve().parent
    refs = []
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        file = (folder / location).resolve()
        if not location or os.path.isabs(location) or folder not in file.parents:
            raise FastVError(f"{graph_path}: initializer {t.name!r} names external data {location!r} outside the "
                             "bundle; re-export the bundle")
        offset = int(info.get("offset", 0) or 0)
        length = int(info["length"]) if info.get("length") else _nbytes(t)
        if length is None:
            raise FastVError(f"{graph_path}: initializer {t.name!r} has no length and an unknown type; re-export")
        size = file.stat().st_size if file.is_file() else -1
        if size < 0 or offset + length > size:
            raise FastVError(f"{graph_path}: the external data of {t.name!r} ({location}, bytes {offset}-"
                             f"{offset + length}) is missing or truncated; re-export the bundle")
        refs.append(WeightRef(t.name, file, offset, length))
    return refs


# ---------------------------------------------------------------------------------------------- mapping
class MappedWeights:
    """Read-only memory maps of the files ``refs`` name; :meth:`address` gives an initializer's bytes.
    Use as a context manager (the maps close on exit); :meth:`dropping` drops resident pages while a block
    runs. The maps must outlive every TensorRT parser and builder that was handed their addresses."""

    def __init__(self, refs: list[WeightRef]):
        import numpy as np

        self._maps: dict[Path, mmap.mmap] = {}
        self._views: dict[Path, object] = {}              # numpy views: the maps' base addresses
        for ref in refs:
            if ref.file in self._maps or ref.length == 0:
                continue
            with open(ref.file, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[ref.file] = mm
            self._views[ref.file] = np.frombuffer(mm, dtype=np.uint8)

    def address(self, ref: WeightRef) -> int:
        return int(self._views[ref.file].ctypes.data) + ref.offset

    def drop_pages(self) -> None:
        for mm in self._maps.values():
            mm.madvise(mmap.MADV_DONTNEED)

    def dropping(self, interval_s: float = DROP_INTERVAL_S) -> "_Dropper":
        return _Dropper(self, interval_s)

    def close(self) -> None:
        self._views.clear()
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()

    def __enter__(self) -> "MappedWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Dropper:
    """While the block runs, a thread drops the maps' resident pages every ``interval_s``."""

    def __init__(self, weights: MappedWeights, interval_s: float):
        self.weights, self.interval_s = weights, interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fastv-weight-pages", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.weights.drop_pages()

    def __enter__(self) -> "_Dropper":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.weights.drop_pages()


# ---------------------------------------------------------------------------------------------- writing
@dataclass
class WrittenStream:
    """What a stream writer wrote: ``bytes`` and their ``sha256``; ``error``: an exception raised in write."""
    bytes: int = 0
    sha256: str = ""
    error: BaseException | None = None


def stream_writer(trt, out: BinaryIO):
    """A ``trt.IStreamWriter`` that writes to the open file ``out`` and hashes what it writes; its ``result``
    (a :class:`WrittenStream`) is complete once the build returned. An error while writing is kept in
    ``result.error`` and reported to TensorRT as a short write (which fails the build)."""

    class HashingWriter(trt.IStreamWriter):
        def __init__(self):
            trt.IStreamWriter.__init__(self)
            self.hash = hashlib.sha256()
            self.result = WrittenStream()

        def write(self, data) -> int:
            try:
                out.write(data)
                self.hash.update(data)
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller after the build
                self.result.error = exc
                return 0
            self.result.bytes += len(data)
            self.result.sha256 = self.hash.hexdigest()
            return len(data)

    return HashingWriter()
