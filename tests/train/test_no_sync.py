"""The update reads the GPU once, on a machine without a GPU.

On the CPU every tensor is a host tensor, so "device" is simulated: the model's weights
and buffers start marked, and every tensor an operation computes from a marked one is
marked too (a dispatch mode sees every aten op, backward included). Reading a marked
tensor on the host (``.item()``, ``float()``, ``bool()``, ``nonzero``, boolean-mask
indexing, ``unique``...) would be a GPU sync; outside the update's one stated read
(``host_values``) it fails the test. Host tensors (labels, doc_ids, the data) are free.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

import sftplug.train.run as run_module
from sftplug.train.setup import build_run

aten = torch.ops.aten
# Ops that hand a tensor's values to the host, or whose output shape depends on them.
READS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
    aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default,
    aten.equal.default, aten.is_nonzero.default,
}  # fmt: skip


class DeviceReads(TorchDispatchMode):
    """Fails on a host read of a tensor that would live on the GPU."""

    def __init__(self, on_device):
        super().__init__()
        self.marked = WeakTensorKeyDictionary()
        for t in on_device:
            self.marked[t] = True
        self.allowed = False
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = any(t in self.marked for t in inputs)
        if on_device and not self.allowed:
            boolean_index = func is aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
            )
            if func in READS or boolean_index:
                raise AssertionError(f"the update reads the device: {func}")
        out = func(*args, **kwargs)
        if on_device:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.marked[t] = True
        return out


@pytest.mark.parametrize("dtype, pack", [("fp32", True), ("fp32", False), ("bf16", True)],
                         ids=["fp32-packed", "fp32-rows", "bf16-packed"])
def test_the_update_reads_the_device_once(small_config, registry, monkeypatch, dtype, pack, quiet):
    run = build_run(small_config(dtype=dtype, pack=pack, attention="flash", accum=2, steps=3), registry,
                    echo=quiet)
    run.update()  # the first update creates the optimizer state (outside the watch, as any first step)
    mode = DeviceReads([*run.model.parameters(), *run.model.buffers()])
    for state in run.optimizer.state.values():
        mode.marked.update({t: True for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0})
    real = run_module.host_values

    def stated_read(*tensors):
        mode.reads.append(f"{len(tensors)} tensors")
        mode.allowed = True
        try:
            return real(*tensors)
        finally:
            mode.allowed = False

    monkeypatch.setattr(run_module, "host_values", stated_read)
    with mode:
        records = [run.update() for _ in range(2)]
    assert mode.reads == ["2 tensors", "2 tensors"]  # loss and grad norm, once per update
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in records)


def test_the_watch_catches_a_device_read():
    weight = torch.ones(3)
    with pytest.raises(AssertionError, match="reads the device"):
        with DeviceReads([weight]):
            float((weight * 2).sum())
    with pytest.raises(AssertionError, match="reads the device"):
        with DeviceReads([weight]):
            (weight * 2)[weight > 0]  # boolean-mask indexing
    with DeviceReads([weight]):
        host = torch.tensor([1, -100, 3])
        assert int((host != -100).sum()) == 2  # host tensors are free to read
