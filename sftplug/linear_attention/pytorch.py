"""The gated delta rule in PyTorch, chunked: the reference every linear-attention backend
matches, and the CPU's form.

Per row, value head and document, a state S [Dk, Dv] starts at zero at the document's first
token and follows transformers' recurrence (its torch_recurrent_gated_delta_rule):
``S ← e^{g_t} S;  S ← S + β_t k_t (v_t − S^T k_t)^T;  o_t = S^T q_t · Dk^-1/2``.
The chunked form computes a chunk's tokens together (a triangular solve within the chunk, the
state carried from chunk to chunk in fp32), as transformers' torch_chunk_gated_delta_rule does,
with documents kept apart: within a chunk only pairs of one document interact, a token reads
the carried state only if its document began before the chunk, and a chunk hands on only its
last document's state. Memory is that of the chunked tensors, whatever the documents' lengths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64


def gated_delta_rule(q, k, v, g, beta, doc_ids=None, chunk: int = CHUNK, initial_state=None, final_state=False):
    """q, k [B, T, Hk, Dk] (L2-normalised), v [B, T, Hv, Dv], g [B, T, Hv] (log decay, <= 0), beta
    [B, T, Hv], doc_ids [B, T] non-decreasing or None -> o [B, T, Hv, Dv] in v's dtype.

    Generation continues one document per row: ``initial_state`` [B, Hv, Dk, Dv] (fp32) is the state
    before the first token, and ``final_state`` returns (o, the state after the last token).
    """
    b, t, hk, dk = k.shape
    hv = v.shape[2]
    if hv != hk:  # each q/k head serves hv / hk consecutive value heads
        q, k = (x.repeat_interleave(hv // hk, dim=2) for x in (q, k))
    q, k, v, g, beta = (x.transpose(1, 2).float() for x in (q, k, v, g, beta))  # [B, H, T, ...]
    q = q * dk**-0.5
    pad = -t % chunk
    if doc_ids is None:  # one document; the padding (k = v = 0, β = 0, g = 0) leaves its state as it is
        docs = torch.zeros(b, t + pad, dtype=torch.long, device=v.device)
    else:
        docs = F.pad(doc_ids.long(), (0, pad), value=-1)  # padding: a document of its own, after every other
        docs = torch.where(docs < 0, docs.amax(dim=1, keepdim=True) + 1, docs)
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (t + pad) // chunk
    q, k, v = (x.reshape(b, hv, n, chunk, -1) for x in (q, k, v))
    g, beta = (x.reshape(b, hv, n, chunk) for x in (g, beta))
    docs = docs.reshape(b, 1, n, chunk)

    same = docs[..., :, None] == docs[..., None, :]  # [B, 1, n, C, C]: pairs of one document
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=v.device).tril()
    decay = g.cumsum(-1)  # within each chunk
    pairwise = (decay[..., :, None] - decay[..., None, :]).masked_fill(~(same & causal), float("-inf")).exp()
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    # the UT transform: the chunk's delta-rule updates as one unit-lower-triangular solve
    system = (k_beta @ k.transpose(-1, -2)) * pairwise.tril(-1)
    eye = torch.eye(chunk, device=v.device)
    new_values = torch.linalg.solve_triangular(system + eye, v_beta, upper=False, unitriangular=True)
    k_decayed = torch.linalg.solve_triangular(system + eye, k_beta * decay.exp()[..., None], upper=False,
                                              unitriangular=True)
    intra = (q @ k.transpose(-1, -2)) * pairwise
    last = docs[..., -1:]  # each chunk's last document, the one whose state it hands on
    before = docs[..., :1, :1] if initial_state is not None else torch.full_like(last[:, :, :1], -2)
    previous_last = torch.cat([before, last[:, :, :-1]], dim=2)
    reads = (docs == previous_last).float()[..., None]  # [B, 1, n, C, 1]: its document began before the chunk
    keeps = (docs == last).float()[..., None]  # tokens whose updates reach the next chunk
    carries = (docs[..., :1] == previous_last).float()[..., None]  # the chunk continues the carried document
    q_decayed = q * decay.exp()[..., None] * reads
    k_to_end = k * (decay[..., -1:] - decay).exp()[..., None] * keeps
    chunk_decay = decay[..., -1].exp()[..., None, None]
    state = v.new_zeros(b, hv, dk, v.shape[-1]) if initial_state is None else initial_state.float()
    out = []
    for i in range(n):
        v_new = new_values[:, :, i] - (k_decayed[:, :, i] * reads[:, :, i]) @ state
        out.append(q_decayed[:, :, i] @ state + intra[:, :, i] @ v_new)
        state = state * chunk_decay[:, :, i] * carries[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ v_new
    o = torch.stack(out, dim=2).reshape(b, hv, n * chunk, -1)[:, :, :t].transpose(1, 2).to(v.dtype)
    return (o, state) if final_state else o


def recurrent_reference(q, k, v, g, beta):
    """The recurrence token by token for one document per row, in q's dtype (tests: fp64)."""
    b, t, hk, dk = k.shape
    hv = v.shape[2]
    q, k = (x.repeat_interleave(hv // hk, dim=2) for x in (q, k))
    state = v.new_zeros(b, hv, dk, v.shape[-1])
    out = []
    for i in range(t):
        state = state * g[:, i].exp()[..., None, None]
        predicted = (state * k[:, i, :, :, None]).sum(-2)  # S^T k [B, H, Dv]
        state = state + k[:, i, :, :, None] * ((v[:, i] - predicted) * beta[:, i, :, None])[:, :, None, :]
        out.append((state * q[:, i, :, :, None]).sum(-2) * dk**-0.5)
    return torch.stack(out, dim=1)
