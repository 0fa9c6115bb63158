"""Export a HF VLM with FastV into a bundle: vision / embed / pre-K (+TokenSelect) / post-K ONNX
graphs and manifest.json, written atomically (temporary directory, then rename).

Memory: while the PyTorch model is loaded every graph is written with its weights as external data, streamed from
the model's tensors (torch.onnx's ONNX IR) or moved out of the ModelProto in place (onnx), so no graph's weights
are held twice beside the model; once the model is freed, a graph meant to be one file (under 2 GB, no
--external-data) is read back and written whole (``finish_graphs``: 2x that graph at most, the model gone)."""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch
from tqdm import tqdm

from fastv_export.adapters import ModelAdapter, get_adapter
from fastv_export.config import FastVConfig
from fastv_export.errors import FastVError
from fastv_export.files import atomic_directory
from fastv_export.graphs import spec
from fastv_export.memory import release_freed
from fastv_export.export.modules import Embed, PostK, PreK, Vision
from fastv_export.presets import load_model

if TYPE_CHECKING:
    from fastv_export.bundle import Bundle

log = logging.getLogger(__name__)

OPSET = 18
DTYPES = {precision: getattr(torch, name) for precision, name in spec.PRECISIONS.items()}


@dataclass(frozen=True)
class ExportOptions:
    model: str = "tiny-llava"
    dtype: str = "fp32"
    opset: int = OPSET
    force: bool = False
    #: weights beside each graph in ``<graph>.onnx.data``: True always, None when a graph is over 2 GB
    external_data: bool | None = None
    #: weight-only quantization of the decoder layers (fastv_export/quantize): None, "int8" or "int4"
    quantize: str | None = None
    #: calibration data of a calibrated scheme (int4-awq): "demo", "synthetic" or a folder; None: the default
    calibration: str | None = None
    calibration_size: int = 64
    #: what ``quantize`` covers (fastv_export/quantize/schemes.py PARTS): "decoder", and "lm_head", "vision"
    quantize_parts: tuple[str, ...] = ("decoder",)


@dataclass(frozen=True)
class WrittenGraph:
    """What an exported graph holds, read from the model in memory before it was saved."""
    io: dict[str, list[dict]]          # inputs / outputs as the manifest lists them
    opsets: dict[str, int]             # domain ("ai.onnx" for the default) -> version


def _ir_io(values) -> list[dict]:
    """onnx_ir values (a graph's inputs or outputs) as the manifest lists them."""
    return [{"name": v.name, "dtype": v.dtype.numpy().name,
             "shape": [d if isinstance(d, int) else (d.value if d.value is not None else "?") for d in v.shape]}
            for v in values]


def _proto_written(model: onnx.ModelProto) -> WrittenGraph:
    from fastv_export.bundle.verify import onnx_io

    return WrittenGraph({"inputs": onnx_io(model.graph.input), "outputs": onnx_io(model.graph.output)},
                        {o.domain or "ai.onnx": o.version for o in model.opset_import})


def _dynamo_program(module: torch.nn.Module, args: tuple, graph: spec.GraphSpec, opset: int):
    """torch.onnx (dynamo) export of ``module`` as ``graph``: names and dynamic dims from the spec."""
    from fastv_export.graphs.surgery import name_ir_dims

    with torch.no_grad():
        program = torch.onnx.export(module, args, None, input_names=graph.input_names,
                                    output_names=graph.output_names, dynamo=True,
                                    dynamic_shapes=_dynamic_shapes(module, graph), opset_version=opset, verbose=False)
    name_ir_dims(program.model, graph)   # readable dims (batch, seq, ...) for the manifest
    return program


def _save_proto(model: onnx.ModelProto, path: Path, external_data: bool | None) -> None:
    """Write ``model`` to ``path``, its weights in ``<file>.data`` beside it when ``external_data`` (None: when
    the model does not fit one protobuf). With external data, onnx moves each tensor's bytes out of ``model``
    into the file (in place: ``model`` is left without its weights)."""
    if external_data is None:
        external_data = model.ByteSize() >= onnx.checker.MAXIMUM_PROTOBUF
    onnx.save(model, str(path), save_as_external_data=external_data, all_tensors_to_one_file=True,
              location=f"{path.name}.data")
    data = path.with_name(f"{path.name}.data")
    if data.is_file():                      # onnx writes it 0600: give it the mode of the bundle's other files
        data.chmod(path.stat().st_mode & 0o777)


