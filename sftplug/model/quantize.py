"""QLoRA: the frozen base's block weights kept in 4-bit through bitsandbytes (``--quantize``)."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("nf4", "fp4")


@dataclass(frozen=True)
class QuantSpec:
    """How the base is quantised: the 4-bit data type and whether the block scales are quantised too."""

    kind: str  # nf4 or fp4
    double_quant: bool = True


def quant_spec(kind: str, double_quant: bool = True) -> QuantSpec | None:
    """``--quantize KIND`` as a spec; None for "none"."""
    return None if kind == "none" else QuantSpec(kind, double_quant)
