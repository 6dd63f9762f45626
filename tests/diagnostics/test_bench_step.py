"""`sftplug bench step` times sftplug, its variants and HF+PEFT on W0 and reports their ratios."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow
def test_bench_step_w0_reports_every_side_and_the_ratios():
    cmd = [sys.executable, "-m", "sftplug", "bench", "step", "--workload", "W0", "--rounds", "1", "--steps", "1",
           "--warmup", "1", "--variant", "workers2", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert list(result["sides"]) == ["sftplug", "sftplug+workers2", "hf+peft"]
    peer = result["sides"]["hf+peft"]
    for side, ratio in result["ratios"].items():
        m = result["sides"][side]
        assert m["tps"] > 0 and m["fwd_ms"] > 0 and m["bwd_ms"] > 0 and m["peak_mem_mib"] > 0
        assert ratio["tps"] == pytest.approx(m["tps"] / peer["tps"])
        assert ratio["memory"] == pytest.approx(m["peak_mem_mib"] / peer["peak_mem_mib"])
    assert result["tps_ratio"] == result["ratios"]["sftplug"]["tps"] and result["errors"] == {}
    progress = [line for line in done.stderr.splitlines() if line.startswith("round 1/1 ")]
    assert [line.split(":")[0] for line in progress] == ["round 1/1 sftplug", "round 1/1 sftplug+workers2",
                                                          "round 1/1 hf+peft"]  # each side as it finishes


def test_a_failing_side_is_reported_and_the_others_still_count(monkeypatch):
    from sftplug.diagnostics import step_bench

    def side(name, *args):
        if name == "sftplug+compile":
            return "sftplug+compile failed: RuntimeError: out of memory"
        return step_bench.SideResult(name, 100.0 if name == "sftplug" else 50.0, 1.0, 2.0, 0.5, 10.0)

    monkeypatch.setattr(step_bench, "run_side_in_child", side)
    result = step_bench.bench_step("W0", rounds=1, variants=("compile",))
    assert list(result["sides"]) == ["sftplug", "hf+peft"] and result["tps_ratio"] == 2.0
    assert result["errors"] == {"sftplug+compile": "sftplug+compile failed: RuntimeError: out of memory"}
    assert "failed: sftplug+compile failed: RuntimeError: out of memory" in step_bench.format_step_table(result)


@pytest.mark.parametrize("workload", ["W0-MoE", "W0-Hybrid"])
def test_the_sides_build_the_same_model(workload, tmp_path):
    """The peer's config (Qwen3-MoE; Qwen3.5 with its Gated DeltaNet layers) reads back as the workload's
    preset; on the peer's weights both sides count the same parameters and the same trainable LoRA values
    and start from the same loss."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from sftplug.config import ASSETS
    from sftplug.diagnostics import step_bench
    from sftplug.hf.config import config_from_hf
    from sftplug.loading import load_model
    from sftplug.model.config import ModelConfig
    from sftplug.model.lora import apply_lora, lm_head_weight, lora_param_counts
    from sftplug.model.transformer import Transformer
    from sftplug.train.loss import IGNORE, target_loss_sum

    preset = ModelConfig.preset(step_bench.WORKLOADS[workload]["preset"])
    hf_config = step_bench.peer_config(preset)
    assert hf_config.model_type == preset.architecture and not getattr(hf_config, "output_router_logits", False)
    assert dataclasses.replace(config_from_hf(hf_config.to_dict()), extra={}) == preset

    base, _ = step_bench.peer_model(workload, full=True)  # the peer's seeded fp32 model, before PEFT
    base.save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(ASSETS).save_pretrained(tmp_path)  # a folder needs a tokenizer
    ours = load_model(str(tmp_path), dtype=torch.float32).model
    assert dataclasses.replace(ours.config, extra={}) == preset
    count = lambda model, trainable=False: sum(p.numel() for p in model.parameters()  # noqa: E731
                                               if p.requires_grad or not trainable)
    assert count(ours) == count(base) == count(Transformer(preset))  # the bench's sftplug side builds the preset

    ids = step_bench.synthetic_tokens(preset.vocab_size, 2, 64)[:, :-1]
    modules, parameters = step_bench.peft_targets(preset)
    theirs = get_peft_model(base, LoraConfig(r=step_bench.LORA["r"], lora_alpha=step_bench.LORA["alpha"],
                                             target_modules=modules, target_parameters=parameters))
    ours.requires_grad_(False)
    ours = apply_lora(ours, step_bench.LORA["r"], step_bench.LORA["alpha"], 0.0, (*modules, *parameters))
    assert lora_param_counts(ours)[0] == count(theirs, trainable=True) == theirs.get_nb_trainable_parameters()[0]
    if preset.linear_attention.key_heads:  # the Gated DeltaNet layers' projections take LoRA too
        assert any(".linear_attn.in_proj_qkv.lora_A" in name for name, _ in theirs.named_parameters())

    with torch.no_grad():
        labels = ids.clone()
        labels[:, :16] = IGNORE  # HF shifts labels inside: sftplug's first 15 targets masked alike
        ref = theirs(input_ids=ids, labels=labels).loss
        ours_labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE)], dim=1)
        ours_labels[:, :15] = IGNORE
        total, n = target_loss_sum(ours(ids, hidden_only=True), ours_labels, lm_head_weight(ours))
    assert float((total / n - ref).abs() / ref.abs()) <= 1e-5  # fp32: the same model up to rounding


@pytest.mark.slow
def test_bench_step_exits_1_when_a_side_failed():
    # sftplug's side refuses the unknown backend in its own process; the peer's side still runs and is reported
    cmd = [sys.executable, "-m", "sftplug", "bench", "step", "--workload", "W0", "--rounds", "1", "--steps", "1",
           "--warmup", "0", "--attention", "warp-drive", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert list(result["sides"]) == ["hf+peft"] and result["sides"]["hf+peft"]["tps"] > 0
    assert list(result["errors"]) == ["sftplug"]
    assert "unknown attention backend 'warp-drive'" in result["errors"]["sftplug"]
