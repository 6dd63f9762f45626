import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sftplug.checkpoint import folders
from sftplug.checkpoint.run_state import resume, save_checkpoint
from sftplug.errors import SftplugError
from sftplug.train.loop import train


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def lrs(out):
    return [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out, step):
    return load_file(str(out / "checkpoints" / f"step-{step}" / "model.safetensors"))


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_resume_continues_bitwise(small_config, tmp_path, full, registry, quiet):
    straight = small_config(out=str(tmp_path / "a"), steps=12, save_every=6, accum=2, lora_dropout=0.1, full=full)
    train(straight, registry, echo=quiet)
    # A second run that has only the step-6 checkpoint, as if the first had died after it.
    resumed_out = tmp_path / "b"
    (resumed_out / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-6", resumed_out / "checkpoints" / "step-6")
    resumed = small_config(out=str(resumed_out), steps=12, save_every=6, accum=2, lora_dropout=0.1, full=full,
                           resume="auto")
    train(resumed, registry, echo=quiet)
    assert losses(resumed_out) == losses(tmp_path / "a")[6:]
    a, b = final_weights(tmp_path / "a", 12), final_weights(resumed_out, 12)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_longer_resume_keeps_the_lr_curve_continuous(small_config, tmp_path, registry, quiet):
    out = tmp_path / "run"
    train(small_config(out=str(out), steps=8, warmup=2), registry, echo=quiet)
    train(small_config(out=str(out), steps=16, warmup=2, resume="auto"), registry, echo=quiet)
    curve = lrs(out)
    assert len(curve) == 16
    steps = [b - a for a, b in zip(curve[7:], curve[8:])]
    assert curve[8] < curve[7]  # no jump back up, no second warmup
    assert all(d <= 1e-12 for d in steps)
    assert max(abs(d) for d in steps) < 2 * abs(curve[7] - curve[6]) + 1e-9
    assert curve[-1] == pytest.approx(3e-4, rel=0.05)  # still decays to the configured end


def test_changed_setting_is_refused(small_config, tmp_path, registry, quiet):
    out = tmp_path / "run"
    train(small_config(out=str(out), steps=2), registry, echo=quiet)
    with pytest.raises(SftplugError, match="--lora-r is 8 but .* trained with 16; it cannot change on resume"):
        train(small_config(out=str(out), steps=4, lora_r=8, resume="auto"), registry, echo=quiet)
    # settings that may change: steps, save interval, profile
    train(small_config(out=str(out), steps=3, save_every=1, profile=True, resume="auto"), registry, echo=quiet)


def test_truncated_checkpoint_is_refused_and_auto_falls_back(small_config, tmp_path, registry, quiet):
    out = tmp_path / "run"
    train(small_config(out=str(out), steps=4, save_every=2), registry, echo=quiet)
    broken = out / "checkpoints" / "step-4"
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(SftplugError, match="step-4/model.safetensors: truncated or altered"):
        folders.verify(broken)
    assert folders.complete_checkpoints(out) == [out / "checkpoints" / "step-2"]
    messages = []
    train(small_config(out=str(out), steps=4, save_every=2, resume="auto"), registry, echo=messages.append)
    assert any("continuing from" in m and "step-2" in m for m in messages)
    (out / "checkpoints" / "step-4" / "state.pt").unlink()
    with pytest.raises(SftplugError, match="incomplete checkpoint \\(state.pt is missing\\)"):
        train(small_config(out=str(out), steps=6, resume=str(out / "checkpoints" / "step-4")), registry,
              echo=quiet)


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(small_config, tmp_path, monkeypatch, registry, quiet):
    out = tmp_path / "run"
    train(small_config(out=str(out), steps=2), registry, echo=quiet)
    saved = (out / "checkpoints" / "step-2" / "model.safetensors").read_bytes()
    nan_loss = lambda *a, **k: (torch.tensor(float("nan"), requires_grad=True), 1)  # noqa: E731
    monkeypatch.setattr("sftplug.train.run.target_loss_sum", nan_loss)
    with pytest.raises(SftplugError, match="loss is nan at step 3"):
        train(small_config(out=str(out), steps=4, resume="auto"), registry, echo=quiet)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert (out / "checkpoints" / "step-2" / "model.safetensors").read_bytes() == saved


def test_crash_during_a_save_leaves_the_previous_checkpoint_whole(small_config, tmp_path, monkeypatch, registry, quiet):
    out = tmp_path / "run"
    train(small_config(out=str(out), steps=2), registry, echo=quiet)
    before = {p.name: p.read_bytes() for p in (out / "checkpoints" / "step-2").iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")  # dies after the weights were written, before the rename

    monkeypatch.setattr("sftplug.checkpoint.run_state.torch.save", crash)
    with pytest.raises(OSError, match="disk full"):
        train(small_config(out=str(out), steps=4, resume="auto"), registry, echo=quiet)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert {p.name: p.read_bytes() for p in (out / "checkpoints" / "step-2").iterdir()} == before
    assert folders.complete_checkpoints(out) == [out / "checkpoints" / "step-2"]
    monkeypatch.undo()
    (out / "checkpoints" / ".tmp-step-4-99999").mkdir()  # as left by a writer that was killed
    train(small_config(out=str(out), steps=4, resume="auto"), registry, echo=quiet)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_a_checkpoint_displaced_by_a_dead_writer_is_restored(tmp_path):
    root = tmp_path / "checkpoints"

    def weights(value):
        return {folders.WEIGHTS: lambda path: save_file({"w": torch.full((2,), value)}, str(path))}

    folders.write_checkpoint(tmp_path, 2, {}, weights(1.0))
    (root / "step-2").rename(root / ".old-step-2-12345")  # the writer died right after this rename
    folders.write_checkpoint(tmp_path, 4, {}, weights(0.0))
    assert [p.name for p in folders.complete_checkpoints(tmp_path)] == ["step-4", "step-2"]


def test_fp16_scaler_state_comes_back(small_config, tmp_path, registry, quiet):
    from sftplug.train.setup import build_run

    first = build_run(small_config(steps=4, dtype="fp16"), registry, echo=quiet)
    param = next(p for n, p in first.model.named_parameters() if "lora_B" in n)
    param.register_hook(lambda g: torch.full_like(g, float("inf")) if first.step == 1 else g)
    first.update()
    first.update()  # the inf step halves the scale
    assert first.update() and first.precision.scaler.get_scale() == 32768.0
    save_checkpoint(first)
    second = build_run(small_config(steps=4, dtype="fp16", resume="auto"), registry, echo=quiet)
    assert second.precision.scaler.get_scale() == 65536.0
    resume(second, "auto")
    assert second.precision.scaler.get_scale() == 32768.0 and second.step == 3


def test_a_dense_run_saved_before_the_experts_targets_resumes_under_todays_default(small_config, tmp_path, registry,
                                                                                   quiet):
    """The default --lora-targets gained experts.gate_up_proj/down_proj; to a model without experts they mean
    nothing, so a checkpoint whose config lists the seven projections alone still resumes."""
    out = tmp_path / "run"
    train(small_config(out=str(out), steps=2), registry, echo=quiet)
    manifest = out / "checkpoints" / "step-2" / "run.json"
    saved = json.loads(manifest.read_text())
    assert "experts.gate_up_proj" in saved["config"]["lora_targets"]
    saved["config"]["lora_targets"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    manifest.write_text(json.dumps(saved))
    train(small_config(out=str(out), steps=3, resume="auto"), registry, echo=quiet)
    with pytest.raises(SftplugError, match="--lora-targets is .* but .* trained with .*; it cannot change on resume"):
        train(small_config(out=str(out), steps=4, lora_targets=("q_proj",), resume="auto"), registry, echo=quiet)
