"""The adapter options of LyCORIS's output-side methods (diag-OFT and BOFT), declared once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from .options import AdapterOptions, Invalid, Owner, boolean, divisors, nearest, option
from .output_rotation import lycoris_block_split, lycoris_butterfly_split

# LyCORIS's names of the two methods (its ``algo``).
LYCORIS_ALGOS = ("diag-oft", "boft")


def _algo(value: Any) -> Any:
    return value if value in LYCORIS_ALGOS else Invalid(f"must be one of {LYCORIS_ALGOS}")


def _requested_size(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value >= 2):
        return Invalid("must be an integer >= 2, or -1 (as square blocks as the size allows)")
    return value


def _non_negative(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        return Invalid("must be a number >= 0 (0: no constraint)")
    return float(value)


@dataclass(frozen=True)
class LycorisOptions(AdapterOptions):
    """diag-OFT (``algo="diag-oft"``) or BOFT (``"boft"``) on a layer's output features, as LyCORIS has them.

    ``block_size`` is LyCORIS's ``lora_dim``: the block size asked for, from which the layer's own is
    chosen as LyCORIS chooses it (after ``resolve`` it holds that size). ``constraint`` limits the
    Frobenius norm of all skew blocks to ``constraint * out_features`` (0: no limit); ``rescaled`` adds a
    trained scale per output feature. ``init_weights=False`` starts away from the identity (for tests).
    """

    peft_type: ClassVar[str] = "LYCORIS"
    size_pair: ClassVar[tuple[str, str] | None] = None

    algo: str = option("diag-oft", _algo)
    block_size: int = option(32, _requested_size)
    constraint: float = option(0.0, _non_negative)
    rescaled: bool = option(False, boolean)
    init_weights: bool = option(True, boolean)

    def check_without_layer(self, owner: Owner) -> None:
        if self.algo == "boft" and self.block_size % 2 == 1:
            raise owner.error("block_size", self.block_size, "must be even (or -1) for BOFT")

    def resolve(self, label: str, dim: int, dim_text: str) -> LycorisOptions:
        if self.algo == "diag-oft":
            size, _ = lycoris_block_split(dim, self.block_size)
            if size < 2:
                valid = [d for d in divisors(dim) if 2 <= d <= dim // d]
                raise _no_split(label, self, dim_text, "no block size of at least 2 divides it", valid)
            return dataclasses.replace(self, block_size=size)
        split = lycoris_butterfly_split(dim, self.block_size)
        if split is None:
            valid = [d for d in divisors(dim) if d % 2 == 0 and (dim // d).bit_count() == 1]
            rule = "BOFT needs an even block size b <= block_size with a power of two blocks (out / b)"
            raise _no_split(label, self, dim_text, rule, valid)
        return dataclasses.replace(self, block_size=split[0])


def _no_split(label: str, options: LycorisOptions, dim_text: str, rule: str, valid: list[int]) -> ValueError:
    hint = (
        f"block_size values that work: {', '.join(map(str, nearest(valid, options.block_size)))}"
        if valid
        else "no block size works; exclude the layer (exclude_modules)"
    )
    return ValueError(
        f"{label}: {options.algo} with block_size={options.block_size} cannot split {dim_text}: "
        f"{rule}; {hint}"
    )
