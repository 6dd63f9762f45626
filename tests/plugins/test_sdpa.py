"""The SDPA backends against a float64 reference: forward and gradients, causal and not,
GQA, packed rows; and that each call runs in its own kernel only (no silent fallback)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from sftplug import probes
from sftplug.attention import AttentionRequest
from sftplug.dtypes import dtype_name
from sftplug.errors import SftplugError
from sftplug.kernels.packed_documents import bucket_length
from sftplug.plugins import sdpa

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = {"flash": sdpa.flash, "efficient": sdpa.efficient, "cudnn": sdpa.cudnn, "math": sdpa.math}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {torch.float32: 2e-5 if DEVICE.type == "cpu" else 5e-3, torch.bfloat16: 3e-2}  # TF32 may be on for CUDA
B, T, D = 2, 40, 32  # T not a multiple of any block size
DOC_LENGTHS = [[7, 13, 1, 19], [40]]  # row 1 holds one document, row 0 four (one of length 1)

# The op each kernel shows in the profiler, on this device.
KERNEL_OPS = {
    "flash": "aten::_scaled_dot_product_flash_attention" + ("_for_cpu" if DEVICE.type == "cpu" else ""),
    "efficient": "aten::_scaled_dot_product_efficient_attention",
    "cudnn": "aten::_scaled_dot_product_cudnn_attention",
    "math": "aten::_scaled_dot_product_attention_math",
}


def usable(name: str, dtype: torch.dtype, heads=(4, 4)) -> sdpa.SdpaBackend:
    backend = BACKENDS[name]
    why_unavailable = backend.why_unavailable() or backend.check(AttentionRequest(name, DEVICE, dtype, D, *heads))
    if why_unavailable:
        pytest.skip(f"{name} {dtype_name(dtype)} not usable here: {why_unavailable}")
    return backend


def doc_ids_for(lengths: list[list[int]]) -> torch.Tensor:
    rows = [torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths]
    return torch.stack(rows).to(DEVICE)


def reference(q, k, v, causal: bool, doc_ids=None, window: int = 0, scale: float | None = None):
    """Plain float64 attention with an explicit mask (causal, window: i - window < j <= i, documents)."""
    q, k, v = (x.double() for x in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)  # [B, H, T, T]
    t = q.shape[2]
    allowed = torch.ones(t, t, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    if window:
        allowed = allowed.triu(1 - window)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


def inputs(dtype, hq, hkv, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(B, h, T, D, generator=g).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    return make(hq), make(hkv), make(hkv), torch.randn(B, hq, T, D, generator=g).to(DEVICE, dtype)


def run(fn, q, k, v, grad, **kwargs):
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v, **kwargs)
    out.backward(grad.to(out.dtype))
    return out.detach(), q.grad.detach(), k.grad.detach(), v.grad.detach()


def close(actual, expected, dtype, what):
    err = (actual.double() - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1.0)
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 2)], ids=["mha", "gqa4:2", "gqa8:2"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("name", list(BACKENDS))
def test_backend_matches_float64_reference(name, dtype, causal, heads, packed):
    dtype = DTYPES[dtype]
    backend = usable(name, dtype, heads)
    q, k, v, grad = inputs(dtype, *heads)
    doc_ids = doc_ids_for(DOC_LENGTHS) if packed else None
    got = run(backend, q, k, v, grad, causal=causal, doc_ids=doc_ids)
    want = run(lambda *a, **kw: reference(*a, **kw), q, k, v, grad.double(), causal=causal, doc_ids=doc_ids)
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        close(a, b, dtype, f"{name} {what}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_packed_rows_equal_per_document_outputs(name, causal):
    backend = usable(name, torch.float32, (8, 2))
    q, k, v, grad = inputs(torch.float32, 8, 2, seed=1)
    doc_ids = doc_ids_for(DOC_LENGTHS)
    packed = run(backend, q, k, v, grad, causal=causal, doc_ids=doc_ids)
    for b, lengths in enumerate(DOC_LENGTHS):
        start = 0
        for n in lengths:
            sl = (slice(b, b + 1), slice(None), slice(start, start + n))
            qd, kd, vd = (x[sl].detach().clone().requires_grad_() for x in (q, k, v))
            alone = run(backend, qd, kd, vd, grad[sl], causal=causal)
            for what, whole, part in zip(("out", "dq", "dk", "dv"), packed, alone):
                torch.testing.assert_close(whole[sl], part, atol=1e-5, rtol=1e-5, msg=f"{what} of document {b}/{start}")
            start += n


def test_packed_rows_never_build_a_t_by_t_mask(monkeypatch):
    backend = usable("math", torch.float32, (4, 2))
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((tuple(q.shape), attn_mask))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", spy)
    lengths = [[7, 13, 1, 19], [10, 10, 10, 10]]
    q, k, v, grad = inputs(torch.float32, 4, 2)
    backend(q, k, v, causal=True, doc_ids=doc_ids_for(lengths))
    assert all(mask is None for _, mask in calls)
    longest = max(bucket_length(n, T) for row in lengths for n in row)
    assert max(shape[2] for shape, _ in calls) == longest < T  # no call sees a whole packed row
    assert len(calls) == len({bucket_length(n, T) for row in lengths for n in row})  # one call per bucket


def profiled_ops(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_each_call_runs_its_own_kernel_only(name, packed):
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    backend = usable(name, dtype, (4, 2))
    q, k, v, grad = inputs(dtype, 4, 2)
    doc_ids = doc_ids_for(DOC_LENGTHS) if packed else None
    ops = profiled_ops(lambda: backend(q, k, v, causal=True, doc_ids=doc_ids).backward(grad))
    assert KERNEL_OPS[name] in ops
    assert not {op for other, op in KERNEL_OPS.items() if other != name} & ops


def test_global_switches_cannot_push_a_backend_onto_math():
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    backend = usable("flash", dtype)
    q, k, v, grad = inputs(dtype, 4, 4)
    flags = probes.sdpa_global_flags()
    switches = {
        "flash": torch.backends.cuda.enable_flash_sdp,
        "efficient": torch.backends.cuda.enable_mem_efficient_sdp,
        "cudnn": getattr(torch.backends.cuda, "enable_cudnn_sdp", None),
    }
    for switch in filter(None, switches.values()):
        switch(False)  # what a script acting on SDPA_BACKEND=math does
    try:
        plain = profiled_ops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        ours = profiled_ops(lambda: backend(q, k, v, causal=True).backward(grad))
    finally:
        for name, switch in switches.items():
            if switch is not None:
                switch(flags.get(name, True))
    assert KERNEL_OPS["math"] in plain  # plain SDPA obeys the switch and quietly runs math
    assert KERNEL_OPS["flash"] in ours and KERNEL_OPS["math"] not in ours


def test_gqa_is_native_where_the_kernel_supports_it(monkeypatch):
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    backend = usable("flash", dtype, (8, 2))
    assert backend.gqa_mode(DEVICE, dtype, D) == "native"

    def no_copies(*args):
        raise AssertionError("K/V were repeated although the kernel takes GQA natively")

    monkeypatch.setattr(sdpa, "repeat_kv", no_copies)
    q, k, v, grad = inputs(dtype, 8, 2)
    ops = profiled_ops(lambda: backend(q, k, v, causal=True, doc_ids=doc_ids_for(DOC_LENGTHS)).backward(grad))
    assert "aten::repeat_interleave" not in ops


def test_a_backend_that_cannot_run_the_inputs_raises_instead_of_falling_back():
    if DEVICE.type == "cpu":
        backend, dtype = sdpa.efficient, torch.float32  # no efficient kernel on the CPU
        expected = "runs only on CUDA GPUs"
    else:
        backend, dtype = sdpa.flash, torch.float32  # CUDA flash takes fp16/bf16 only
        expected = "flash needs fp16/bf16"
    q, k, v, _ = inputs(dtype, 4, 4)
    with pytest.raises(SftplugError) as err:
        backend(q, k, v, causal=True)
    message = str(err.value)
    assert message.startswith(f"{backend.name} attention cannot run") and expected in message
    assert "never falls back" in message


def test_cpu_machine_lists_flash_and_math_usable_and_says_why_not_efficient_and_cudnn():
    if torch.cuda.is_available():
        pytest.skip("describes a CPU-only machine")
    assert sdpa.flash.why_unavailable() is None and sdpa.math.why_unavailable() is None
    for backend in (sdpa.efficient, sdpa.cudnn):
        why_unavailable = backend.why_unavailable()
        assert why_unavailable.startswith(f"{backend.name} attention runs only on CUDA GPUs")
        assert "CPU-only" in why_unavailable or "no CUDA GPU" in why_unavailable


def test_auto_order_follows_the_gpu_generation():
    cpu = AttentionRequest("auto", torch.device("cpu"), torch.float32, 64, 4, 4)
    assert sdpa.flash.priority_for(cpu).value > sdpa.math.priority_for(cpu).value
    order = sorted(sdpa.PRIORITIES["sm90+"], key=sdpa.PRIORITIES["sm90+"].get, reverse=True)
    assert order == ["cudnn", "flash", "efficient", "math"]
    order = sorted(sdpa.PRIORITIES["sm80"], key=sdpa.PRIORITIES["sm80"].get, reverse=True)
    assert order == ["flash", "cudnn", "efficient", "math"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA rules")
def test_cuda_messages_say_what_each_kernel_needs():
    fp32 = AttentionRequest("flash", DEVICE, torch.float32, 64, 4, 4)
    assert sdpa.flash.check(fp32).startswith("flash needs fp16/bf16") or not probes.flash_built()
    assert sdpa.cudnn.check(fp32).startswith(("cudnn needs fp16/bf16", "cudnn attention needs", "this torch"))
    assert sdpa.math.check(fp32) is None


def test_probes_work_in_any_mode_and_leave_the_run_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with torch.no_grad():  # e.g. the first attention call of a run is its held-out eval
        assert probes.sdpa_why_unavailable("math", DEVICE.type, torch.float32, 24, gqa=True) is None
    with torch.inference_mode():
        assert probes.sdpa_why_unavailable("math", DEVICE.type, torch.float32, 40) is None
    assert torch.equal(torch.rand(3), expected)


def test_cudnn_leads_hopper_only_after_matching_flash_and_never_for_packed_rows(monkeypatch):
    monkeypatch.setattr(sdpa, "gpu_generation", lambda device: "sm90+")
    verdict = {"answer": None}
    asked = []

    def parity(backend, reference, dtype, head_dim):
        asked.append((backend, reference, dtype, head_dim))
        return verdict["answer"]

    monkeypatch.setattr(probes, "sdpa_parity", parity)

    def request(packed=False, dtype=torch.bfloat16):
        return AttentionRequest("auto", torch.device("cuda"), dtype, 128, 32, 8, packed)

    flash = sdpa.flash.priority_for(request()).value
    assert sdpa.cudnn.priority_for(request()).value > flash and asked == [("cudnn", "flash", torch.bfloat16, 128)]
    assert sdpa.cudnn.priority_for(request(packed=True)).value < flash  # packed rows go to flash
    verdict["answer"] = "cudnn differs from flash at T=704 (scale 1): dq off by 3.0e-01"
    assert sdpa.cudnn.priority_for(request()).value < flash


# -- a custom scale and sliding windows -------------------------------------------------------

OPTIONS = {  # windows of 9 < T cross the documents of DOC_LENGTHS (7, 13, 1, 19)
    "scale": dict(scale=0.3),
    "packed-scale": dict(scale=0.3, packed=True),
    "window": dict(window=9),
    "packed-window": dict(window=9, packed=True),
    "packed-window-scale": dict(window=9, scale=0.3, packed=True),
}


@pytest.mark.parametrize("case", list(OPTIONS))
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("name", list(BACKENDS))
def test_scale_and_window_match_float64_reference(name, dtype, case):
    dtype, options = DTYPES[dtype], dict(OPTIONS[case])
    packed = options.pop("packed", False)
    backend = usable(name, dtype, (8, 2))
    if "window" in options and not backend.sliding_window:
        pytest.skip(f"{name} does not declare sliding windows (refused by the contract, tested below)")
    q, k, v, grad = inputs(dtype, 8, 2, seed=3)
    doc_ids = doc_ids_for(DOC_LENGTHS) if packed else None
    got = run(backend, q, k, v, grad, causal=True, doc_ids=doc_ids, **options)
    want = run(reference, q, k, v, grad.double(), causal=True, doc_ids=doc_ids, **options)
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        close(a, b, dtype, f"{name} {case} {what}")


def test_every_kernel_takes_a_scale_only_efficient_and_math_a_window_and_none_a_softcap():
    assert all(backend.custom_scale for backend in BACKENDS.values())
    assert {name for name, backend in BACKENDS.items() if backend.sliding_window} == {"efficient", "math"}
    assert not any(backend.softcap for backend in BACKENDS.values())


def test_the_contract_refuses_what_a_kernel_does_not_declare(registry):
    from sftplug.attention.choice import choose_backend

    def choose(name, **options):
        request = AttentionRequest(name, torch.device("cpu"), torch.float32, D, 8, 2, True, T, **options)
        return choose_backend(registry.hook, request)

    uses = "which this model's attention uses"
    assert choose("flash", scale=0.3).backend is sdpa.flash
    with pytest.raises(SftplugError, match=f"flash cannot apply a sliding window \\(9 keys\\), {uses}"):
        choose("flash", window=9)
    assert choose("math", window=9).backend is sdpa.math
    with pytest.raises(SftplugError, match=f"math cannot apply soft-capped scores \\(cap 50\\), {uses}"):
        choose("math", softcap=50.0)
    q, k, v, _ = inputs(torch.float32, 4, 4)
    with pytest.raises(SftplugError, match="flash attention cannot apply a sliding window"):
        sdpa.flash(q, k, v, window=9)  # called anyway: refused, not run without the window


def test_packed_windows_build_one_band_mask_per_bucket_never_t_by_t(monkeypatch):
    backend = usable("math", torch.float32, (4, 2))
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.shape[2], None if attn_mask is None else tuple(attn_mask.shape), kwargs["is_causal"]))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", spy)
    q, k, v, _ = inputs(torch.float32, 4, 2)
    backend(q, k, v, causal=True, doc_ids=doc_ids_for([[7, 13, 1, 19], [10, 10, 10, 10]]), window=9)
    assert calls and all(mask == (L, L) and not is_causal for L, mask, is_causal in calls)
    assert max(L for L, _, _ in calls) < T
