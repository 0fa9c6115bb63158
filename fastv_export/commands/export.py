"""`fastv-export export`: write a FastV bundle (ONNX graphs + manifest.json)."""
from __future__ import annotations

import argparse

from fastv_export.commands.common import add_fastv_arguments, add_model_argument, fastv_config_from_args
from fastv_export.graphs import spec
from fastv_export.memory import add_memory_argument

HELP = "export a model with FastV as vision / embed / pre-K (+TokenSelect) / post-K ONNX graphs"
DESCRIPTION = """\
Split the language model at layer K: pre_k.onnx runs layers < K and ends in ONE fastv::TokenSelect
node (an ONNX local function that ONNX Runtime runs as is; TensorRT uses the TokenSelect plugin
when libfastv_plugins.so is loaded), post_k.onnx runs layers >= K, the norm and lm_head on the
kept tokens. vision.onnx and embed.onnx produce the inputs. The same graphs serve prefill and
decode (decode passes no candidates: TokenSelect is the identity). manifest.json records
everything a runtime needs, with sha256 checksums. The bundle is written atomically.

examples:
  fastv-export export --out bundle                               # tiny-llava, K=2, R=1/2
  fastv-export export --model tiny-qwen2-vl --k 1 --r 3/4 --ranking mean --out qwen-bundle
  fastv-export export --dtype fp16 --out bundle-fp16 --force
  fastv-export export --model tiny-llava-shapes --quantize int4 --out bundle-int4   # int4 weights, block 128
  fastv-export export --model tiny-llava-shapes --quantize int4-awq --calibration demo --out bundle-awq
  fastv-export export --model tiny-llava-shapes --quantize int8 --quantize-parts decoder,lm_head,vision --out b-i8
then: fastv-export validate bundle
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, FastV parameters, precision and the bundle to write (shared with `fastv-export pipeline`)."""
    add_model_argument(parser)
    add_fastv_arguments(parser)
    parser.add_argument("--dtype", choices=list(spec.PRECISIONS), default="fp32", help="graph precision (default fp32)")
    parser.add_argument("--out", required=True, metavar="BUNDLE", help="bundle directory to write")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle")
    parser.add_argument("--external-data", action="store_true", default=None,
                        help="write every graph's weights beside it as <graph>.onnx.data (default: only graphs over "
                             "the 2 GB protobuf limit)")
    parser.add_argument("--quantize", default="none", metavar="SCHEME",
                        help="weight-only quantization of the decoder layers (and of --quantize-parts): none (default), "
                             "int8 (per output channel), int4 (blocks of 128) or fp8 (float8 e4m3 per output channel; engines for "
                             "SM89 and later), symmetric min-max without calibration data; or int4-awq (blocks of "
                             "128, AWQ scales from NVIDIA ModelOpt on --calibration)")
    parser.add_argument("--quantize-parts", default=None, metavar="PART,...",
                        help="what --quantize covers, comma-separated: decoder (the decoder layers' Linears; the "
                             "default, always included), lm_head (post_k's last MatMul; a tied token embedding "
                             "stays float in embed.onnx), vision (the vision tower's and projector's Linears in "
                             "vision.onnx); same scheme for all (int4-awq: lm_head and vision take min-max int4)")
    parser.add_argument("--calibration", default=None, metavar="SET",
                        help="int4-awq's calibration data: demo (the tiny-llava-shapes task's train split; the "
                             "default for that preset), synthetic (the default otherwise) or a folder of images + "
                             "prompts.jsonl (as `fastv-export calibrate` takes)")
    parser.add_argument("--calibration-size", type=int, default=64, metavar="N",
                        help="at most N calibration prompts (default 64)")
    add_memory_argument(parser)


def run(args: argparse.Namespace) -> int:
    from fastv_export.quantize import get_scheme, parse_parts

    cfg = fastv_config_from_args(args)
    scheme = get_scheme(args.quantize)          # an unknown scheme stops here, before the model loads
    parts = parse_parts(args.quantize_parts, args.quantize)
    out = measured_export(args, cfg, scheme).path
    what = args.dtype if scheme is None else f"{args.dtype}, {scheme.name} weights of {'+'.join(parts)}"
    print(f"wrote {out} ({cfg.describe()}, {what}); next: fastv-export validate {out}")
    return 0


def measured_export(args: argparse.Namespace, cfg, scheme=None):
    """export_bundle of the arguments, after the memory check (stops if the estimate does not fit), its peak
    RSS recorded in BUNDLE/logs/stages.json (shared with `fastv-export pipeline`)."""
    from fastv_export import memory
    from fastv_export.export.onnx_export import ExportOptions, export_bundle
    from fastv_export.quantize import parse_parts

    est, available = memory.preflight(lambda: memory.export_estimate(args.model, args.dtype),
                                      memory.EXPORT_ADVICE[args.dtype], args.ignore_memory_check)
    with memory.measure("export", est, available) as record:
        bundle = export_bundle(args.out, cfg, ExportOptions(model=args.model, dtype=args.dtype, force=args.force,
                                                            external_data=args.external_data,
                                                            quantize=scheme and scheme.name,
                                                            quantize_parts=parse_parts(
                                                                getattr(args, "quantize_parts", None),
                                                                scheme and scheme.name),
                                                            calibration=getattr(args, "calibration", None),
                                                            calibration_size=getattr(args, "calibration_size", 64)))
    memory.record_stages(bundle.path, record, previous={})
    return bundle
