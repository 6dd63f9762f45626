"""Attention sinks (gpt-oss): the float64 reference against transformers' own formula, the
`chunked` CPU kernel against the reference (output and the gradients of q, k, v and the sinks),
which backends a sinks request may use, and the Attention mixer against GptOssAttention."""

from __future__ import annotations

import pytest
import torch

from sftplug.attention import AttentionRequest
from sftplug.attention.choice import attention_skipped, choose_backend
from sftplug.errors import SftplugError
from sftplug.kernels.attention import attention_reference
from sftplug.kernels.chunked_attention import chunked_attention
from sftplug.model.attention import Attention, KVCache
from sftplug.model.config import AttentionConfig, ModelConfig
from sftplug.plugins.chunked import chunked

B, T, D = 2, 37, 16  # T not a multiple of the chunks
DOC_LENGTHS = [[5, 13, 1, 18], [37]]
NAMES = ("out", "dq", "dk", "dv", "dsinks")


def inputs(hq, hkv, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=dtype) for h in (hq, hkv, hkv))
    sinks = torch.randn(hq, generator=g, dtype=dtype) * 2  # some heads' sinks dominate, some vanish
    return q, k, v, sinks, torch.randn(B, hq, T, D, generator=g, dtype=dtype)


def doc_ids_for(lengths):
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths])


def with_grads(fn, q, k, v, sinks, grad, dtype, **options):
    """[out, dq, dk, dv, dsinks] of ``fn`` on copies of the inputs in ``dtype``."""
    x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, sinks)]
    out = fn(*x[:3], sinks=x[3], **options)
    return [out.detach(), *torch.autograd.grad(out, x, grad.to(dtype))]


def assert_matches_float64(got, want, reduction: int, what: str):
    """fp32 against float64: a few fp32 roundings per term of the longest sum (T keys, or B*T rows
    for a sink's gradient), relative to the largest value."""
    for name, a, r in zip(NAMES, got, want):
        allowed = 4 * reduction * torch.finfo(torch.float32).eps * max(1.0, r.abs().max().item())
        err = (a.double() - r).abs().max().item()
        assert err <= allowed, f"{what} {name}: off by {err:.3g} > {allowed:.3g}"


# -- the reference is transformers' formula ------------------------------------------------


def test_the_reference_is_transformers_gpt_oss_eager_attention():
    modeling = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    q, k, v, sinks, _ = inputs(4, 2)
    allowed = torch.ones(T, T, dtype=torch.bool).tril().triu(-6)  # causal, window of 7
    mask = torch.zeros(T, T, dtype=torch.float64).masked_fill(~allowed, float("-inf"))[None, None]
    module = torch.nn.Module()
    module.sinks, module.num_key_value_groups, module.training = torch.nn.Parameter(sinks), 2, False
    theirs, _ = modeling.eager_attention_forward(module, q, k, v, mask, scaling=D ** -0.5)
    ours = attention_reference(q, k, v, causal=True, window=7, sinks=sinks)
    torch.testing.assert_close(ours, theirs.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_a_sink_only_takes_probability_away():
    # exp(s_h) joins the denominator: the output is the plain one times 1 - P_sink
    q, k, v, sinks, _ = inputs(4, 4)
    plain = attention_reference(q, k, v)
    scores = (q @ k.transpose(-1, -2) * D ** -0.5).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -torch.inf)
    p_sink = torch.sigmoid(sinks[:, None] - scores.logsumexp(-1))[..., None]
    torch.testing.assert_close(attention_reference(q, k, v, sinks=sinks), plain * (1 - p_sink))