def _resave_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Rewrite a graph loaded whole from ``path`` (its weights in memory) with fresh external data: the old
    data file goes first (onnx appends to an existing one)."""
    path.with_name(f"{path.name}.data").unlink(missing_ok=True)
    _save_proto(model, path, True)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """The key and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


#: protobuf field numbers: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _write_whole(path: Path, data: Path, out: Path, chunk: int = 64 << 20) -> bool:
    """Write the graph ``path`` (its initializers' weights in ``data``) to ``out`` as one file without holding the
    weights: the graph without those initializers, then a second ``graph`` field holding only them (protobuf
    merges a message field that appears twice), each tensor's bytes copied from ``data`` in chunks. False (nothing
    written) when some weights are not initializers stored in ``data`` with an offset and a length."""
    model = onnx.load(str(path), load_external_data=False)
    heads, kept = [], []
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            kept.append(onnx.TensorProto.FromString(t.SerializeToString()))
            continue
        info = {e.key: e.value for e in t.external_data}
        if info.get("location") != data.name or "length" not in info:
            return False
        head = onnx.TensorProto.FromString(t.SerializeToString())
        head.ClearField("external_data")
        head.ClearField("data_location")
        heads.append((head.SerializeToString(), int(info.get("offset", 0)), int(info["length"])))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    from onnx.external_data_helper import _get_all_tensors

    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _get_all_tensors(model)):
        return False
    entries = []
    for head, offset, length in heads:
        body = len(head) + len(_field(_TENSOR_RAW_DATA, length)) + length
        entries.append((_field(_GRAPH_INITIALIZER, body) + head + _field(_TENSOR_RAW_DATA, length), offset, length))
    with open(out, "wb") as f, open(data, "rb") as src:
        f.write(model.SerializeToString())
        f.write(_field(_MODEL_GRAPH, sum(len(prefix) + length for prefix, _, length in entries)))
        for prefix, offset, length in entries:
            f.write(prefix)
            src.seek(offset)
            left = length
            while left:
                block = src.read(min(chunk, left))
                if not block:
                    raise FastVError(f"{data} ends before the weights {path.name} lists; re-export")
                f.write(block)
                left -= len(block)
    return True


def finish_graphs(out: Path, graphs: dict[str, spec.GraphSpec], external_data: bool | None) -> None:
    """The graphs of ``out`` (written with external data) checked, then in their final form: unless
    ``external_data`` is True, a graph whose file and data together fit one protobuf (2 GB) is written as one
    file, its weights copied from the data file in chunks (:func:`_write_whole`; the data file removed)."""
    from fastv_export.graphs.schema import register_schema

    register_schema()   # the checker then verifies the TokenSelect node and infers its kept_seq outputs
    for g in graphs.values():   # checked with the weights outside: the checker then holds no weights
        onnx.checker.check_model(str(out / g.file), full_check=True)
    for g in graphs.values():
        path = out / g.file
        data = path.with_name(f"{path.name}.data")
        if external_data is not True and data.is_file() and \
                path.stat().st_size + data.stat().st_size < onnx.checker.MAXIMUM_PROTOBUF:
            mode = path.stat().st_mode & 0o777
            tmp = path.with_name(f"{path.name}.whole")
            if not _write_whole(path, data, tmp):        # weights elsewhere than the initializers: the slow way
                model = onnx.load(str(path))
                serialized = model.SerializeToString()
                del model
                tmp.write_bytes(serialized)
                del serialized
            os.replace(tmp, path)
            os.remove(data)
            path.chmod(mode)
            release_freed()


def _export(module: torch.nn.Module, args: tuple, path: Path, graph: spec.GraphSpec, opset: int,
            tracer: str = "dynamo", external_data: bool | None = None) -> WrittenGraph:
    """torch.onnx export of ``module`` as ``graph``, written once to ``path``; ``tracer="jit"``
    (TorchScript tracing, static shapes) serves vision towers whose Python control flow on a fixed
    image grid torch.export cannot trace."""
    if tracer == "jit":
        buffer = io.BytesIO()
        with torch.no_grad():
            torch.onnx.export(module, args, buffer, input_names=graph.input_names,
                              output_names=graph.output_names, dynamo=False, opset_version=opset)
        model = onnx.ModelProto()
        view = buffer.getbuffer()
        model.ParseFromString(view)          # from the buffer itself: no copy of the serialized graph
        view.release()
        del buffer
        written = _proto_written(model)
        _save_proto(model, path, external_data)
        return written
    program = _dynamo_program(module, args, graph, opset)
    written = WrittenGraph({"inputs": _ir_io(program.model.graph.inputs),
                            "outputs": _ir_io(program.model.graph.outputs)},
                           {domain or "ai.onnx": version for domain, version in program.model.opset_imports.items()})
    program.save(str(path), external_data=external_data)
    return written


