"""The gated delta rule in PyTorch, chunked: the reference every linear-attention backend
matches, and the CPU's form.

Per row, value head and document, a state S [Dk, Dv] starts at zero at the document's first
token and follows transformers' recurrence (its torch_recurrent_gated_delta_rule):
``S ← e^{g_t} S;  S ← S + β_t k_t (v_t − S^T k_t)^T;  o_t = S^T q_t · Dk^-1/2``.
The chunked form computes a chunk's tokens together (a triangular solve within the chunk, the
state carried from chunk to chunk), as transformers' torch_chunk_gated_delta_rule does, with
documents kept apart: within a chunk only pairs of one document interact, a token reads the
carried state only if its document began before the chunk, and a chunk hands on only its last
document's state. Everything is computed in fp32 (autocast off). Memory is that of the chunked
tensors, whatever the documents' lengths.

For speed on the CPU, where this form trains: q·k and k·k are taken once per key head and shared
by its value heads (GQA); the chunk's two triangular solves are one inverse (:class:`UnitLowerSolve`);
and only the state's recurrence runs chunk by chunk (:class:`ChunkScan`, its backward written out),
every other product once over all chunks.
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
    with torch.autocast(v.device.type, enabled=False):
        o, state = _chunked(q, k, v, g, beta, doc_ids, chunk, initial_state)
    return (o.to(v.dtype), state) if final_state else o.to(v.dtype)


def _chunked(q, k, v, g, beta, doc_ids, chunk: int, initial_state):
    b, t, hk, dk = k.shape
    hv, dv = v.shape[2:]
    per = hv // hk  # each q/k head serves `per` consecutive value heads
    pad = -t % chunk
    n = (t + pad) // chunk

    def chunked(x, heads):
        """[B, T, H, ...] -> [B, heads, n, C, ...] in fp32, padded with zeros to whole chunks (padding:
        k = v = 0, β = 0, g = 0 leaves the state as it is); one copy, contiguous (whole rows too: the
        products would otherwise copy their operands, and keep the copies)."""
        x = x.float().transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
        return x.reshape(b, heads, n, chunk, *x.shape[3:]).contiguous()

    # key-head tensors [B, Hk, 1, n, C, Dk] broadcast against value-head ones [B, Hk, per, n, C, ...]
    q, k = (chunked(q, hk) * dk**-0.5)[:, :, None], chunked(k, hk)[:, :, None]
    v = chunked(v, hv).view(b, hk, per, n, chunk, dv)
    g, beta = (chunked(x, hv).view(b, hk, per, n, chunk) for x in (g, beta))
    if doc_ids is None:  # one document
        docs = torch.zeros(b, t + pad, dtype=torch.long, device=v.device)
    else:
        docs = F.pad(doc_ids.long(), (0, pad), value=-1)  # padding: a document of its own, after every other
        docs = torch.where(docs < 0, docs.amax(dim=1, keepdim=True) + 1, docs)
    docs = docs.view(b, 1, 1, n, chunk)

    same = docs[..., :, None] == docs[..., None, :]  # pairs of one document
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=v.device).tril()
    decay = g.cumsum(-1)  # within each chunk
    decay_exp = decay.exp()
    pairwise = (decay[..., :, None] - decay[..., None, :]).masked_fill(~(same & causal), float("-inf")).exp()
    # the UT transform: the chunk's delta-rule updates as one unit-lower-triangular solve (of which
    # only the strictly lower triangle of the system counts), for the values and the decayed keys
    system = _pairs(k, k) * beta[..., None] * pairwise
    k_beta = k.expand(-1, -1, per, -1, -1, -1) * (decay_exp * beta)[..., None]
    solved = UnitLowerSolve.apply(system, torch.cat([v * beta[..., None], k_beta], dim=-1))
    new_values, k_decayed = solved.split([dv, dk], dim=-1)
    intra = _pairs(q, k) * pairwise

    last = docs[..., -1:]  # each chunk's last document, the one whose state it hands on
    before = docs[..., :1, :1] if initial_state is not None else torch.full_like(last[..., :1, :], -2)
    previous_last = torch.cat([before, last[..., :-1, :]], dim=-2)
    reads = (docs == previous_last).float()  # [B, 1, 1, n, C]: its document began before the chunk
    keeps = (docs == last).float()  # tokens whose updates reach the next chunk
    carries = (docs[..., :1] == previous_last).float()  # [B, 1, 1, n, 1]: the chunk continues the carried one
    rows = (b * hv, n)  # [B, Hk, per, n, ...] -> [B·Hv, n, ...]
    reads_state = (k_decayed * reads[..., None]).reshape(*rows, chunk, dk)
    q_decayed = (q * (decay_exp * reads)[..., None]).reshape(*rows, chunk, dk)
    k_to_end = (k * ((decay[..., -1:] - decay).exp() * keeps)[..., None]).reshape(*rows, chunk, dk)
    chunk_decay = (decay_exp[..., -1:] * carries).expand(b, hk, per, n, 1).reshape(*rows, 1, 1)
    state = v.new_zeros(b * hv, dk, dv) if initial_state is None else initial_state.float().reshape(b * hv, dk, dv)
    v_new, states, state = ChunkScan.apply(reads_state, new_values.reshape(*rows, chunk, dv), k_to_end, chunk_decay,
                                           state)
    o = q_decayed @ states + intra.reshape(*rows, chunk, chunk) @ v_new  # [B·Hv, n, C, Dv]
    return o.view(b, hv, n * chunk, dv)[:, :, :t].transpose(1, 2), state.view(b, hv, dk, dv)


def _pairs(a, b):
    """a b^T over [..., C, D] as one batched product of views (matmul would copy its broadcast operands)."""
    return torch.bmm(a.flatten(0, -3), b.flatten(0, -3).transpose(1, 2)).view(*a.shape[:-1], b.shape[-2])


class UnitLowerSolve(torch.autograd.Function):
    """X = (I + L)^-1 R for L the strictly lower triangle of ``system`` [..., C, C], R [..., C, N].

    The inverse T is formed by batched products (:func:`unit_lower_inverse`) and kept: the backward is
    then two products, gR = T^T gX and gL = -(gR X^T) below the diagonal, where autograd's triangular
    solve would solve again (LAPACK's small solves, one per matrix, are slow, more so on busy cores)."""

    @staticmethod
    def forward(ctx, system, right):
        inverse = unit_lower_inverse(system)
        x = inverse @ right
        ctx.save_for_backward(inverse, x)
        return x

    @staticmethod
    def backward(ctx, grad_x):
        inverse, x = ctx.saved_tensors
        grad_right = inverse.transpose(-1, -2) @ grad_x
        return -(grad_right @ x.transpose(-1, -2)).tril_(-1), grad_right


def unit_lower_inverse(system):
    """(I + L)^-1 for L the strictly lower triangle of ``system`` [..., C, C], as triangular inversion by
    blocks computes it: the inverses of the diagonal blocks of size s give those of size 2s, by
    inv([[A, 0], [B, D]]) = [[A^-1, 0], [-D^-1 B A^-1, D^-1]] (C a power of two; else a triangular solve)."""
    c = system.shape[-1]
    eye = torch.eye(c, dtype=system.dtype, device=system.device)
    if c & (c - 1):
        return torch.linalg.solve_triangular(system, eye.expand_as(system), upper=False, unitriangular=True)
    shape, system = system.shape, system.reshape(-1, c, c)
    inverse = eye.repeat(system.shape[0], 1, 1)
    size = 1
    while size < c:
        done, lower = _diagonal_blocks(inverse, 2 * size), _diagonal_blocks(system, 2 * size)
        done[..., size:, :size] = -(done[..., size:, size:] @ lower[..., size:, :size] @ done[..., :size, :size])
        size *= 2
    return inverse.view(shape)


def _diagonal_blocks(m, size: int):
    """The diagonal blocks of size ``size`` of m [N, C, C]: a view [N, C / size, size, size]."""
    n = m.shape[-1] // size
    return m.view(-1, n, size, n, size).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)


