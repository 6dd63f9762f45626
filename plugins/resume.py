"""Built-in resume plugin: step, tokens, data position, optimizer, schedule and RNG."""

from __future__ import annotations

import random

import numpy as np
import torch

from sftplug import distributed, hookimpl
from sftplug.errors import SftplugError


class Resume:
    @hookimpl
    def resume_state(self, run):
        np_state = np.random.get_state()
        rng = {
            "torch": torch.get_rng_state(),
            "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "trainer": {
                "step": run.step,
                "tokens_seen": run.tokens_seen,
                "data": run.batches.state(),
                "schedule": run.schedule.state(),
            },
            # a sharded run saves its optimizer state with the weight shards
            "optimizer": None if run.sharded else run.optimizer.state_dict(),
            "rng": distributed.gather(run.world, rng),  # one entry per rank: dropout differs by rank
        }

    @hookimpl
    def on_resume(self, run, state):
        if len(state["rng"]) != run.world.size:
            raise SftplugError(
                f"the checkpoint was saved by {len(state['rng'])} process(es); resume it with the same number "
                f"(torchrun's --nnodes times --nproc-per-node: {len(state['rng'])}), not {run.world.size}"
            )
        trainer, rng = state["trainer"], state["rng"][run.world.rank]
        run.step, run.tokens_seen = int(trainer["step"]), int(trainer["tokens_seen"])
        run.batches.restore(trainer["data"])
        if state["optimizer"] is not None:
            run.optimizer.load_state_dict(state["optimizer"])
        # The schedule as it was saved, then stretched or shrunk to the new --steps.
        run.schedule = run.schedule.restored(trainer["schedule"], run.config.steps, run.step)
        torch.set_rng_state(rng["torch"])
        random.setstate((3, tuple(rng["python"].tolist()), None))
        np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


resume = Resume()
