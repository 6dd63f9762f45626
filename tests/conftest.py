import copy
import os

# Under pytest-xdist every worker (and every process a test starts) computes on one thread:
# OpenMP threads that wait on each other on shared cores make tiny ops ~50x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from sftplug.config import ASSETS, TrainConfig  # noqa: E402
from sftplug.registry import build_registry  # noqa: E402

# `sftplug train` draws OUT/plot.png at the end (about a second); the suite runs many trainings
# (tests/diagnostics/test_plot.py checks the plot itself)
os.environ.setdefault("SFTPLUG_NO_PLOT", "1")


@pytest.fixture(scope="session")
def registry():
    """The built-in plugins, registered once for the session (tests that add plugins build their own)."""
    return build_registry(entrypoints=False)


@pytest.fixture(scope="session")
def quiet():
    """An echo that prints nothing: for train() and build_run() where a test does not read what they say."""

    def echo(*args, **kwargs) -> None:
        pass

    return echo


@pytest.fixture(scope="module")
def tok():
    """The bundled tokenizer (sftplug/assets), one per test module."""
    from sftplug.data.tokenizer import Tokenizer

    return Tokenizer(ASSETS)


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


@pytest.fixture(scope="session")
def make_hf_folder():
    """A factory: a tiny random HF checkpoint (save_pretrained) with the bundled tokenizer (saved by transformers).

    ``make(folder, config_class="LlamaConfig", seed=0, **overrides)`` writes the folder and
    returns the transformers model it saved.
    """
    transformers = pytest.importorskip("transformers")

    def make(folder, config_class="LlamaConfig", seed=0, max_shard_size=None, **overrides):
        options = dict(
            vocab_size=1024,  # the bundled tokenizer's size
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        options = copy.deepcopy({**options, **overrides})  # transformers edits rope dicts in place
        config = getattr(transformers, config_class)(**options)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        with torch.no_grad():  # norms start at 1 and biases at 0: make them matter
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.2)
            for name, b in model.named_buffers():  # GLM-4.5's learned balance: make it change the choice
                if name.endswith("e_score_correction_bias"):
                    b.add_(torch.randn_like(b) * 0.05)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        # today's layout: the chat template in chat_template.jinja, not in tokenizer_config.json
        transformers.AutoTokenizer.from_pretrained(ASSETS).save_pretrained(folder)
        return model

    return make


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, make_hf_folder):
    """A tiny random Llama HF checkpoint (make_hf_folder's defaults), one per test module."""
    folder = tmp_path_factory.mktemp("hf")
    make_hf_folder(folder)
    return folder


@pytest.fixture(scope="session")
def grads_as_peft():
    """``grads_as_peft(model)``: sftplug's LoRA gradients in PEFT's tensor names (``base_model.model.``
    dropped) and layout, split by the adapter export's own code (sftplug.hf.peft_adapter.peft_tensors)."""
    from sftplug.hf.peft_adapter import peft_tensors

    def split(model) -> dict:
        saved = {id(p): p.data for p in model.parameters()}
        for p in model.parameters():
            if p.grad is not None:
                p.data = p.grad
        try:
            grads = peft_tensors(model)
        finally:
            for p in model.parameters():
                p.data = saved[id(p)]
        return {k.replace("base_model.model.", "", 1): v.clone() for k, v in grads.items()}

    return split