def _dynamic_shapes(module: torch.nn.Module, graph: spec.GraphSpec):
    """torch.export's dynamic_shapes for ``module.forward``: the spec's dynamic axes of each input,
    keyed by the forward's parameter names (``*past`` takes the KV-cache inputs); None if static."""
    import inspect

    from torch.export import Dim

    axes = [{i: Dim.DYNAMIC for i in t.dynamic_axes()} or None for t in graph.inputs]
    if not any(axes):
        return None
    params = inspect.signature(module.forward).parameters.values()
    named = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    shapes: dict = dict(zip(named, axes))
    rest = [p.name for p in params if p.kind == p.VAR_POSITIONAL]
    if rest and len(axes) > len(named):   # *args that this graph fills (a DeepStack family's levels, KV caches)
        shapes[rest[0]] = tuple(axes[len(named):])
    return shapes


def _example_decoder_inputs(adapter: ModelAdapter, dtype: torch.dtype, layers: int, n: int = 5, past: int = 3,
                            batch: int = 2):
    info = adapter.decoder_shape()
    hidden = torch.randn(batch, n, info.hidden_size, dtype=dtype)
    mask = torch.ones(batch, past + n, dtype=torch.int64)
    pos = torch.arange(past, past + n).expand(batch, n)
    if adapter.position_rank == 3:
        pos = pos.expand(3, batch, n)
    kv = [torch.randn(batch, info.num_kv_heads, past, info.head_dim, dtype=dtype) for _ in range(2 * layers)]
    return hidden, mask, pos.contiguous(), kv


def export_graphs(adapter: ModelAdapter, cfg: FastVConfig, dtype: torch.dtype, out: Path, opset: int,
                  external_data: bool | None = None,
                  finish: bool = True) -> tuple[dict[str, spec.GraphSpec], dict[str, WrittenGraph]]:
    """Write the four graphs of :func:`spec.bundle_graphs` into ``out``, each once with its weights as external
    data, then (``finish``) in their final form (:func:`finish_graphs`, ``external_data``: see
    :class:`ExportOptions`); return their specs and what each holds as written. ``finish=False`` leaves that to
    the caller, to do once the model is freed."""
    from fastv_export.graphs.surgery import insert_token_select
    from fastv_export.prompts import make_prompt

    shape = adapter.decoder_shape()
    k, num_layers, rank = cfg.k, shape.num_layers, adapter.position_rank
    deepstack = adapter.deepstack_layers()
    pixels = make_prompt(adapter, 1, num_images=1).vision[spec.PIXEL_VALUES].to(dtype)
    graphs = spec.bundle_graphs(k, num_layers, rank, pixels.shape, deepstack, adapter.vision_layout)
    written: dict[str, WrittenGraph] = {}
    steps = tqdm(total=len(graphs), desc="export", unit="graph", leave=False)

    # vision: one call (a default-sized image, or one unit of a dynamic layout) -> [tokens, D]
    written["vision"] = _export(Vision(adapter).eval(), adapter.vision_example(pixels), out / graphs["vision"].file,
                                graphs["vision"], opset, tracer=adapter.vision_tracer, external_data=True)
    steps.update()

    # embed: token embedding + image features at the image-token positions
    ids = torch.randint(10, 400, (2, 6))
    ids[0, 2], ids[1, 3] = adapter.image_token_ids()[0], adapter.image_token_ids()[0]
    feats = [torch.randn(2, shape.hidden_size, dtype=dtype) for _ in range(1 + deepstack)]
    written["embed"] = _export(Embed(adapter).eval(), tuple([ids, *feats]), out / graphs["embed"].file,
                               graphs["embed"], opset, external_data=True)
    steps.update()

    # pre-K: layers < K, then TokenSelect (graph surgery on the exported model in memory)
    pre = PreK(adapter, k, "all" if cfg.ranking == "mean" else "last").eval()
    hidden, mask, pos, kv = _example_decoder_inputs(adapter, dtype, k)
    levels = [torch.randn(hidden.shape, dtype=dtype) for _ in range(deepstack)]
    program = _dynamo_program(pre, (hidden, mask, pos, *kv, *levels), spec.pre_k_export_graph(k, rank, deepstack),
                              opset)
    model = insert_token_select(program.model_proto, ranking=cfg.ranking, ratio_num=cfg.r.numerator,
                                ratio_den=cfg.r.denominator, keep=-1 if cfg.keep is None else cfg.keep,
                                seed=cfg.seed, scale=float(adapter.layers()[k - 1].self_attn.scaling),
                                position_rank=rank, k=k, deepstack=deepstack)
    del program
    written["pre_k"] = _proto_written(model)
    _save_proto(model, out / graphs["pre_k"].file, True)    # the weights moved out of the proto into the file
    del model
    steps.update()

    # post-K: layers >= K, norm, lm_head
    hidden, mask, pos, kv = _example_decoder_inputs(adapter, dtype, num_layers - k)
    levels = [torch.randn(hidden.shape, dtype=dtype) for _ in range(k, max(k, deepstack))]
    written["post_k"] = _export(PostK(adapter, k).eval(), (hidden, mask, pos, *kv, *levels),
                                out / graphs["post_k"].file, graphs["post_k"], opset, external_data=True)
    steps.update()
    steps.close()
    if finish:
        finish_graphs(out, graphs, external_data)
    return graphs, written


