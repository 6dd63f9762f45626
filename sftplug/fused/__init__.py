"""Fused ops beside attention: RMSNorm, the gated MLP, RoPE and the loss (see op.py)."""

from sftplug.fused.op import OPS, FusedOp, FusedOpsRequest, OpSet
from sftplug.offers import Priority

__all__ = ["OPS", "FusedOp", "FusedOpsRequest", "OpSet", "Priority"]
