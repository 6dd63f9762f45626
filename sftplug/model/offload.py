"""Activation offloading (--offload-activations): each block's saved activations wait in CPU memory.

Autograd keeps the tensors each operation saves for backward alive until backward; with
``torch.autograd.graph.saved_tensors_hooks`` around each transformer block, what a block
saves is copied to pinned CPU memory during forward and back to the device when backward
needs it. The arithmetic is unchanged: only copies, with the exact layout of each tensor
(its whole storage is copied once, and every saved view is rebuilt on it), so gradients
are bitwise those of a run without offloading.

What is not moved:

- the model's own weights (parameters, views of them, their autocast copies): moving frozen
  weights would only add traffic, and the weights stay on the device anyway;
- tiny tensors (under ``MIN_BYTES``), whose copies cost more in launches than they free;
- the tensors every block shares (RoPE's cos and sin, the document ids), computed once;
- the last block's activations: backward needs them first, so a round trip would only stall it.

With --grad-ckpt (non-reentrant checkpointing per block) what a block keeps between forward
and backward is its input, which checkpoint saves under these hooks: that input is offloaded.
The recomputation in backward runs under checkpoint's own hooks, so it is never offloaded again.

On a CUDA device the copies run on a side stream:

- forward: each device-to-host copy waits for the compute that produced the tensor and then
  overlaps the next blocks' compute; ``record_stream`` keeps the device memory from being reused
  until the copy has read it. Before block i starts, the compute stream waits for block i - 2's
  copies, so the forward never runs more than two blocks ahead of its copies;
- backward: the first use of block i's tensors brings block i back (if it is not back already)
  and starts bringing block i - 1 back on the side stream (prefetch); compute waits on each
  tensor's copy event before it reads it. A block's device copies are freed when autograd
  releases the last of its saved tensors.

Blocks' saved activations on the device at once, with offloading on a GPU: at most two in
steady state, forward (the block being computed, and the previous one whose copies are under
way) and backward (the block in use, and the next one being prefetched), plus the last block's,
which stays and is the block in use when backward begins; three briefly at a hand-over, while
the block just finished is released. With --grad-ckpt "activations" are the blocks' inputs, plus
one block's full activations during its recomputation, as without offloading.

On the CPU there is nowhere to offload to: the hooks still run (a copy into separate CPU
memory, read back in backward), so the mechanism is exercised exactly, but nothing is saved.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

MIN_BYTES = 1024  # storages smaller than this stay where they are

_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def describe_offload(device, grad_ckpt: bool) -> str:
    """The header line's text for --offload-activations on ``device``."""
    what = "each block's input (--grad-ckpt)" if grad_ckpt else "each block's saved activations"
    device = torch.device(device)
    if device.type == "cuda":
        return (f"{what} offloaded to pinned CPU memory on a side stream, prefetched one block ahead in "
                f"backward; the last block's stay on the GPU")
    if device.type == "cpu":
        return (f"{what} copied to other CPU memory and back: on the CPU this saves no memory and only "
                f"costs time (the option pays off on a GPU)")
    return f"{what} copied to CPU memory and back synchronously (no side stream on {device.type})"


class ActivationOffloader:
    """One per model: running totals and the per-forward :class:`OffloadPass` factory."""

    def __init__(self, min_bytes: int = MIN_BYTES):
        self.min_bytes = min_bytes
        self.moved_tensors = 0  # saved tensors (views included) kept in CPU memory, since creation
        self.moved_bytes = 0  # bytes of the storages copied to CPU memory
        self.held = 0  # storages saved through the hooks and not yet released by autograd (0 after backward)

    def new_pass(self, device, n_blocks: int, shared=()) -> OffloadPass:
        """A forward pass of ``n_blocks`` blocks on ``device``; ``shared``: tensors every block reads, never moved."""
        return OffloadPass(self, torch.device(device), n_blocks, shared)


class _Stored:
    """One storage's bytes: on the host between forward and backward, on the device once fetched."""

    __slots__ = ("owner", "block", "host", "device", "ready")

    def __init__(self, owner: ActivationOffloader, block: int, device_bytes: torch.Tensor | None = None):
        self.owner, self.block = owner, block
        self.host = None  # uint8 CPU copy
        self.device = device_bytes  # uint8 tensor on the device: the original (last block) or fetched back
        self.ready = None  # CUDA event after the host-to-device copy
        owner.held += 1

    def __del__(self):
        self.owner.held -= 1


