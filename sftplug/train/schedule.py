"""Learning rate as a pure function of the update index: nothing to pickle, nothing to drift.

A run resumed with a different number of steps continues from the learning rate it had
(the anchor) and decays over the remaining steps to the same end value: no jump, no
second warmup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Schedule:
    kind: str  # cosine | linear | constant
    peak: float
    warmup: int
    total: int
    end_ratio: float = 0.1
    anchor_step: int = 0  # set when resumed with a new length
    anchor_lr: float | None = None

    @property
    def end(self) -> float:
        return self.peak if self.kind == "constant" else self.peak * self.end_ratio

    def _shape(self, progress: float) -> float:
        progress = min(max(progress, 0.0), 1.0)
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "linear":
            return 1 - progress
        return 1.0

    def lr(self, step: int) -> float:
        """The learning rate of update ``step`` (0-based)."""
        if self.anchor_lr is not None and step >= self.anchor_step:
            progress = (step - self.anchor_step) / max(1, self.total - self.anchor_step)
            return self.end + (self.anchor_lr - self.end) * self._shape(progress)
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.end + (self.peak - self.end) * self._shape(progress)

    def resized(self, total: int, at_step: int) -> "Schedule":
        """This schedule continued from ``at_step`` but ending at ``total`` steps."""
        if total == self.total or at_step < self.warmup:
            return replace(self, total=total)
        return replace(self, total=total, anchor_step=at_step, anchor_lr=self.lr(at_step))

    def state(self) -> dict:
        """What a checkpoint keeps (the kind, peak and warmup come from the run's settings)."""
        return {"total": self.total, "anchor_step": self.anchor_step, "anchor_lr": self.anchor_lr}

    def restored(self, state: dict, total: int, at_step: int) -> "Schedule":
        """The schedule :meth:`state` saved, continued from ``at_step`` to ``total`` steps."""
        saved = replace(self, total=int(state["total"]), anchor_step=int(state["anchor_step"]),
                        anchor_lr=state["anchor_lr"])
        return saved.resized(total, at_step)
