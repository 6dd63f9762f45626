"""FSDP checkpoints: each rank's shards of weights and optimizer state (torch.distributed.checkpoint).

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
    """Every rank writes its own shards of the weights and optimizer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load(model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Each rank reads back its shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # also creates Adam's state to fill
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


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
