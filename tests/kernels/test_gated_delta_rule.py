"""The Triton gated delta rule (Gated DeltaNet) on the CPU under the Triton interpreter, and
compiled for sm_80 and sm_90a.

The reference is transformers' own ``torch_chunk_gated_delta_rule`` applied document by document
(each document of a packed row as its own sequence: the state starts at zero there). It
computes in fp32 whatever its inputs, so the float64 reference is the token-by-token recurrence
of ``torch_recurrent_gated_delta_rule`` written out in float64, itself checked against
transformers first. The kernel's output and the gradients of q, k, v, g and beta may be off the
float64 reference by at most twice transformers' own error in the same dtype plus a few
roundings of the dtype (conftest.py). The interpreter's chunks are 16 positions, so the rows
here span several chunks, the last one partial.
"""

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule  # noqa: E402

from sftplug.kernels.gated_delta_rule import compile_specs, gated_delta_rule  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.interpreted
NAMES = ["out", "q", "k", "v", "g", "beta"]


def _recurrence64(q, k, v, g, beta, doc_ids=None):
    """transformers' token-by-token recurrence in the inputs' dtype, the state restarting at each document."""
    batch, length, heads_k, dim_k = q.shape
    group = v.shape[2] // heads_k
    q = q.repeat_interleave(group, 2) * dim_k ** -0.5
    k = k.repeat_interleave(group, 2)
    state = q.new_zeros(batch, v.shape[2], dim_k, v.shape[3])
    outs = []
    for t in range(length):
        starts = torch.ones(batch, dtype=torch.bool) if t == 0 else (
            torch.zeros(batch, dtype=torch.bool) if doc_ids is None else doc_ids[:, t] != doc_ids[:, t - 1])
        keep = g[:, t].exp() * (~starts).to(q.dtype)[:, None]  # [B, Hv]
        state = state * keep[..., None, None]
        remembered = (state * k[:, t, :, :, None]).sum(-2)
        delta = (v[:, t] - remembered) * beta[:, t, :, None]
        state = state + k[:, t, :, :, None] * delta[:, :, None, :]
        outs.append((state * q[:, t, :, :, None]).sum(-2))
    return torch.stack(outs, 1)


def _transformers_by_document(q, k, v, g, beta, doc_ids=None):
    """transformers' chunked form on each document of each row as a sequence of its own."""
    rows = []
    for b in range(q.shape[0]):
        lengths = [q.shape[1]] if doc_ids is None else torch.unique_consecutive(doc_ids[b], return_counts=True)[1]
        pieces, start = [], 0
        for length in [int(n) for n in lengths]:
            part = slice(start, start + length)
            out, _ = torch_chunk_gated_delta_rule(*(x[b:b + 1, part] for x in (q, k, v, g, beta)))
            pieces.append(out)
            start += length
        rows.append(torch.cat(pieces, 1))
    return torch.cat(rows)


def _triton(q, k, v, g, beta, doc_ids=None):
    return gated_delta_rule(q, k, v, g, beta, doc_ids)


def _case(batch, length, heads_k, heads_v, dim_k, dim_v, seed=0):
    """float64 q, k (L2-normalised), v, g (<= 0), beta (in (0, 1)) and the output's gradient."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = F.normalize(rand(batch, length, heads_k, dim_k), dim=-1)
    k = F.normalize(rand(batch, length, heads_k, dim_k), dim=-1)
    v = rand(batch, length, heads_v, dim_v)
    g = -F.softplus(rand(batch, length, heads_v)) * 0.5  # the models' -exp(A) softplus(a + dt_bias)
    beta = torch.sigmoid(rand(batch, length, heads_v))
    return [q, k, v, g, beta], rand(batch, length, heads_v, dim_v)


def _grads(form, inputs, grad_out, dtype, doc_ids=None):
    """[out, dq, dk, dv, dg, dbeta] of ``form`` with q, k, v in ``dtype`` and g, beta in fp32
    (float64 for a float64 run)."""
    decay_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [x.detach().to(dtype if i < 3 else decay_dtype).requires_grad_() for i, x in enumerate(inputs)]
    out = form(*leaves, doc_ids)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [out.detach(), *grads]


def _documents(*rows):
    """int32 doc_ids [B, T] of rows given as document lengths."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows]).int()


