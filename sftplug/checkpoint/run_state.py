"""Saving and restoring a training run: one symmetric pair, as torchtune's
``save_checkpoint`` / ``load_checkpoint``.

:func:`save_checkpoint` writes OUT/checkpoints/step-N/ with the trainable weights (or,
sharded, every rank's shards of the trainable weights and their optimizer state: a LoRA's
adapter, never the frozen base), every plugin's ``resume_state`` in ``state.pt``, and the
manifest. :func:`load_checkpoint` reads the
same back in the same order and hands ``state.pt`` to every plugin's ``on_resume``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from sftplug import distributed
from sftplug.checkpoint import folders, shards
from sftplug.config import flag
from sftplug.errors import SftplugError
from sftplug.hf.names import load_state_dict_exact
from sftplug.model.lora import lora_settings, shared_a_layout, trainable_state_dict
from sftplug.model.lora_targets import EXPERTS_TARGETS, LINEAR_ATTENTION_TARGETS, hf_targets

# Settings a resumed run must share with the checkpoint: they define the model or the data.
FROZEN = ("model", "full", "lora_r", "lora_alpha", "lora_targets", "lora_variant", "rslora", "data", "field_map",
          "seq_len", "pack", "seed", "micro_bsz", "strategy", "quantize", "double_quant", "optimizer", "train_router")
# what a checkpoint saved before these settings existed ran
ADDED_LATER = {"lora_variant": "lora", "rslora": False, "quantize": "none", "double_quant": True, "optimizer": "adamw",
               "train_router": False}


def save_checkpoint(run) -> Path:
    """Write step-<run.step> atomically, then prune old ones; a collective call under torchrun."""
    state = plugin_state(run)  # every rank's part already: the hooks gather it
    meta = manifest_fields(run)
    if run.sharded:  # each rank writes its own shards; rank 0 the small files, once all are written
        if run.world.is_main:
            folders.begin(run.out, run.step)
        distributed.barrier(run.world)
        staging = folders.staging(run.out, run.step)
        shards.save(run.model, run.optimizer, staging / folders.SHARDS)
        distributed.barrier(run.world)
        if run.world.is_main:
            torch.save(state, staging / folders.STATE)
            folders.commit(run.out, run.step, meta)
    elif run.world.is_main:
        weights = {k: v.contiguous() for k, v in trainable_state_dict(run.model).items()}
        folders.write_checkpoint(run.out, run.step, meta, {
            folders.WEIGHTS: lambda path: save_file(weights, str(path)),
            folders.STATE: lambda path: torch.save(state, path),
        })  # fmt: skip
    if run.world.is_main:
        folders.prune(run.out, run.config.keep_last)
    distributed.barrier(run.world)
    return folders.step_folder(run.out, run.step)


def load_checkpoint(run, folder: Path) -> None:
    """Restore ``run`` from a complete checkpoint: weights (or shards), then every plugin's part."""
    check_resumable(folder, run.config, getattr(run.data.stats, "data_sha256", None))
    if run.sharded:  # weights and optimizer state, each rank its own shards
        if not (folder / folders.SHARDS).is_dir():
            raise SftplugError(f"{folder} holds no weight shards ({folders.SHARDS}/); it cannot resume an FSDP run")
        shards.load(run.model, run.optimizer, folder / folders.SHARDS)
    else:
        trainable = [n for n, p in run.model.named_parameters() if p.requires_grad]
        weights = folders.load_weights(folder)
        load_state_dict_exact(run.model, weights, str(folder / folders.WEIGHTS), expected=trainable)
    state = torch.load(folder / folders.STATE, weights_only=True, map_location="cpu")
    run.registry.hook.on_resume(run=run, state=state)
    run.tokens_at_start = run.tokens_seen
    if run.world.is_main:
        _truncate_metrics(run.metrics_path, run.step)


