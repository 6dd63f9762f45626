"""load_model: the first loader that knows the source, then attention chosen once, in the same pass."""

import pytest
import torch

import sftplug
from sftplug.attention import AttentionBackend
from sftplug.errors import SftplugError
from sftplug.loading import load_model
from sftplug.registry import build_registry


class Counting(AttentionBackend):
    """A backend that counts how often the core asks it about a request."""

    name, priority = "counting", 1000

    def __init__(self):
        self.offers = self.checks = 0

    @sftplug.hookimpl
    def select_attention(self, request):
        self.offers += 1
        return self

    def check(self, request):
        self.checks += 1
        return None

    def __call__(self, q, k, v, *, causal=True, doc_ids=None):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def test_a_loaded_model_comes_with_its_attention_chosen_once():
    registry = build_registry(entrypoints=False)
    counting = Counting()
    registry.add("counting", lambda: counting, source="test")
    loaded = load_model("tiny", registry=registry)
    assert loaded.attention.backend is counting and "counting (auto" in loaded.attention.why_chosen
    assert {block.attn.backend for block in loaded.model.layers} == {counting}
    assert (counting.offers, counting.checks) == (1, 1)  # one request, one question
    with torch.no_grad():
        assert loaded.model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 1024)


def test_attention_none_leaves_the_choice_to_the_caller(registry):
    loaded = load_model("tiny", registry=registry, attention=None)
    assert loaded.attention is None and {block.attn.backend for block in loaded.model.layers} == {None}


def test_a_source_no_loader_knows_is_one_line(tmp_path, registry):
    with pytest.raises(SftplugError, match="not a built-in preset, an HF checkpoint folder or an sftplug checkpoint"):
        load_model(str(tmp_path / "nothing-here"), registry=registry)


def test_a_bf16_preset_keeps_its_rope_frequencies_in_fp32(registry):
    fp32 = load_model("tiny", registry=registry, attention=None).model
    bf16 = load_model("tiny", dtype=torch.bfloat16, registry=registry, attention=None).model
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    assert bf16.inv_freq.dtype == torch.float32 and torch.equal(bf16.inv_freq, fp32.inv_freq)
