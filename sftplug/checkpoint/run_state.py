"""Resume a run from a checkpoint: weights here, everything else through on_resume."""

from __future__ import annotations

import json

import torch

from sftplug.checkpoint import folders as checkpoint
from sftplug.train import distributed
from sftplug.errors import SftplugError
from sftplug.hf.names import load_state_dict_exact

# Settings a resumed run must share with the checkpoint: they define the model or the data.
FROZEN = ("model", "full", "lora_r", "lora_alpha", "lora_targets", "data", "seq_len", "pack", "seed", "micro_bsz",
          "strategy")


def find_checkpoint(out, resume: str):
    """The checkpoint to resume: `auto` takes the newest complete one of this run."""
    if resume != "auto":
        return checkpoint.resolve(resume)
    complete = checkpoint.complete_checkpoints(out)
    return complete[0] if complete else None


def check_settings(saved: dict, current: dict, saved_sha256, current_sha256, folder) -> None:
    for key in FROZEN:
        old, new = saved.get(key), current.get(key)
        if isinstance(old, list):
            old = list(old)
            new = list(new)
        if old != new:
            flag = "--" + key.replace("_", "-")
            raise SftplugError(f"{flag} is {new!r} but {folder} was trained with {old!r}; it cannot change on resume")
    if saved_sha256 and current_sha256 and saved_sha256 != current_sha256:
        raise SftplugError(
            f"--data {current['data']}: the file changed since {folder} was saved; it cannot change on resume"
        )


def resume_run(run, resume: str) -> None:
    folder = find_checkpoint(run.out, resume)
    if folder is None:
        run.echo("resume: no complete checkpoint yet, starting from step 0")
        return
    manifest = checkpoint.verify(folder)
    check_settings(manifest["config"], run.config.to_dict(), manifest.get("data_sha256"), run.data_sha256, folder)
    if run.sharded:  # weights and optimizer state, each rank its own shards
        if not (folder / checkpoint.SHARDS).is_dir():
            raise SftplugError(f"{folder} holds no weight shards ({checkpoint.SHARDS}/); it cannot resume an FSDP run")
        distributed.load_shards(run.model, run.optimizer, folder / checkpoint.SHARDS)
    else:
        weights = checkpoint.load_weights(folder)
        trainable = [n for n, p in run.model.named_parameters() if p.requires_grad]
        load_state_dict_exact(run.model, weights, str(folder / checkpoint.WEIGHTS), expected=trainable)
    state = torch.load(folder / "state.pt", weights_only=True, map_location="cpu")
    run.registry.hook.on_resume(run=run, state=state)
    run.tokens_at_start = run.tokens_seen
    if run.world.is_main:
        _truncate_metrics(run.metrics_path, run.step)
    run.echo(f"resume: continuing from {folder} at step {run.step}")


def _truncate_metrics(path, step: int) -> None:
    """Drop metrics of updates after the checkpoint: they are about to be redone."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