def check_resumable(folder: Path, config, data_sha256: str | None = None) -> dict:
    """The manifest of a checkpoint ``config`` can resume from, or one line saying why it cannot
    (without ``data_sha256``, the data is checked when the run has read it)."""
    manifest = folders.verify(folder)
    lora = manifest.get("lora")
    if lora and shared_a_layout(lora):
        raise SftplugError(
            f"{folder} was trained by an earlier sftplug whose LoRA shares one A across q/k/v and gate/up; it "
            f"cannot resume as per-projection LoRA: export it (sftplug export {folder} --out DIR --adapter) "
            "and continue with --adapter DIR/adapter"
        )
    layer_types = (manifest.get("model_config") or {}).get("layer_types") or []
    absent = () if any(t.get("feed_forward") == "experts" for t in layer_types) else EXPERTS_TARGETS
    if not any(t.get("mixer") == "linear_attention" for t in layer_types):
        absent += LINEAR_ATTENTION_TARGETS
    check_settings(manifest["config"], config.to_dict(), manifest.get("data_sha256"), data_sha256, folder, absent)
    return manifest


def resume_folder(spec: str, out: Path) -> Path | None:
    """The checkpoint ``--resume spec`` names: for `auto` the newest complete one of ``out`` (None
    when there is none yet), else the folder given, which must exist."""
    if spec == "auto":
        return next(iter(folders.complete_checkpoints(out)), None)
    folder = folders.resolve(spec)
    if not folder.is_dir():
        raise SftplugError(f"--resume {spec}: no such checkpoint folder; give auto or a checkpoint folder "
                           "(a run folder, or its checkpoints/step-N)")
    return folder


def resume(run, spec: str) -> None:
    """``--resume``: `auto` takes the newest complete checkpoint of the run, else the folder named."""
    folder = resume_folder(spec, run.out)
    if folder is None:
        run.echo("resume: no complete checkpoint yet, starting from step 0")
        if run.world.is_main:  # the metrics of updates the run before did not save are redone,
            _truncate_metrics(run.metrics_path, -1)  # and step 0's held-out loss is measured again
        return
    load_checkpoint(run, folder)
    run.echo(f"resume: continuing from {folder} at step {run.step}")


def plugin_state(run) -> dict:
    """Every plugin's ``resume_state``, merged (namespaces are unique across plugins)."""
    state: dict = {}
    for part in run.registry.hook.resume_state(run=run):
        if part:
            state.update(part)
    return state


def manifest_fields(run) -> dict:
    """What run.json records besides the file list: enough to load the model back alone."""
    model_path = Path(run.config.model)
    return {
        "base_model": str(model_path.resolve()) if model_path.exists() else run.config.model,
        "model_config": run.model.config.to_dict(),
        "lora": lora_settings(run.model),
        "config": run.config.to_dict(),
        "tokens_seen": run.tokens_seen,
        "data_sha256": getattr(run.data.stats, "data_sha256", None),
    }


def check_settings(saved: dict, current: dict, saved_sha256, current_sha256, folder, absent=()) -> None:
    """Refuse a resume whose frozen settings differ from the checkpoint's; ``absent``: LoRA targets its model
    does not have (the default gained the experts' and linear attention's: they mean nothing to it)."""
    for key in FROZEN:
        old, new = saved.get(key, ADDED_LATER.get(key)), current.get(key)
        if key == "lora_targets" and not current.get("full"):  # aliases (qkv) and HF names compare as HF names
            old, new = hf_targets(old), hf_targets(new)
            old, new = (tuple(t for t in names if t not in absent) for names in (old, new))
        if isinstance(old, list):
            old = list(old)
            new = list(new)
        if old != new:
            raise SftplugError(
                f"{flag(key)} is {new!r} but {folder} was trained with {old!r}; it cannot change on resume"
            )
    if saved_sha256 and current_sha256 and saved_sha256 != current_sha256:
        raise SftplugError(
            f"--data {current['data']}: the file changed since {folder} was saved; it cannot change on resume"
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics of updates after the checkpoint: they are about to be redone."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
