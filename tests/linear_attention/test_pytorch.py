"""The gated delta rule's chunked PyTorch form: equal to the recurrence token by token, to
transformers' chunked form, and, in packed rows, to each document run alone (outputs and
gradients), with GQA, documents across chunk boundaries, one-token documents and padding."""

import pytest
import torch

from sftplug.linear_attention.pytorch import gated_delta_rule, recurrent_reference

B, T, HK, HV, DK, DV = 2, 150, 2, 4, 16, 8  # 150 tokens: three chunks of 64, the last one cut


def inputs(t=T, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q, k = (torch.nn.functional.normalize(rand(B, t, HK, DK), dim=-1) for _ in range(2))
    g = -torch.rand(B, t, HV, generator=gen, dtype=dtype)  # decays in (e^-1, 1]
    beta = torch.rand(B, t, HV, generator=gen, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, rand(B, t, HV, DV), g, beta)]


def test_chunks_equal_the_recurrence_token_by_token():
    q, k, v, g, beta = inputs()
    got = gated_delta_rule(q, k, v, g, beta).double()
    want = recurrent_reference(q, k, v, g, beta)
    # computed in fp32 over a state summing ~T terms of size ~1: a few fp32 ulps of the output's scale
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_it_computes_what_transformers_chunked_form_computes():
    modeling = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    q, k, v, g, beta = (x.detach().float() for x in inputs())
    want, _ = modeling.torch_chunk_gated_delta_rule(q, k, v, g, beta)
    torch.testing.assert_close(gated_delta_rule(q, k, v, g, beta), want, rtol=1e-5, atol=1e-6)


def test_packed_documents_equal_each_document_alone_outputs_and_gradients():
    bounds = [0, 30, 64, 65, 128, 140, T]  # a document ending on a chunk boundary, one of one token
    doc_ids = torch.zeros(B, T, dtype=torch.int32)
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        doc_ids[:, start:end] = i  # the last, a trailing document as padding is
    args = inputs()
    packed = gated_delta_rule(*args, doc_ids=doc_ids).double()
    grad_out = torch.randn(packed.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(packed, args, grad_out)
    alone, alone_grads = [], [torch.zeros_like(a) for a in args]
    for start, end in zip(bounds[:-1], bounds[1:]):
        part = [a[:, start:end] for a in args]
        out = gated_delta_rule(*part).double()
        for total, grad in zip(alone_grads, torch.autograd.grad(out, part, grad_out[:, start:end])):
            total[:, start:end] += grad
        alone.append(out)
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-6)
    for name, got, want in zip("q k v g beta".split(), grads, alone_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()), msg=name)


def test_a_state_handed_on_continues_the_sequence():
    q, k, v, g, beta = (x.detach() for x in inputs())
    whole = gated_delta_rule(q, k, v, g, beta)
    first, state = gated_delta_rule(*(x[:, :100] for x in (q, k, v, g, beta)), final_state=True)
    rest = gated_delta_rule(*(x[:, 100:] for x in (q, k, v, g, beta)), initial_state=state)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [64, 48])  # doubling blocks; a size not a power of two: a triangular solve
def test_the_ut_inverse_inverts_the_unit_lower_triangle(size):
    from sftplug.linear_attention.pytorch import unit_lower_inverse

    gen = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(3, 2, size, 8, generator=gen, dtype=torch.float64), dim=-1)
    system = keys @ keys.transpose(-1, -2) * torch.rand(3, 2, size, 1, generator=gen, dtype=torch.float64)
    system = system + torch.triu(torch.full((size, size), 7.0, dtype=torch.float64))  # ignored: not below the diagonal
    unit_lower = system.tril(-1) + torch.eye(size, dtype=torch.float64)
    # fp64 products over `size` terms of size <= 1
    torch.testing.assert_close(unit_lower @ unit_lower_inverse(system), torch.eye(size, dtype=torch.float64).expand(
        3, 2, size, size), rtol=0, atol=1e-12)
