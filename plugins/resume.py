"""Built-in resume plugin: step, tokens, data position, optimizer, schedule and RNG."""

from __future__ import annotations

import random

import torch

from sftplug import hookimpl


class Resume:
    @hookimpl
    def resume_state(self, run):
        return {
            "trainer": {
                "step": run.step,
                "tokens_seen": run.tokens_seen,
                "data": run.batches.state(),
                "total_steps": run.schedule.total,
            },
            "optimizer": run.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
        }

    @hookimpl
    def on_resume(self, run, state):
        trainer = state["trainer"]
        run.step, run.tokens_seen = int(trainer["step"]), int(trainer["tokens_seen"])
        run.batches.restore(trainer["data"])
        run.optimizer.load_state_dict(state["optimizer"])
        if int(trainer["total_steps"]) != run.config.steps:
            saved = run.schedule.__class__(**{**run.schedule.__dict__, "total": int(trainer["total_steps"])})
            run.schedule = saved.resized(run.config.steps, run.step)
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate((3, tuple(state["rng"]["python"]), None))


resume = Resume()
