"""Several processes under torchrun: each rank trains on its share of every micro-batch.

With ``--strategy ddp`` gradients are all-reduced by torch's DistributedDataParallel in
buckets while the backward of an update's last micro-batch still runs; with ``fsdp`` FSDP2
reduce-scatters them. The loss is normalized by the target tokens of the whole update on
all ranks (times the world size, as both average), so N processes with --micro-bsz B
train exactly like one process with --micro-bsz N*B. Rank 0 alone prints, logs,
evaluates and writes the small files of checkpoints (sftplug.checkpoint).

Several nodes: devices go by the local rank, files by the global rank. Whether every
rank's OUT is rank 0's folder (one shared file system) is found with marker files
(:func:`share_out`); where it is not, each node's first process writes the data cache
into its own OUT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from sftplug.errors import SftplugError


@dataclass(frozen=True)
class World:
    rank: int = 0  # among all processes: decides who writes files
    size: int = 1
    local_rank: int = 0  # among this node's processes: decides the GPU
    local_size: int = 1
    node: int = 0  # this node's rank among the nodes (torchrun's GROUP_RANK)
    # Set by share_out: the first node whose OUT is this process's OUT (0: rank 0's), and
    # whether that is so for every process.
    out_node: int = 0
    shared_out: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def writes_cache(self) -> bool:
        """Whether this process fills the data cache of its OUT (one process per folder)."""
        return self.local_rank == 0 and self.out_node == self.node

    @property
    def active(self) -> bool:
        return self.size > 1


def init_world(device_name: str) -> World:
    """Join the process group torchrun describes in the environment, if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    rank = int(os.environ["RANK"])
    world = World(rank, size, int(os.environ.get("LOCAL_RANK", "0")), local_size,
                  int(os.environ.get("GROUP_RANK", rank // local_size)))
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


def share_out(world: World, out: Path) -> World:
    """``world`` with ``out_node`` and ``shared_out`` found: which nodes' OUT is this process's.

    Each node's first process writes a random token into a marker file of that name in its OUT
    (a name never used before, so no file system has it cached); every process then reads the
    nodes' markers in node order, and the first it finds, holding its node's token, names the node
    whose OUT it is. The markers go once all have read. A collective call.
    """
    if not world.active:
        return world
    token = secrets.token_hex(16) if world.local_rank == 0 else None
    tokens = {node: t for node, t in gather(world, (world.node, token)) if t is not None}
    if world.local_rank == 0:
        _write_atomically(_marker(out, token), token)
    barrier(world)
    out_node = next((node for node, t in sorted(tokens.items()) if _read(_marker(out, t)) == t), None)
    seen = gather(world, out_node)
    if world.local_rank == 0:  # every process has read it
        _marker(out, token).unlink(missing_ok=True)
    if None in seen:
        raise SftplugError(f"--out {out}: process {seen.index(None)} does not see the folder its node's first process "
                           "writes; give the processes of one node the same --out")
    return dataclasses.replace(world, out_node=out_node, shared_out=all(node == 0 for node in seen))


def _marker(out: Path, token: str) -> Path:
    return Path(out) / f".sftplug-node-{token}"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


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


def shard(model: torch.nn.Module) -> int:
    """FSDP2: shard each block and the root across ranks (FSDP averages their gradients).

    A block is one group, a LoRA block's frozen base and its fp32 adapters together (FSDP2
    wants one dtype among a group's trainable parameters; a bf16 base is all-gathered with
    them as bytes). A 4-bit base is sharded as its packed bytes, its layers keeping the
    quantization state (sftplug.model.quantize.unwrap_for_sharding); returns those bytes.
    Gradient hooks registered on parameters before (LoRA's block-diagonal B) still hold.
    """
    from torch.distributed.fsdp import fully_shard

    from sftplug.model.quantize import unwrap_for_sharding

    spec = getattr(model, "lora_spec", None)
    if spec is not None and spec.variant == "dora" and getattr(model, "quantized_base", None) is not None:
        raise SftplugError("--strategy fsdp with --quantize and --lora-variant dora: PEFT's DoRA reads the 4-bit "
                           "weight itself, which FSDP holds as plain bytes; use plain LoRA, or --strategy ddp")
    packed = unwrap_for_sharding(model)
    _check_group_dtypes(model)
    hooks = {name: list(p._backward_hooks.values()) for name, p in model.named_parameters()
             if p.requires_grad and p._backward_hooks}
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    for i, block in enumerate(model.layers):
        _carry_gradient_hooks(block, {n[len(f"layers.{i}.") :]: h for n, h in hooks.items()
                                      if n.startswith(f"layers.{i}.")})
    _carry_gradient_hooks(model, {n: h for n, h in hooks.items() if not n.startswith("layers.")})
    return packed


def _check_group_dtypes(model: torch.nn.Module) -> None:
    """FSDP2 before torch 2.8 wants one dtype in a group, frozen parameters included."""
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8):
        return
    if len({p.dtype for p in model.parameters()}) > 1:
        raise SftplugError(f"--strategy fsdp: LoRA on a bf16/fp16 or 4-bit base needs torch 2.8 or newer to shard "
                           f"the base with its fp32 adapters (this is {torch.__version__}); upgrade torch, or use "
                           "--strategy ddp")


def _carry_gradient_hooks(unit: torch.nn.Module, hooks: dict) -> None:
    """FSDP2 swaps each parameter for a sharded DTensor and, while ``unit`` computes, for an
    unsharded Parameter it makes at the first all-gather and reuses; the hooks of the
    original Parameter go onto each unsharded one the first time a forward of ``unit`` sees it
    (FSDP's own pre-forward hook, which unshards, runs first)."""
    if hooks:
        unit.register_forward_pre_hook(functools.partial(_register_hooks, hooks))


def _register_hooks(hooks: dict, unit: torch.nn.Module, args) -> None:
    for name, fns in hooks.items():
        param = unit.get_parameter(name)
        if not getattr(param, "_sftplug_hooks", False):
            for fn in fns:
                param.register_hook(fn)
            param._sftplug_hooks = True


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
def leaders_first(world: World, leading: bool):
    """The ranks ``leading`` run the block first (say, filling a cache); the others then run it too."""
    if not leading:
        barrier(world)
    yield
    if leading:
        barrier(world)


def close(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