def test_the_float64_recurrence_is_transformers():
    inputs, grad_out = _case(2, 37, 2, 4, 16, 32, seed=1)
    docs = _documents([10, 1, 20, 6], [16, 21])
    ref = _grads(_recurrence64, inputs, grad_out, torch.float64, docs)
    hf = _grads(_transformers_by_document, inputs, grad_out, torch.float32, docs)
    for name, a, r in zip(NAMES, hf, ref):
        # fp32 products summed over at most a chunk's 64 positions, each a few roundings
        assert (a.double() - r).abs().max() <= 64 * torch.finfo(torch.float32).eps * r.abs().max(), name


CASES = {
    # B, T, Hk, Hv, Dk, Dv, documents per row (None: one per row)
    "gqa": ((2, 37, 2, 4, 16, 32), None),
    # a boundary at a chunk's start, one-token documents (one starting a chunk), a trailing padding document
    "packed-gqa": ((2, 37, 2, 4, 16, 32), ([10, 1, 20, 6], [16, 1, 19, 1])),
    "packed-many": ((1, 41, 2, 2, 32, 16), ([3, 1, 1, 7, 4, 9, 1, 15],)),
}


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers_document_by_document(case, dtype, assert_close_to_float64):
    shape, rows = CASES[case]
    inputs, grad_out = _case(*shape, seed=len(case))
    docs = _documents(*rows) if rows else None
    got = _grads(_triton, inputs, grad_out, dtype, docs)
    ref64 = _grads(_recurrence64, inputs, grad_out, torch.float64, docs)
    same = _grads(_transformers_by_document, inputs, grad_out, dtype, docs)
    assert [t.dtype for t in got] == [dtype] * 4 + [torch.float32] * 2
    assert_close_to_float64(got, ref64, same, dtype, case, NAMES)


@interpreted
def test_a_packed_row_equals_its_documents_as_rows():
    inputs, grad_out = _case(1, 35, 1, 2, 16, 16, seed=4)
    lengths = [17, 1, 17]
    packed = _grads(_triton, inputs, grad_out, torch.float32, _documents(lengths))
    starts = [0, 17, 18]
    for start, length in zip(starts, lengths):
        part = slice(start, start + length)
        alone = _grads(_triton, [x[:, part] for x in inputs], grad_out[:, part], torch.float32)
        for name, a, b in zip(NAMES, packed, alone):
            # the same products, chunked at other positions (a first token's dg cancels to a rounding,
            # not to 0): a few fp32 roundings of the row's largest value apart
            atol = 64 * torch.finfo(torch.float32).eps * a.abs().max()
            assert torch.allclose(a[:, part], b, rtol=0, atol=atol), f"document at {start}: {name}"


@interpreted
def test_refuses_what_does_not_fit():
    (q, k, v, g, beta), _ = _case(1, 8, 2, 4, 16, 16)
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    with pytest.raises(ValueError, match="multiple of the q/k heads"):
        gated_delta_rule(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3])
    with pytest.raises(ValueError, match="head dims must be one of"):
        gated_delta_rule(q[..., :12], k[..., :12], v, g, beta)
    with pytest.raises(ValueError, match="must share one of"):
        gated_delta_rule(q, k, v.half(), g, beta)
    with pytest.raises(ValueError, match="doc_ids must be int"):
        gated_delta_rule(q, k, v, g, beta, torch.zeros(1, 7, dtype=torch.int32))


@pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1: kernels are interpreted, not compiled")
@pytest.mark.parametrize("target", ["sm_80", "sm_90a"])
def test_compiles_without_spills(target):
    from sftplug.kernels.compile_report import compile_spec, format_report

    rows = [compile_spec(spec, target, dtype) for dtype in ("bf16", "fp16") for spec in compile_specs(dtype)
            if spec["targets"] == [target]]
    assert {r.kernel for r in rows} >= {"gdr_prepare_dk128", "gdr_scan_dk128", "gdr_state_grad_dk128",
                                        "gdr_grads_dk128"}
    assert rows and all(r.ok and r.spills == 0 for r in rows), format_report(rows)
