"""metrics.jsonl holds the held-out loss the run prints: step 0's record before the first update,
the last update's record at the end, and every --eval-every update's between."""

import json

import pytest

from sftplug.train.loop import train


@pytest.fixture
def texts(tmp_path):
    """Four text records, trained on and held out: no sample prompt in them, so the runs spend no
    time generating sample answers."""
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": f"Count from {n} to {n + 4}: " + ", ".join(map(str, range(n, n + 5)))})
                            + "\n" for n in range(4)))
    return str(path)


def records_of(summary) -> list[dict]:
    return [json.loads(line) for line in open(f"{summary['out']}/metrics.jsonl")]


@pytest.mark.parametrize("steps, eval_every, evaluated", [(1, 0, [0, 1]), (5, 2, [0, 2, 4, 5])])
def test_held_out_loss_is_recorded_before_the_first_update_and_with_the_last(small_config, registry, texts,
                                                                            steps, eval_every, evaluated, quiet):
    config = small_config(data=texts, eval_data=texts, steps=steps, eval_every=eval_every)
    summary = train(config, registry, echo=quiet)
    records = records_of(summary)
    assert [r["step"] for r in records] == list(range(steps + 1))
    assert records[0] == {"step": 0, "eval_loss": summary["eval_loss_before"]}
    assert all("loss" in r and "tokens" in r for r in records[1:])  # one record per update besides
    assert [r["step"] for r in records if "eval_loss" in r] == evaluated
    assert records[-1]["eval_loss"] == summary["eval_loss_after"] < summary["eval_loss_before"]


def test_without_held_out_data_no_record_claims_a_held_out_loss(small_config, registry, texts, quiet):
    summary = train(small_config(data=texts, steps=2, eval_every=1), registry, echo=quiet)
    assert [r["step"] for r in records_of(summary)] == [1, 2]
    assert all("eval_loss" not in r for r in records_of(summary))
    assert summary["eval_loss_before"] is None and summary["eval_loss_after"] is None