class ChunkScan(torch.autograd.Function):
    """The state carried from chunk to chunk, the one sequential part: for chunks i = 0 .. n-1,
    ``u_i = V_i − W_i S_i`` (the new values: what the state does not predict) and
    ``S_{i+1} = d_i S_i + K_i^T u_i``, from S_0 = ``state``. Inputs [N, n, C, ·] (d [N, n, 1, 1]);
    returns u [N, n, C, Dv], the state entering each chunk [N, n, Dk, Dv] and the last state.

    Its backward carries the state's gradient back through the chunks with two products per
    chunk; the gradients of W, K and d are then one batched product each."""

    @staticmethod
    def forward(ctx, w, v, k, d, state):
        u, states = [], []
        for i in range(w.shape[1]):
            states.append(state)
            u.append(torch.baddbmm(v[:, i], w[:, i], state, alpha=-1))
            state = torch.baddbmm(state * d[:, i], k[:, i].transpose(-1, -2), u[i])
        u, states = torch.stack(u, dim=1), torch.stack(states, dim=1)
        ctx.save_for_backward(w, k, d, u, states)
        return u, states, state

    @staticmethod
    def backward(ctx, grad_u, grad_states, grad_state):
        w, k, d, u, states = ctx.saved_tensors
        n = w.shape[1]
        grads_u, carried = [None] * n, [None] * n  # u_i's whole gradient; S_{i+1}'s, for each chunk i
        for i in reversed(range(n)):
            carried[i] = grad_state
            grads_u[i] = torch.baddbmm(grad_u[:, i], k[:, i], grad_state)
            grad_state = torch.baddbmm(grad_states[:, i] + d[:, i] * grad_state, w[:, i].transpose(-1, -2),
                                       grads_u[i], alpha=-1)
        grad_u, carried = torch.stack(grads_u, dim=1), torch.stack(carried, dim=1)
        grad_w = -(grad_u @ states.transpose(-1, -2))
        grad_k = u @ carried.transpose(-1, -2)
        grad_d = (carried * states).sum((-1, -2), keepdim=True)
        return grad_w, grad_u, grad_k, grad_d, grad_state


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