# -- the chunked CPU kernel ----------------------------------------------------------------


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa8:2"])
@pytest.mark.parametrize("options", [
    dict(causal=True), dict(causal=False), dict(causal=True, window=6), dict(causal=True, softcap=2.5, scale=0.4),
], ids=["causal", "full", "window", "softcap-scale"])
@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_chunked_matches_the_float64_reference(heads, options, packed):
    q, k, v, sinks, grad = inputs(*heads, seed=len(options))
    doc_ids = doc_ids_for(DOC_LENGTHS) if packed else None
    got = with_grads(chunked, q, k, v, sinks, grad, torch.float32, doc_ids=doc_ids, **options)
    want = with_grads(attention_reference, q, k, v, sinks, grad, torch.float64, doc_ids=doc_ids, **options)
    assert_matches_float64(got, want, B * T, f"{heads} {options} packed={packed}")


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_every_chunk_length_gives_the_same_sinks_gradient(chunk):
    q, k, v, sinks, grad = inputs(8, 2, seed=chunk)
    doc_ids = doc_ids_for(DOC_LENGTHS)
    got = with_grads(chunked_attention, q, k, v, sinks, grad, torch.float64, chunk=chunk, doc_ids=doc_ids, window=9)
    want = with_grads(attention_reference, q, k, v, sinks, grad, torch.float64, doc_ids=doc_ids, window=9)
    for name, a, r in zip(NAMES, got, want):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12, msg=name)


def test_chunked_sinks_pass_gradcheck():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 9, 4, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    sinks = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda *x: chunked_attention(*x[:3], sinks=x[3], chunk=4, doc_ids=doc_ids,
                                                                 window=3), (q, k, v, sinks))


# -- which backends a sinks request may use --------------------------------------------------


def test_every_backend_but_sdpa_applies_sinks():
    from sftplug.plugins import sdpa
    from sftplug.plugins.flex_attention import flex
    from sftplug.plugins.triton_attention import triton

    assert chunked.sinks and triton.sinks and flex.sinks
    # SDPA takes no logit for the denominator alone, and returns no log-sum-exp to rescale by
    assert not any(b.sinks for b in (sdpa.flash, sdpa.efficient, sdpa.cudnn, sdpa.math))


def test_the_cpu_machine_runs_sinks_in_chunked_and_says_why_not_the_others(registry):
    asked = AttentionRequest("auto", torch.device("cpu"), torch.float32, 64, 8, 2, True, 512, sinks=True)
    choice = choose_backend(registry.hook, asked, attention_skipped(registry))
    assert choice.backend.name == "chunked" and "packed rows, sinks on cpu" in choice.why_chosen
    for name in ("flash", "math"):  # SDPA has no way to add a logit to the denominator only
        assert choice.rejected[name] == (f"{name} cannot apply attention sinks (a learned logit per head in the "
                                         "softmax's denominator), which this model's attention uses")
    with pytest.raises(SftplugError, match="^attention backend 'math' cannot run .*math cannot apply attention sinks"):
        choose_backend(registry.hook, AttentionRequest("math", torch.device("cpu"), torch.float32, 64, 8, 2,
                                                       sinks=True))


# -- the Attention mixer ----------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, WINDOW = 32, 4, 2, 8, 5


def mixer(window: int) -> Attention:
    config = ModelConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=48, n_layers=1, n_heads=HEADS,
                         n_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                         attention=AttentionConfig(qkv_bias=True, o_bias=True, sinks=True, windows=(window,)))
    attention = Attention(config).double()
    g = torch.Generator().manual_seed(window)
    with torch.no_grad():
        for p in attention.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    attention.backend = chunked
    return attention


