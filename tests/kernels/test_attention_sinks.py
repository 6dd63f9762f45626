"""Attention sinks in the Triton attention kernel, under the Triton interpreter.

Output and the gradients of q, k, v and the sinks are compared with the float64 reference
(kernels/attention.py's attention_reference, itself checked against transformers' gpt-oss
formula in tests/attention/test_sinks.py): the kernel's error may be at most twice the
same-dtype PyTorch form's plus a few roundings (conftest.py's assert_close_to_float64).
"""

import pytest
import torch

pytest.importorskip("triton")

from sftplug.kernels.attention import attention_reference, triton_attention  # noqa: E402

pytestmark = pytest.mark.interpreted

NAMES = ("out", "dq", "dk", "dv", "dsinks")


def _inputs(B, HQ, HKV, T, D, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (HQ, HKV, HKV))
    sinks = torch.randn(HQ, generator=g) * 2  # some heads' sinks take most of the probability, some none
    return q, k, v, sinks, torch.randn(B, HQ, T, D, generator=g)


def _doc_ids(rows):
    """[B, T] from each row's (document lengths, padding after); -1 marks padding."""
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), -1)])
                        for lengths, pad in rows])


def _with_sinks(fn):
    return lambda q, k, v, sinks, **options: fn(q, k, v, sinks=sinks, **options)


CASES = [
    # dtype, B, Hq, Hkv, T, D, options
    (torch.float32, 1, 4, 4, 23, 16, dict(causal=True)),
    (torch.float16, 2, 4, 2, 37, 32, dict(causal=True)),
    (torch.float32, 1, 8, 2, 37, 16, dict(causal=False)),
    (torch.float32, 2, 4, 2, 37, 16, dict(causal=True, doc_ids=_doc_ids([([11, 20, 6], 0), ([30], 7)]))),
    (torch.float16, 1, 4, 1, 40, 16, dict(causal=True, window=9)),
    (torch.float32, 2, 4, 2, 37, 32, dict(causal=True, window=7, doc_ids=_doc_ids([([5, 25], 7), ([37], 0)]))),
    (torch.float32, 1, 4, 2, 33, 16, dict(causal=True, softcap=3.0, scale=0.5)),
]


@pytest.mark.parametrize("dtype,B,HQ,HKV,T,D,options", CASES)
def test_sinks_match_the_float64_reference(dtype, B, HQ, HKV, T, D, options, grads_of, assert_close_to_float64):
    q, k, v, sinks, do = _inputs(B, HQ, HKV, T, D, seed=T + D)
    got = grads_of(_with_sinks(triton_attention), (q, k, v, sinks), do, dtype, **options)
    ref64 = grads_of(_with_sinks(attention_reference), (q, k, v, sinks), do, torch.float64, **options)
    same = grads_of(_with_sinks(attention_reference), (q, k, v, sinks), do, dtype, **options)
    assert_close_to_float64(got, ref64, same, dtype, f"{dtype} {HQ}:{HKV} T={T} {sorted(options)}", NAMES)


def test_padding_rows_give_zero_and_no_sink_gradient(grads_of):
    # a padding row sees no key: its softmax is all sink, its output 0 and nothing flows back from it
    q, k, v, sinks, do = _inputs(1, 2, 1, 20, 16, seed=1)
    doc_ids = _doc_ids([([12], 8)])
    out, *_, dsinks = grads_of(_with_sinks(triton_attention), (q, k, v, sinks), do, torch.float32, doc_ids=doc_ids)
    assert (out[:, :, 12:] == 0).all()
    do[:, :, 12:] = 1e3  # gradients arriving at padding rows change nothing
    *_, dsinks_padded = grads_of(_with_sinks(triton_attention), (q, k, v, sinks), do, torch.float32, doc_ids=doc_ids)
    assert torch.equal(dsinks, dsinks_padded)


def test_without_sinks_the_kernel_is_unchanged(grads_of):
    q, k, v, _, do = _inputs(1, 4, 2, 29, 16, seed=2)
    negligible_sinks = torch.full((4,), -1e4)  # exp(s_h) is 0 in fp32: the plain softmax
    plain = grads_of(triton_attention, (q, k, v), do, torch.float32, window=6)
    sunk = grads_of(_with_sinks(triton_attention), (q, k, v, negligible_sinks), do, torch.float32, window=6)
    for name, a, b in zip(NAMES, plain, sunk):
        assert torch.equal(a, b), name
    assert torch.equal(sunk[4], torch.zeros(4))


def test_the_backend_offers_sinks_after_a_first_run_with_them():
    from sftplug.attention import AttentionRequest
    from sftplug.plugins.triton_attention import triton

    request = AttentionRequest("triton", torch.device("cpu"), torch.float32, 32, 4, 2, True, window=7, sinks=True)
    assert triton.check(request) is None


def test_sinks_of_the_wrong_shape_are_refused():
    q = torch.zeros(1, 4, 8, 16)
    with pytest.raises(ValueError, match=r"sinks must be a float tensor of shape \[4\]"):
        triton_attention(q, q[:, :2], q[:, :2], sinks=torch.zeros(2))