class OffloadPass:
    """The hooks of one forward pass and the bookkeeping its backward needs."""

    def __init__(self, offloader: ActivationOffloader, device: torch.device, n_blocks: int, shared=()):
        self.offloader, self.n_blocks = offloader, n_blocks
        self.stream = side_stream(device) if device.type == "cuda" else None
        self.shared = {t.untyped_storage().data_ptr() for t in shared if isinstance(t, torch.Tensor)}
        self.pending: dict[int, list[_Stored]] = {}  # block -> its storages not yet fetched back
        self.copied: dict[int, torch.cuda.Event] = {}  # block -> event after its device-to-host copies
        self.block = -1
        # The running block's storages by (pointer, version), each with its device bytes: while they
        # are held here no new tensor of this block can reuse the pointer.
        self.by_storage: dict[tuple[int, int], tuple[_Stored, torch.Tensor]] = {}

    @contextmanager
    def saving(self, block: int):
        """Run block ``block``'s forward under this pass's hooks."""
        self.block, self.by_storage = block, {}
        self.pending[block] = []
        earlier = self.copied.pop(block - 2, None)
        if earlier is not None:  # at most two blocks' copies in flight: their device memory is bounded
            torch.cuda.current_stream(self.stream.device).wait_event(earlier)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            if self.stream is not None:
                self.copied[block] = self.stream.record_event()
            self.by_storage = {}  # the device tensors may go: record_stream guards the copies still reading them

    def pack(self, tensor: torch.Tensor):
        if self._stays(tensor):
            return tensor
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor._version)  # views of one storage share a version counter
        if key not in self.by_storage:
            device_bytes = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            self.by_storage[key] = self._store(device_bytes), device_bytes
        stored = self.by_storage[key][0]
        if stored.host is not None:
            self.offloader.moved_tensors += 1
        return stored, tensor.dtype, tensor.storage_offset(), tensor.size(), tensor.stride(), tensor.device

    def _stays(self, tensor: torch.Tensor) -> bool:
        if _is_weight(tensor) or type(tensor) is not torch.Tensor or tensor.layout != torch.strided:
            return True  # weights; subclasses (DTensor, quantized) and sparse tensors have storages of their own kind
        storage = tensor.untyped_storage()
        return storage.nbytes() < self.offloader.min_bytes or storage.data_ptr() in self.shared

    def _store(self, device_bytes: torch.Tensor) -> _Stored:
        """Start copying one storage (as bytes) to CPU memory; the last block's stay."""
        if self.block == self.n_blocks - 1:  # the last block's: needed first in backward, kept
            return _Stored(self.offloader, self.block, device_bytes)
        stored = _Stored(self.offloader, self.block)
        stored.host = torch.empty(device_bytes.numel(), dtype=torch.uint8, pin_memory=self.stream is not None)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))  # the tensor is computed
            with torch.cuda.stream(self.stream):
                stored.host.copy_(device_bytes, non_blocking=True)
            device_bytes.record_stream(self.stream)
        else:
            stored.host.copy_(device_bytes)
        self.offloader.moved_bytes += device_bytes.numel()
        self.pending[self.block].append(stored)
        return stored

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        stored, dtype, offset, size, stride, device = packed
        if stored.device is None:  # not prefetched: fetch it now
            self._fetch(stored.block, device)
        self._fetch(stored.block - 1, device)  # backward goes there next
        if stored.ready is not None:
            torch.cuda.current_stream(device).wait_event(stored.ready)
        return torch.empty(0, dtype=dtype, device=device).set_(stored.device.untyped_storage(), offset, size, stride)

    def _fetch(self, block: int, device: torch.device) -> None:
        """Bring block ``block``'s storages back to ``device`` (on the side stream on CUDA)."""
        for stored in self.pending.pop(block, ()):
            if device.type == "cuda":
                with torch.cuda.stream(self.stream):
                    stored.device = stored.host.to(device, non_blocking=True)
                    stored.ready = self.stream.record_event()
                stored.device.record_stream(torch.cuda.current_stream(device))  # compute reads it
            elif device.type == "cpu":
                stored.device = stored.host  # already in this memory
            else:
                stored.device = stored.host.to(device)
            stored.host = None  # the pinned allocator keeps it until the copy has read it


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One copy stream per GPU, shared by every pass."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


def _is_weight(tensor: torch.Tensor) -> bool:
    """A parameter, a view of one, or autocast's copy of one in the compute dtype."""
    if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter):
        return True
    node = tensor.grad_fn
    if node is None or type(node).__name__ != "ToCopyBackward0":
        return False
    source = node.next_functions[0][0]
    return isinstance(getattr(source, "variable", None), nn.Parameter)
