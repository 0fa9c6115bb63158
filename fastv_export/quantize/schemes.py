"""Weight-only quantization schemes of a bundle and what each needs of a TensorRT target."""
from __future__ import annotations

import re
from dataclasses import dataclass

from fastv_export.errors import FastVError


@dataclass(frozen=True)
class Scheme:
    """A weight-only scheme: ``bits``-bit signed integer weights, symmetric (no zero point: TensorRT(-RTX) refuses
    DequantizeLinear with a zero point on weights), round to nearest from each group's absolute maximum;
    ``block_size`` 0 means one scale per output channel, else one per ``block_size`` rows of the reduction axis
    (opset 21 block-wise DequantizeLinear)."""
    name: str
    bits: int
    block_size: int
    onnx_dtype: str             # the weights' ONNX element type
    min_opset: int              # the default-domain opset the DequantizeLinear form needs
    min_sm: int                 # the lowest TensorRT-RTX ahead-of-time target that builds it (measured)
    algorithm: str = "min-max"  # how the scales are found: from the weights alone, or "awq-full" (calibration data)

    @property
    def calibrated(self) -> bool:
        return self.algorithm != "min-max"

    @property
    def granularity(self) -> str:
        return "per-block" if self.block_size else "per-channel"

    def to_manifest(self) -> dict:
        return {"scheme": self.name, "weight_dtype": self.onnx_dtype, "bits": self.bits,
                "granularity": self.granularity, "block_size": self.block_size or None, "symmetric": True,
                "algorithm": self.algorithm}


#: TensorRT-RTX 1.7 builds DequantizeLinear -> MatMul weights ahead of time for SM80 and later; SM75 fails in
#: its Myelin compiler for both integer forms. float8 e4m3fn weights (opset 19 DequantizeLinear, one scale per
#: output channel) build for SM89 and SM120 only: for SM80 / SM86 it says "Cannot compile for target(s) sm86,
#: because the model contains HW-specific datatypes: fp8_e4m3" (docs/design.md §10).
SCHEMES: dict[str, Scheme] = {
    "int8": Scheme("int8", 8, 0, "INT8", 13, 80),
    "int4": Scheme("int4", 4, 128, "INT4", 21, 80),
    # ModelOpt's AWQ (awq_full): int4 blocks of 128 with activation-aware scales from a calibration set
    "int4-awq": Scheme("int4-awq", 4, 128, "INT4", 21, 80, "awq-full"),
    "fp8": Scheme("fp8", 8, 0, "FLOAT8E4M3FN", 19, 89),
}
NONE = "none"

#: the parts of a model `export --quantize-parts` can quantize (one place for their names): the decoder layers'
#: Linears (pre_k.onnx, post_k.onnx; always), lm_head (post_k.onnx's last MatMul), the vision tower's and
#: projector's Linears (vision.onnx); with the manifest's ``quantization.quantized`` key of each
PARTS: dict[str, str] = {"decoder": "decoder_layers", "lm_head": "lm_head", "vision": "vision_tower"}
DEFAULT_PARTS: tuple[str, ...] = ("decoder",)


def parse_parts(text: str | None, scheme_name: str | None) -> tuple[str, ...]:
    """The parts named in ``--quantize-parts`` (comma-separated; None: the default, the decoder layers), in
    :data:`PARTS` order; FastVError in one line for an unknown part, a list without decoder, or parts given
    without a scheme (``scheme_name`` None or "none")."""
    if text is None:
        return DEFAULT_PARTS
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PARTS]
    if unknown:
        raise FastVError(f"unknown --quantize-parts part {unknown[0]!r}; choose from {', '.join(PARTS)} "
                         "(comma-separated, decoder included)")
    if get_scheme(scheme_name) is None:
        raise FastVError("--quantize-parts needs a scheme: add --quantize int8|int4|int4-awq|fp8, or drop "
                         "--quantize-parts")
    if "decoder" not in names:
        raise FastVError(f"--quantize-parts {text} leaves out decoder, which every quantized bundle quantizes; "
                         f"write --quantize-parts decoder,{','.join(names) or 'lm_head'}")
    return tuple(p for p in PARTS if p in names)


