"""Old names that third-party code may still use keep working, each with a DeprecationWarning
naming the new one."""

import pytest
import torch

from sftplug.attention import AttentionRequest
from sftplug.attention.choice import choose_backend
from sftplug.fused.choice import choose_fused_ops
from sftplug.fused.op import FusedOpsRequest
from sftplug.registry import Registry


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
    request = AttentionRequest("auto", torch.device("cpu"), torch.float32, 64, 8, 2)
    choice = choose_backend(registry.hook, request)
    renamed = "AttentionChoice.reason is deprecated: use AttentionChoice.why_chosen"
    with pytest.warns(DeprecationWarning, match=renamed):
        assert choice.reason == choice.why_chosen


def test_fused_choice_reasons_is_why_chosen(registry):
    request = FusedOpsRequest(device=torch.device("cpu"), dtype=torch.float32, hidden_size=32, intermediate_size=64,
                              head_dim=16, rotary_dim=16, n_heads=4, n_kv_heads=2, vocab_size=100, tokens=32)
    choice = choose_fused_ops(registry.hook, request, "none")
    with pytest.warns(DeprecationWarning, match="FusedChoice.reasons is deprecated: use FusedChoice.why_chosen"):
        assert choice.reasons == choice.why_chosen == {op: "--fused none" for op in choice.forms}
