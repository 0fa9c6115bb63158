"""``fastv::TokenSelect``: the op's constants and integer rules, in one place (pure Python).

Everything that the PyTorch reference, the ONNX function body, the op schema, the manifest and
the C++ plugin must agree on is defined here once; the plugin's copies in
``plugins/include/fastv/token_select_math.h`` and ``plugins/src/token_select_plugin.h`` are
checked against this module by ``tests/test_op_constants.py``. The contract in words:
``docs/token_select.md``.
"""
from __future__ import annotations

import numbers

# ---- identity: ONNX node and TensorRT plugin -------------------------------------------------
OP_DOMAIN = "fastv"
OP_TYPE = "TokenSelect"
OP_VERSION = 1
PLUGIN_NAME = OP_TYPE
PLUGIN_NAMESPACE = "fastv"
PLUGIN_VERSION = "1"
PLUGIN_LIBRARY = "libfastv_plugins.so"
#: the identity as the manifest records it
PLUGIN_IDENTITY = {"name": PLUGIN_NAME, "version": PLUGIN_VERSION, "namespace": PLUGIN_NAMESPACE,
                   "onnx_domain": OP_DOMAIN, "library": PLUGIN_LIBRARY}
#: the lowest ONNX opset the function body is written for
MIN_OPSET = 18

# ---- rankings ---------------------------------------------------------------------------------
#: "last": the last prompt token's attention row (the authors' code); "mean": attention received,
#: summed over all prompt rows and divided by their number (the paper's wording); "random": seeded
RANKINGS: tuple[str, ...] = ("last", "mean", "random")

# ---- the seeded "random" ranking: an integer hash of (seed, position) --------------------------
# h1 = (p*A + seed*B + C) mod P; h2 = (h1*h1 + D) mod P; score = floor(h2 / 128) * 2^-24 (exact in
# float32: h2 < 2^31, so floor(h2/128) < 2^24)
HASH_PRIME = 2147483647  # 2^31 - 1
HASH_A, HASH_B, HASH_C, HASH_D = 48271, 69621, 12345, 1013904223
HASH_SHIFT = 128
#: score = random_score_int(position, seed) * RANDOM_SCORE_SCALE, a float32 in [0, 1)
RANDOM_SCORE_SCALE = 2.0**-24
SEED_LIMIT = 2**31

# ---- the drop ratio R = ratio_num / ratio_den, an exact rational --------------------------------
#: the largest ratio_den (and so ratio_num + 1): int32, because TensorRT's ONNX parser hands integer node
#: attributes to plugins as int32 (2^31 would arrive as -2^31); the plugin refuses larger denominators
RATIO_DEN_LIMIT = 2**31 - 1


def keep_count(m: int, ratio_num: int, ratio_den: int, keep: int = -1) -> int:
    """Image tokens kept out of ``m`` candidates: ``m - floor(m * ratio_num / ratio_den)`` (integer
    arithmetic; a ceiling of m*(1-R)), or ``min(keep, m)`` when an absolute ``keep >= 0`` is given."""
    if keep >= 0:
        return min(keep, m)
    return m - (m * ratio_num) // ratio_den


def kept_length(n: int, m: int, ratio_num: int, ratio_den: int, keep: int = -1) -> int:
    """TokenSelect's output length from input SHAPES only: ``n - m + keep(m)``."""
    return n - m + keep_count(m, ratio_num, ratio_den, keep)


def random_score_int(position: int, seed: int) -> int:
    """The integer part of the seeded score of ``position`` (score = result * 2^-24)."""
    h1 = (position * HASH_A + seed * HASH_B + HASH_C) % HASH_PRIME
    h2 = (h1 * h1 + HASH_D) % HASH_PRIME
    return h2 // HASH_SHIFT


def check_attributes(*, ranking: str, ratio_num: int, ratio_den: int, keep: int, seed: int) -> None:
    """Raise ValueError naming the first attribute outside what every implementation accepts."""
    for label, v in (("ratio_num", ratio_num), ("ratio_den", ratio_den), ("keep", keep), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{label} must be an integer, got {v!r}")
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
    if not 0 < ratio_den <= RATIO_DEN_LIMIT:
        raise ValueError(f"ratio_den must be in [1, 2^31 - 1] (an int32: TensorRT passes node attributes to the "
                         f"plugin as int32), got {ratio_den}")
    if not 0 <= ratio_num < ratio_den:
        raise ValueError(f"ratio_num must satisfy 0 <= ratio_num < ratio_den, got {ratio_num}/{ratio_den}")
    if keep < -1:
        raise ValueError(f"keep must be -1 (use the ratio) or >= 0, got {keep}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2^31), got {seed}")