def get_scheme(name: str | None) -> Scheme | None:
    """The scheme called ``name`` (None or "none": no quantization); FastVError naming the choices otherwise."""
    if name is None or name == NONE:
        return None
    if name not in SCHEMES:
        raise FastVError(f"unknown quantization scheme {name!r}; choose one of {', '.join([NONE, *SCHEMES])} "
                         "(weight-only)")
    return SCHEMES[name]


def check_target(scheme_name: str | None, compute_capabilities) -> None:
    """FastVError in one line when a bundle quantized with ``scheme_name`` cannot be built for one of
    ``compute_capabilities`` (names such as "SM86" or "8.6")."""
    scheme = get_scheme(scheme_name)
    if scheme is None:
        return
    for cc in compute_capabilities:
        digits = str(cc).upper().replace("SM_", "").replace("SM", "").replace(".", "")
        if digits.isdigit() and int(digits) < scheme.min_sm:
            why = (f"float8 needs SM{scheme.min_sm} (Ada) or later, Jetson Orin (SM87) included"
                   if scheme.onnx_dtype.startswith("FLOAT8") else f"TensorRT-RTX builds quantized weights for "
                   f"SM{scheme.min_sm} and later")
            raise FastVError(f"a bundle with {scheme.name} weights cannot be built for {cc}: {why}; drop {cc} from "
                             "--compute-capability or export with another --quantize")


#: the first TensorRT whose ONNX parser imports DequantizeLinear weights of each element type (onnx-tensorrt
#: changelog): per-axis int8 8.0, float8 9.0, int4 (block-wise, opset 21) 10.0 EA. TensorRT-RTX 1.7 builds all three.
TENSORRT_SINCE: dict[str, tuple[int, int]] = {"INT8": (8, 0), "FLOAT8E4M3FN": (9, 0), "INT4": (10, 0)}


def check_backend(scheme_name: str | None, backend: str, version: str) -> None:
    """FastVError in one line when TensorRT ``version`` (``backend`` "tensorrt") predates the import of
    ``scheme_name``'s DequantizeLinear weights; TensorRT-RTX versions are not checked (1.7 measured)."""
    scheme = get_scheme(scheme_name)
    if scheme is None or backend != "tensorrt":
        return
    since = TENSORRT_SINCE[scheme.onnx_dtype]
    have = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if len(have) < 2 or have < since:
        raise FastVError(f"TensorRT {version} cannot build this bundle's {scheme.name} weights ({scheme.onnx_dtype} "
                         f"DequantizeLinear came in TensorRT {since[0]}.{since[1]}); upgrade TensorRT, build ahead of "
                         "time with --backend tensorrt-rtx, or export with another --quantize")


def trtexec_guard(scheme_name: str | None) -> list[str]:
    """Shell lines for build_engines.sh that stop it, with one line, on a GPU below the scheme's minimum compute
    capability (the device's ``nvidia-smi``; Jetson Orin, SM87, by its device-tree model): none for float bundles."""
    scheme = get_scheme(scheme_name)
    if scheme is None:
        return []
    need = f"{scheme.min_sm // 10}.{scheme.min_sm % 10}"
    return [f"# {scheme.name} weights need compute capability {need} or later",
            "cc=$( (nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null || true) | head -n1)",
            "case \"$gpu\" in *Orin*) cc=8.7 ;; esac",
            f"if [ -n \"$cc\" ] && awk -v c=\"$cc\" 'BEGIN {{ exit !(c < {need}) }}'; then",
            (f"  echo \"this bundle's {scheme.name} weights need compute capability {need} or later; this GPU has "
             "$cc: export it with another --quantize\" >&2; exit 2"),
            "fi"]
