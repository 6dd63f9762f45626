"""Optional `fla` plugin: the gated delta rule of the flash-linear-attention package (fla-org), so a
user can compare it with sftplug's own kernel (``--linear-attention fla``).

It offers backend ``fla`` through ``select_linear_attention``: fla's ``chunk_gated_delta_rule``
(its Triton kernels; value heads grouped over the q/k heads, as Qwen3.5 has them, since fla 0.5),
where the package imports (``pip install 'sftplug[fla]'``) and a CUDA GPU is there. Before it is
offered for a dtype and head dims, it runs once there, forward and backward, and is compared with
sftplug's PyTorch form (once per process), as sftplug's Triton kernel is. Its priority is below
that kernel's (not measured against it here) and above the PyTorch form's.

Packed rows: fla restarts the state at each sequence of its varlen form, whose rows are one. The
batch's rows are flattened into one and ``cu_seqlens`` marks where each document starts, every
row's first token included. fla lists its chunks on the host, so the documents' boundaries are
read to the host once per forward (one device sync; the layers of a forward share them) and
handed to fla as ``cu_seqlens_cpu`` too, which spares it syncs of its own.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util

import torch

from sftplug import hookimpl, probes
from sftplug.linear_attention.backend import LinearAttentionBackend, LinearAttentionRequest, first_run_error

INSTALL = "pip install 'sftplug[fla]'"
OLDEST = (0, 5)  # value heads grouped over fewer q/k heads (GVA) and cu_seqlens_cpu


def installed_version() -> str | None:
    """fla's version from its metadata (importing fla imports transformers and triton), None when absent."""
    if importlib.util.find_spec("fla") is None:
        return None
    for distribution in ("fla-core", "flash-linear-attention"):  # fla-core holds the code since 0.6
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def too_old(version: str) -> bool:
    try:
        return tuple(int(part) for part in version.split(".")[:2]) < OLDEST
    except ValueError:  # a local build: let its first run decide
        return False


def cu_seqlens_of(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each document of the rows flattened into one starts, and the end: int64 [N + 1], on the
    device and on the host. A row's first token starts a document, as does every change of id."""
    ids = doc_ids.cpu()  # the one read to the host
    rows, length = ids.shape
    starts = torch.ones(rows, length, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    on_host = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([rows * length])]).long()
    return on_host.to(doc_ids.device), on_host


def fla_gated_delta_rule(kernel, q, k, v, g, beta, boundaries=None):
    """sftplug's linear-attention call (sftplug.linear_attention.backend) as fla's ``kernel`` takes it:
    q and k in v's dtype (sftplug normalises them in fp32), the scale Dk^-1/2 stated, the heads as
    they are ([B, T, H, D], value head i reading q/k head i // (Hv / Hk) in both); ``boundaries``
    (cu_seqlens_of the doc_ids, or None: one document per row) run the rows as one row of documents."""
    q, k = q.to(v.dtype), k.to(v.dtype)
    scale = q.shape[-1] ** -0.5
    if boundaries is None:
        return kernel(q, k, v, g, beta, scale=scale, output_final_state=False)[0]
    rows, length = v.shape[:2]
    flat = [x.reshape(1, rows * length, *x.shape[2:]) for x in (q, k, v, g, beta)]
    cu_seqlens, cu_seqlens_cpu = boundaries
    o = kernel(*flat, scale=scale, output_final_state=False, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)[0]
    return o.reshape(rows, length, *o.shape[2:])


class FlaChunked(LinearAttentionBackend):
    name = "fla"
    priority = 15
    description = ("flash-linear-attention's chunk_gated_delta_rule (packed rows as cu_seqlens, whose boundaries "
                   "are read to the host once per forward)")

    def __init__(self):
        self.last = None  # (doc_ids, its version, its boundaries): the layers of one forward share them

    def check(self, request: LinearAttentionRequest) -> str | None:
        version = installed_version()
        if version is None:
            return f"flash-linear-attention is not installed: {INSTALL}"
        if request.device.type != "cuda":
            return f"flash-linear-attention needs a CUDA GPU, not {request.device.type}"
        if too_old(version):
            return f"flash-linear-attention {version} has no grouped value heads (0.5 or later does): {INSTALL}"
        return first_run(str(request.device), request.dtype, request.key_head_dim, request.value_head_dim)

    def __call__(self, q, k, v, g, beta, doc_ids=None):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        return fla_gated_delta_rule(chunk_gated_delta_rule, q, k, v, g, beta, self.boundaries(doc_ids))

    def boundaries(self, doc_ids):
        if doc_ids is None:
            return None
        if self.last is None or self.last[0] is not doc_ids or self.last[1] != doc_ids._version:
            self.last = (doc_ids, doc_ids._version, cu_seqlens_of(doc_ids))
        return self.last[2]


@functools.cache
def first_run(device: str, dtype: torch.dtype, dim_k: int, dim_v: int, kernel=None) -> str | None:
    """None when one forward and backward of fla (two rows, three documents, GQA) match sftplug's PyTorch
    form here, else why not. ``kernel``: fla's chunk_gated_delta_rule unless given (tests)."""
    gen = torch.Generator().manual_seed(0)
    t = 40
    q, k = (torch.nn.functional.normalize(torch.randn(2, t, 1, dim_k, generator=gen), dim=-1) for _ in range(2))
    v, grad = torch.randn(2, t, 2, dim_v, generator=gen), torch.randn(2, t, 2, dim_v, generator=gen)
    g, beta = -torch.rand(2, t, 2, generator=gen), torch.rand(2, t, 2, generator=gen)
    doc_ids = torch.stack([(torch.arange(t) >= 23).int(), torch.zeros(t, dtype=torch.int32)])

    def run(q, k, v, g, beta, doc_ids):  # fla imported here: a broken install is a failed first run
        chunk = kernel
        if chunk is None:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as chunk
        return fla_gated_delta_rule(chunk, q, k, v, g, beta, cu_seqlens_of(doc_ids))

    return first_run_error(run, "flash-linear-attention", device, dtype, (q, k, v, g, beta), doc_ids, grad)


class FlaPlugin:
    """Skipped, saying why, where fla is not installed or there is no CUDA GPU."""

    def why_unavailable(self) -> str | None:
        if installed_version() is None:
            return f"flash-linear-attention is not installed: {INSTALL}"
        if not probes.cuda_available():
            return f"flash-linear-attention needs a CUDA GPU: {probes.why_no_gpu()}"
        return None

    @hookimpl
    def select_linear_attention(self, request: LinearAttentionRequest):
        return [FlaChunked()]


fla = FlaPlugin()
