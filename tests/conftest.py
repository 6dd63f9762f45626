import pytest

from sftplug.config import TrainConfig


@pytest.fixture
def small_config(tmp_path):
    """A run of the built-in tiny model that takes a few seconds on 2 CPU cores."""

    def make(**overrides):
        base = dict(
            out=str(tmp_path / "run"),
            steps=6,
            micro_bsz=2,
            accum=1,
            seq_len=64,
            log_every=100,
            eval_data=None,
            lr=3e-3,
            warmup=2,
        )
        base.update(overrides)
        return TrainConfig(**base)

    return make
