"""Run alone or under torchrun: the loss and gradients of a run's first update, before the optimizer.

    python first_update.py OUT DATA RESULT [sftplug train options...]

Rank 0 saves {"loss", "grads"} to RESULT (full tensors, also for FSDP shards). Gradients
are not clipped (--max-grad-norm 0), so they are exactly what the loss gives.
"""

import sys

import torch

from sftplug import distributed
from sftplug.config import TrainConfig
from sftplug.registry import build_registry
from sftplug.train.setup import build_run


def main(out, data, result, *options):
    settings = dict(out=out, data=data, steps=1, seq_len=64, accum=2, max_grad_norm=0.0, eval_data=None)
    for key, value in zip(options[::2], options[1::2]):
        settings[key.removeprefix("--").replace("-", "_")] = value
    settings.update(micro_bsz=int(settings.get("micro_bsz", 8)), accum=int(settings["accum"]),
                    full=settings.get("full") == "1")
    run = build_run(TrainConfig(**settings), build_registry(entrypoints=False), echo=lambda *a: None)
    grads = {}

    def record():  # in place of the optimizer step: every rank takes part in gathering shards
        for name, p in run.model.named_parameters():
            if p.requires_grad:
                grads[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()

    run.optimizer.step = record
    loss = run.update()["loss"]
    if run.world.is_main:
        torch.save({"loss": loss, "grads": grads}, result)
    distributed.close(run.world)


if __name__ == "__main__":
    main(*sys.argv[1:])
