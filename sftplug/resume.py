"""Resume a run from a checkpoint: weights here, everything else through on_resume."""

from __future__ import annotations

import torch

from sftplug import checkpoint
from sftplug.errors import SftplugError


def find_checkpoint(out, resume: str):
    if resume != "auto":
        return checkpoint.resolve(resume)
    complete = checkpoint.complete_checkpoints(out)
    return complete[0] if complete else None


def resume_run(run, resume: str) -> None:
    folder = find_checkpoint(run.out, resume)
    if folder is None:
        run.echo("resume: no checkpoint yet, starting fresh")
        return
    manifest = checkpoint.verify(folder)
    weights = checkpoint.load_weights(folder)
    params = dict(run.model.named_parameters())
    own = run.model.state_dict()
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise SftplugError(f"{folder}: the checkpoint lacks trainable weights such as {missing[0]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            if name not in own:
                raise SftplugError(f"{folder}: unexpected weight {name}; was the run started with other settings?")
            own[name].copy_(tensor)
    state = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")
    run.registry.hook.on_resume(run=run, state=state)
    run.echo(f"resume: continuing from {folder} at step {manifest['step']}")