def half_angles(t: int):
    """cos, sin [1, T, 1, D/2] as sftplug's Transformer.rope makes them (HF's are [1, T, D/2])."""
    freqs = torch.arange(t, dtype=torch.float64)[:, None] * 10000.0 ** -(torch.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    return freqs.cos()[None, :, None], freqs.sin()[None, :, None]


def test_the_mixer_has_sinks_and_an_output_bias_under_gpt_oss_names():
    attention = mixer(0)
    names = dict(attention.named_parameters())
    assert names["sinks"].shape == (HEADS,) and names["o.bias"].shape == (HIDDEN,)
    assert attention.options(T).keys() == {"sinks"} and attention.options(T)["sinks"] is names["sinks"]
    plain = Attention(ModelConfig(hidden_size=HIDDEN, n_heads=HEADS, n_kv_heads=KV_HEADS, n_layers=1))
    assert plain.sinks is None and plain.o.bias is None and "sinks" not in plain.options(T)


@pytest.mark.parametrize("window", [0, WINDOW], ids=["full", "sliding"])
def test_the_mixer_matches_transformers_gpt_oss_attention(window):
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    from transformers import GptOssConfig

    ours = mixer(window)
    config = GptOssConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                          head_dim=HEAD_DIM, num_hidden_layers=1, attention_bias=True, sliding_window=WINDOW,
                          layer_types=["sliding_attention" if window else "full_attention"])
    config._attn_implementation = "eager"
    theirs = gpt_oss.GptOssAttention(config, 0).double()
    q_w, k_w, v_w = ours.qkv.weight.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM])
    q_b, k_b, v_b = ours.qkv.bias.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM])
    with torch.no_grad():
        for proj, w, b in ((theirs.q_proj, q_w, q_b), (theirs.k_proj, k_w, k_b), (theirs.v_proj, v_w, v_b),
                           (theirs.o_proj, ours.o.weight, ours.o.bias)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        theirs.sinks.copy_(ours.sinks)
    x = torch.randn(2, 21, HIDDEN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cos, sin = half_angles(21)
    allowed = torch.ones(21, 21, dtype=torch.bool).tril()
    if window:
        allowed = allowed.triu(1 - window)
    mask = torch.zeros(21, 21, dtype=torch.float64).masked_fill(~allowed, float("-inf"))[None, None]
    want, _ = theirs(x, (cos[:, :, 0], sin[:, :, 0]), mask)
    torch.testing.assert_close(ours(x, cos, sin), want, rtol=1e-10, atol=1e-10)
    ours(x, cos, sin).square().sum().backward()
    assert ours.sinks.grad is not None and ours.sinks.grad.abs().min() > 0  # every head's sink is trained


@pytest.mark.parametrize("window", [0, WINDOW], ids=["full", "sliding"])
def test_generation_with_a_cache_applies_the_sinks(window):
    attention = mixer(window)
    x = torch.randn(1, 12, HIDDEN, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cos, sin = half_angles(12)
    whole = attention(x, cos, sin)
    cache = KVCache()
    prefill = attention(x[:, :7], cos[:, :7], sin[:, :7], cache=cache)
    steps = [attention(x[:, i:i + 1], cos[:, i:i + 1], sin[:, i:i + 1], cache=cache) for i in range(7, 12)]
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), whole, rtol=1e-10, atol=1e-10)


def test_a_gpt_oss_shaped_model_attaches_chunked_and_trains_every_sink(registry):
    from sftplug.attention.choice import attach
    from sftplug.model.transformer import Transformer

    config = ModelConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=48, n_layers=2, n_heads=HEADS,
                         n_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                         attention=AttentionConfig(qkv_bias=True, o_bias=True, sinks=True, windows=(WINDOW, 0)))
    model = Transformer(config)
    model.init_weights(0)
    assert model.attention_options(32) == {"window": WINDOW, "sinks": True}
    assert {f"layers.{i}.attn.sinks" for i in (0, 1)} <= set(model.state_dict())
    choice = attach(model, registry, "auto", "cpu", torch.float32, packed=True, seq_len=32)
    assert choice.backend.name == "chunked" and "sinks" in choice.why_chosen
    tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.tensor([[0] * 20 + [1] * 12, [0] * 32])
    model.hidden_states(tokens, doc_ids=doc_ids).square().mean().backward()
    for block in model.layers:
        assert block.attn.sinks.grad.abs().min() > 0
