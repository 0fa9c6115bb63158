"""Weight-only quantization schemes of a bundle and what each needs of a TensorRT target."""
from __future__ import annotations

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
#: its Myelin compiler for both forms (docs/design.md §10).
SCHEMES: dict[str, Scheme] = {
    "int8": Scheme("int8", 8, 0, "INT8", 13, 80),
    "int4": Scheme("int4", 4, 128, "INT4", 21, 80),
    # ModelOpt's INT4_AWQ_CFG: int4 blocks of 128 with activation-aware scales from a calibration set
    "int4-awq": Scheme("int4-awq", 4, 128, "INT4", 21, 80, "awq-full"),
}
NONE = "none"


def get_scheme(name: str | None) -> Scheme | None:
    """The scheme called ``name`` (None or "none": no quantization); FastVError naming the choices otherwise."""
    if name is None or name == NONE:
        return None
    if name not in SCHEMES:
        raise FastVError(f"unknown quantization scheme {name!r}; choose one of {', '.join([NONE, *SCHEMES])} "
                         "(weight-only; fp8 is not available yet)")
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
            raise FastVError(f"a bundle with {scheme.name} weights cannot be built for {cc}: TensorRT-RTX builds "
                             f"quantized weights for SM{scheme.min_sm} and later; drop {cc} from "
                             "--compute-capability or export without --quantize")