def export_bundle(out_dir: str | Path, cfg: FastVConfig, options: ExportOptions = ExportOptions()) -> Bundle:
    """Export ``options.model`` with FastV ``cfg`` into the bundle directory ``out_dir`` (atomic); returns
    the bundle (its manifest checked before it was written: no need to load it again)."""
    from fastv_export.bundle import Bundle, export_manifest, write_manifest
    from fastv_export.export.serving import write_serving_files

    out = Path(out_dir)
    if options.dtype not in DTYPES:
        raise FastVError(f"--dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    from fastv_export.quantize import DEFAULT_PARTS, get_scheme, parse_parts

    scheme = get_scheme(options.quantize)
    if scheme is not None and options.dtype != "fp32":
        raise FastVError(f"--quantize {scheme.name} is available for --dtype fp32 bundles only (fp16 scales are not "
                         "done yet); drop --dtype or --quantize")
    if options.calibration is not None and (scheme is None or not scheme.calibrated):
        raise FastVError(f"--calibration is for a calibrated scheme (--quantize int4-awq), not "
                         f"--quantize {options.quantize or 'none'}; drop --calibration")
    if tuple(options.quantize_parts) != DEFAULT_PARTS:
        parse_parts(",".join(options.quantize_parts), options.quantize)     # the same one-line refusals as the CLI
    if cfg.k == 0:
        raise FastVError("export needs K >= 1 (K = 0 prunes before any decoder layer; use the PyTorch "
                         "reference for that ablation)")
    with atomic_directory(out, force=options.force) as tmp:
        dtype = DTYPES[options.dtype]
        model = load_model(options.model, attn_implementation="eager", dtype=dtype)
        adapter = get_adapter(model)
        cfg.check_layers(adapter.decoder_shape().num_layers)
        awq = None
        if scheme is not None and scheme.calibrated:      # the model's scales folded before the graphs are traced
            from fastv_export.quantize.awq import calibrate_export

            awq = calibrate_export(model, adapter, options.model, options.calibration, options.calibration_size)
        specs, written = export_graphs(adapter, cfg, dtype, tmp, options.opset, options.external_data, finish=False)
        quantization = None
        if scheme is not None:
            from fastv_export.quantize import quantize_bundle_graphs

            quantization = quantize_bundle_graphs(adapter, tmp, specs, written, scheme, _resave_with_external_data,
                                                  awq, tuple(options.quantize_parts))
        serving = write_serving_files(options.model, adapter.config, tmp)
        manifest = export_manifest(adapter, cfg, options.dtype, options.model, out, specs, written, serving)
        if quantization is not None:
            manifest["quantization"] = quantization
        del model, adapter                        # the graphs are finished without the PyTorch model in memory
        release_freed()
        finish_graphs(tmp, specs, options.external_data)
        manifest = write_manifest(tmp, manifest)
    log.info("bundle written to %s", out)
    return Bundle(out, manifest)
