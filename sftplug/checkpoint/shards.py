"""FSDP checkpoints: each rank's shards of the trainable weights and optimizer state
(torch.distributed.checkpoint); a LoRA run's shards hold the adapter alone.

:func:`save` and :func:`load` are collective calls in a sharded run (the world size must
be the one that saved); :func:`read_full_weights` reassembles full tensors in one process
with no process group, so export and generate read a sharded checkpoint like any other.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from sftplug.errors import SftplugError


def save(model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Every rank writes its own shards of the trainable weights and their optimizer state."""
    import torch.distributed.checkpoint as dcp

    model_state, optimizer_state = _state(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load(model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Each rank reads back its shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_state, optimizer_state = _state(model, optimizer)  # also creates Adam's state to fill
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_options(strict=False))  # the frozen base is not in it: it came from --model


def _options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # the frozen base (LoRA) is neither gathered nor written
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def _state(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """The sharded state dicts a checkpoint holds: the trainable weights (LoRA: the adapter, named
    as an unsharded run saves it) and the optimizer's state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options())
    if any(not p.requires_grad for p in model.parameters()):  # nor what a 4-bit base adds to its state dict
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        model_state = {name: t for name, t in model_state.items() if name in trainable}
    return model_state, optimizer_state


def read_full_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a shards folder as full tensors, read in this one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        reader = dcp.FileSystemReader(str(folder))
        entries = reader.read_metadata().state_dict_metadata
        weights = {
            key[len("model.") :]: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in entries.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
        }
        with warnings.catch_warnings():  # "no process group: loading in a single process" is the point here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": weights}, storage_reader=reader, no_dist=True)
    except Exception as exc:  # DCP reports damage as assorted exception types
        raise SftplugError(f"{folder}: the sharded weights cannot be read ({exc}); the checkpoint is corrupt") from None
    return weights
