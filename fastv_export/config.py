"""FastV configuration: pruning layer K, drop ratio R (exact rational) or an absolute keep count."""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

from fastv_export.errors import FastVError
from fastv_export.graphs import op  # pure Python: the op's constants and integer rules
from fastv_export.graphs.op import RANKINGS, SEED_LIMIT

Ranking = Literal["last", "mean", "random"]


def parse_ratio(value: float | int | str | Fraction) -> Fraction:
    """Parse R as an exact rational: 0.5, "1/2", "50%", Fraction(1, 2). Floats are read as their
    shortest decimal (0.9 -> 9/10), never as their binary expansion."""
    try:
        if isinstance(value, Fraction):
            r = value
        elif isinstance(value, bool):
            raise TypeError
        elif isinstance(value, (int, float)):
            r = Fraction(repr(float(value)))
        elif isinstance(value, str):
            text = value.strip()
            r = Fraction(text[:-1]) / 100 if text.endswith("%") else Fraction(text)
        else:
            raise TypeError
    except (TypeError, ValueError, ZeroDivisionError):
        raise FastVError(f"R must be a number in [0, 1) such as 0.5, '1/2' or '50%', got {value!r}") from None
    if not (0 <= r < 1):
        raise FastVError(f"R must lie in [0, 1) (it is the fraction of image tokens dropped), got {value!r}")
    return r


@dataclass(frozen=True)
class FastVConfig:
    """What FastV does: at layer ``k`` drop ``ratio`` of the image tokens (or keep ``keep`` of them),
    ranked by the attention they receive in layer k-1 (``ranking``).

    - ``k``: 0 <= k < number of decoder layers; k = 0 prunes before the first layer (random only).
    - ``ratio``: float, Fraction or string ("1/2", "50%"); dropped = floor(M * p / q).
    - ``keep``: absolute number of image tokens to keep instead of a ratio.
    - ``ranking``: "last" (last prompt token's attention row, as the authors' code), "mean"
      (attention received averaged over all prompt rows, the paper's wording) or "random" (seeded).
    """

    k: int = 2
    ratio: Fraction | float | str | None = None
    keep: int | None = None
    ranking: Ranking = "last"
    seed: int = 0
    r: Fraction = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise FastVError(f"K must be an integer >= 0 (the layer at which tokens are pruned), got {self.k!r}")
        if self.ranking not in RANKINGS:
            raise FastVError(f"ranking must be one of {', '.join(RANKINGS)}, got {self.ranking!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise FastVError(f"seed must be an integer in [0, 2^31) (the seeded ranking's hash takes that range), "
                             f"got {self.seed!r}")
        if self.keep is not None and self.ratio is not None:
            raise FastVError("give either ratio (R) or keep (an absolute image-token count), not both")
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0:
                raise FastVError(f"keep must be an integer >= 0 (image tokens kept), got {self.keep!r}")
            r = Fraction(0)
        else:
            r = parse_ratio(0.5 if self.ratio is None else self.ratio)
            if r.denominator > op.RATIO_DEN_LIMIT:
                raise FastVError(
                    f"R={self.ratio!r} is {r} as an exact fraction, whose denominator {r.denominator} exceeds "
                    f"2^31 - 1, the largest the TokenSelect plugin accepts (an int32 attribute); give R with a "
                    f"smaller denominator, "
                    f"e.g. {r.limit_denominator(op.RATIO_DEN_LIMIT)} (the nearest such fraction) or fewer decimals")
            object.__setattr__(self, "ratio", r)
        object.__setattr__(self, "r", r)
        if self.k == 0 and self.ranking != "random" and not self.is_identity:
            raise FastVError("K = 0 prunes before the first layer, where no attention exists yet: "
                             "use ranking='random' or K >= 1")

    @property
    def is_identity(self) -> bool:
        """True when nothing can ever be dropped (R = 0)."""
        return self.keep is None and self.r == 0

    def keep_count(self, m: int) -> int:
        """Image tokens kept out of ``m`` candidates: m - floor(m*p/q), or the absolute keep count
        (the rule of ``fastv_export.graphs.op.keep_count``)."""
        if self.keep is not None:
            if self.keep > m:
                raise FastVError(f"keep={self.keep} is more than the {m} image tokens of the prompt; "
                                 f"use keep <= {m} or a ratio")
            return op.keep_count(m, 0, 1, self.keep)
        return op.keep_count(m, self.r.numerator, self.r.denominator)

    def check_layers(self, num_layers: int) -> None:
        if self.k >= num_layers:
            raise FastVError(f"K={self.k} is out of range: the model has {num_layers} decoder layers, "
                             f"so K must be in [0, {num_layers - 1}]")

    def describe(self) -> str:
        what = f"keep={self.keep}" if self.keep is not None else f"R={self.r}"
        return f"K={self.k} {what} ranking={self.ranking}" + (f" seed={self.seed}" if self.ranking == "random" else "")

    # ---- the manifest's "fastv" section ------------------------------------------------------
    def to_manifest(self) -> dict:
        """The manifest's ``fastv`` section (R as "p/q" and as its integers, the keep rule in words)."""
        return {"k": self.k, "ratio": f"{self.r.numerator}/{self.r.denominator}", "ratio_num": self.r.numerator,
                "ratio_den": self.r.denominator, "keep": self.keep, "ranking": self.ranking, "seed": self.seed,
                "keep_rule": "keep(M) = M - floor(M*ratio_num/ratio_den) if keep is null else min(keep, M)"}

    @classmethod
    def from_manifest(cls, section: dict) -> "FastVConfig":
        """The config a manifest's ``fastv`` section describes (inverse of :meth:`to_manifest`)."""
        try:
            keep = section["keep"]
            return cls(k=section["k"], ratio=None if keep is not None else section["ratio"], keep=keep,
                       ranking=section["ranking"], seed=section["seed"])
        except KeyError as exc:
            raise FastVError(f"manifest field 'fastv.{exc.args[0]}' is missing; re-export the bundle") from None
