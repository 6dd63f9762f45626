"""Several processes under torchrun: each rank trains on its share of every micro-batch.

With ``--strategy ddp`` gradients are all-reduced by torch's DistributedDataParallel in
buckets while the backward of an update's last micro-batch still runs; with ``fsdp`` FSDP2
reduce-scatters them. The loss is normalised by the target tokens of the whole update on
all ranks (times the world size, as both average), so N processes with --micro-bsz B
train exactly like one process with --micro-bsz N*B. Rank 0 alone prints, logs,
evaluates and writes the small files of checkpoints (sftplug.checkpoint).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sftplug.errors import SftplugError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def init_world(device_name: str) -> World:
    """Join the process group torchrun describes in the environment, if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if use_cuda:
        gpus = torch.cuda.device_count()
        if world.local_rank >= gpus:
            raise SftplugError(
                f"local rank {world.local_rank} has no GPU of its own (this machine has {gpus}); "
                f"start at most {gpus} processes per machine"
            )
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return world


def sum_tensor_(world: World, t: torch.Tensor) -> torch.Tensor:
    if world.active:
        dist.all_reduce(t)
    return t


def replicate(model: torch.nn.Module, world: World):
    """A DDP view of ``model`` for training forwards; ``model`` itself stays the plain module."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    # RoPE tables are computed alike on every rank: no buffer broadcast in each forward
    # (the option was renamed in newer torch)
    option = "forward_sync_buffers"
    if option not in inspect.signature(DistributedDataParallel.__init__).parameters:
        option = "broadcast_buffers"
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        **{option: False},
        gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no second copy
    )


def gradient_sync(replicated, enabled: bool):
    """Inside, DDP skips its all-reduce (gradients only accumulate), unless ``enabled``."""
    if replicated is None or enabled:
        return contextlib.nullcontext()
    return replicated.no_sync()


def shard(model: torch.nn.Module) -> None:
    """FSDP2: shard each block and the root across ranks (FSDP averages their gradients)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def gather(world: World, obj):
    """Every rank's ``obj`` as a list on every rank (a list of one without torchrun)."""
    if not world.active:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


@contextlib.contextmanager
def main_first(world: World):
    """Rank 0 runs the block first (say, filling a cache); the other ranks then run it too."""
    if not world.is_main:
        barrier(world)
    yield
    if world.is_main:
        barrier(world)


def close(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
