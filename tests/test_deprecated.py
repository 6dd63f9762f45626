"""Old names that third-party code may still use keep working, each with a DeprecationWarning
naming the new one."""

import warnings

import pytest
import torch

from sftplug import hookimpl
from sftplug.attention import AttentionBackend, AttentionRequest, Priority
from sftplug.attention.choice import choose_backend, survey
from sftplug.fused import FusedOp
from sftplug.fused.choice import choose_fused_ops
from sftplug.fused.op import FusedOpsRequest
from sftplug.loading import load_model
from sftplug.offers import priority_of
from sftplug.registry import Registry, build_registry

CPU = AttentionRequest("auto", torch.device("cpu"), torch.float32, 64, 8, 2)
OPS_REQUEST = FusedOpsRequest(device=torch.device("cpu"), dtype=torch.float32, hidden_size=32, intermediate_size=64,
                              head_dim=16, rotary_dim=16, n_heads=4, n_kv_heads=2, vocab_size=100, tokens=32)


class Unavailable:
    def why_unavailable(self):
        return "needs a quantum computer"


def test_plugin_info_reason_is_why_unavailable():
    registry = Registry()
    info = registry.add("quantum", Unavailable)
    with pytest.warns(DeprecationWarning, match="PluginInfo.reason is deprecated: use PluginInfo.why_unavailable"):
        assert info.reason == info.why_unavailable == "needs a quantum computer"
    assert info.as_dict()["reason"] == "needs a quantum computer"  # `sftplug plugins --json` is unchanged


def test_attention_choice_reason_is_why_chosen(registry):
    choice = choose_backend(registry.hook, CPU)
    renamed = "AttentionChoice.reason is deprecated: use AttentionChoice.why_chosen"
    with pytest.warns(DeprecationWarning, match=renamed):
        assert choice.reason == choice.why_chosen


def test_fused_choice_reasons_is_why_chosen(registry):
    choice = choose_fused_ops(registry.hook, OPS_REQUEST, "none")
    with pytest.warns(DeprecationWarning, match="FusedChoice.reasons is deprecated: use FusedChoice.why_chosen"):
        assert choice.reasons == choice.why_chosen == {op: "--fused none" for op in choice.forms}


class BareNumber(AttentionBackend):
    """An attention backend of the days when priority_for returned a bare int."""

    name = "bare"

    def priority_for(self, request):
        return 99

    @hookimpl
    def select_attention(self, request):
        return self


def test_a_bare_number_from_priority_for_is_still_a_priority():
    registry = Registry()
    registry.add("bare", BareNumber)
    renamed = "BareNumber.priority_for returning a bare number is deprecated: use sftplug.offers.Priority"
    with pytest.warns(DeprecationWarning, match=renamed):
        offer = survey(registry.hook, CPU)[0]
    assert (offer.name, offer.priority, offer.why_chosen, offer.why_unavailable) == ("bare", 99, "", None)


class PairForm(FusedOp):
    """A fused form that returns a plain (priority, why) pair, as tests/fixtures' hello plugin does: the
    shape of a Priority, taken without a warning."""

    op, name = "rmsnorm", "pair"

    def priority_for(self, request):
        return 5, "claims to be faster"


def test_a_plain_pair_from_priority_for_is_a_priority():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert priority_of(PairForm(), OPS_REQUEST) == Priority(5, "claims to be faster")


class OldLoader:
    """A load_state plugin that names its base loader load_model, as plugins did before load_base."""

    @hookimpl
    def load_state(self, source, load_model):
        return load_model("tiny") if source == "tiny-again" else None


def test_a_loader_that_declares_load_model_gets_the_base_loader():
    registry = build_registry(entrypoints=False)
    with pytest.warns(DeprecationWarning, match="load_state's argument load_model is deprecated: use load_base"):
        registry.add("old-loader", OldLoader)
    assert registry.info("old-loader").available
    loaded = load_model("tiny-again", registry=registry, attention=None)
    assert loaded.source == "tiny" and loaded.model.config == load_model("tiny", attention=None).model.config
