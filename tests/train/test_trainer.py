import json
import re
import shutil

import pytest
import torch

from sftplug.train.loop import train
from sftplug.train.setup import build_run


def first_update_grads(config, registry, quiet):
    """Loss and gradients of the first update of a run (the optimizer step is skipped)."""
    run = build_run(config, registry, echo=quiet)
    grads = {}

    def record():
        grads.update({n: p.grad.clone() for n, p in run.model.named_parameters() if p.requires_grad})

    run.optimizer.step = record
    return run.update(), grads


def test_accumulation_is_exact(small_config, tmp_path, registry, quiet):
    # Rows of the bundled data hold different numbers of target tokens, so averaging
    # per-micro-batch means would differ; the sum / total-targets rule must not.
    one, grads_one = first_update_grads(small_config(out=str(tmp_path / "a"), micro_bsz=8, accum=1), registry, quiet)
    four, grads_four = first_update_grads(small_config(out=str(tmp_path / "b"), micro_bsz=2, accum=4), registry, quiet)
    assert one["target_tokens"] == four["target_tokens"]
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-6)
    for name in grads_one:
        torch.testing.assert_close(grads_four[name], grads_one[name], rtol=1e-5, atol=1e-7)


def test_bf16_never_constructs_a_grad_scaler(small_config, monkeypatch, registry, quiet):
    def forbidden(*args, **kwargs):
        raise AssertionError("GradScaler constructed in a bf16 run")

    monkeypatch.setattr(torch.amp, "GradScaler", forbidden)
    summary = train(small_config(dtype="bf16", steps=2), registry, echo=quiet)
    assert summary["steps"] == 2


def test_fp16_skips_exactly_the_step_with_an_inf_gradient(small_config, tmp_path, registry, quiet):
    run = build_run(small_config(dtype="fp16", steps=4), registry, echo=quiet)
    param = next(p for n, p in run.model.named_parameters() if "lora_B" in n)  # lora_A has no grad at step 0
    poison = {"step": 2}
    param.register_hook(lambda g: torch.full_like(g, float("inf")) if run.step == poison["step"] else g)
    records, snapshots = [], []
    for _ in range(4):
        before = param.detach().clone()
        records.append(run.update())
        snapshots.append(torch.equal(before, param.detach()))
    assert [r["skipped"] for r in records] == [False, False, True, False]
    assert snapshots == [False, False, True, False]  # the skipped update left the weights alone


def test_profile_lines_and_metrics_fields(small_config, tmp_path, registry):
    lines = []
    train(small_config(profile=True, steps=2), registry, echo=lines.append)
    pattern = re.compile(
        r"^\[profile\] forward \d+ ms  backward \d+ ms  optimizer \d+ ms \| [\d,]+ tok/s \| [\d.]+ s/upd$"
    )
    assert sum(bool(pattern.match(line)) for line in lines) == 2
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert {"fwd_ms", "bwd_ms", "opt_ms", "tps", "s_per_update"} <= set(r)
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0


def test_short_run_loss_falls(small_config, registry, quiet):
    summary = train(small_config(steps=25, micro_bsz=4, lr=5e-3, eval_data=None), registry, echo=quiet)
    records = [json.loads(x) for x in open(summary["checkpoint"].rsplit("/checkpoints", 1)[0] + "/metrics.jsonl")]
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.8 * first


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_workers_change_nothing_but_speed(small_config, tmp_path, registry, quiet):
    plain = tmp_path / "plain"
    train(small_config(out=str(plain), steps=6, save_every=3), registry, echo=quiet)
    prefetched = tmp_path / "workers"
    train(small_config(out=str(prefetched), steps=6, workers=2), registry, echo=quiet)
    assert [r["loss"] for r in metrics(prefetched)] == [r["loss"] for r in metrics(plain)]
    # resumed with workers from a checkpoint saved without them: the same stream of batches
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(plain / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    train(small_config(out=str(resumed), steps=6, workers=2, resume="auto"), registry, echo=quiet)
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(plain)][3:]


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "one-document-rows"])
def test_torch_compile_matches_eager(small_config, tmp_path, recwarn, pack, registry, quiet):
    lines = []

    def echo(line, *args, **kwargs):  # once the first update has compiled, any recompilation is an error
        lines.append(line)
        if str(line).startswith("torch.compile: first update took"):
            torch._dynamo.config.error_on_recompile = True

    try:
        summary = train(small_config(out=str(tmp_path / "compiled"), steps=3, torch_compile=True, pack=pack),
                        registry, echo=echo)
    finally:
        torch._dynamo.config.error_on_recompile = False
    train(small_config(out=str(tmp_path / "eager"), steps=3, pack=pack), registry, echo=quiet)
    compiled, eager = metrics(tmp_path / "compiled"), metrics(tmp_path / "eager")
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4)
    assert compiled[0]["includes_compile"] and summary["compile_seconds"] > 0
    assert summary["answer_before"] is not None  # generation ran before the first update...
    # ...eagerly: compilation happens in the first update, and later updates reuse it (no recompile raised)
    assert [bool(r.get("includes_compile")) for r in compiled] == [True, False, False]
    assert any(str(line).startswith("torch.compile: first update took") for line in lines)  # the guard was armed
    assert any(line.startswith("torch.compile: first update took") for line in lines)
    assert not [w for w in recwarn if "Dynamo" in str(w.message)]  # nothing in the traced code surprises it


def test_unpacked_batches_are_cut_to_their_longest_document(small_config, registry, quiet):
    run = build_run(small_config(pack=False, seq_len=128), registry, echo=quiet)
    batch = run.batches.next()
    real = (batch["labels"] != -100).sum(1)
    assert batch["doc_ids"] is None
    assert batch["input_ids"].shape[1] < 128
    assert batch["input_ids"].shape[1] >= int(real.max())


def test_keep_last_prunes_old_checkpoints(small_config, tmp_path, registry, quiet):
    train(small_config(steps=6, save_every=1, keep_last=2), registry, echo=quiet)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["latest", "step-5", "step-6"]


def test_lora_under_bf16_keeps_the_frozen_base_in_bf16_and_trains_in_fp32(small_config, tmp_path, registry, quiet):
    run = build_run(small_config(dtype="bf16", steps=3, out=str(tmp_path / "bf16")), registry, echo=quiet)
    frozen = {p.dtype for p in run.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in run.params} == {torch.float32} and len(run.params) > 0
    records = [run.update() for _ in range(3)]
    states = [s for s in run.optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    # The same first update with an fp32 base (full-precision weights, bf16 autocast) gives
    # the same loss to bf16 rounding.
    full_base, _ = first_update_grads(small_config(dtype="fp32", out=str(tmp_path / "fp32")), registry, quiet)
    assert records[0]["loss"] == pytest.approx(full_base["loss"], rel=2e-2)


def test_fsdp_in_one_process_trains_unsharded_and_says_so(small_config, registry):
    lines = []
    summary = train(small_config(full=True, strategy="fsdp", steps=2), registry, echo=lines.append)
    assert summary["steps"] == 2
    assert any(line.startswith("strategy: fsdp shards across processes; this run has one") for line in lines)
