"""Training a mixture of experts: packed rows train exactly as the same documents unpacked
(cross-entropy, load-balancing loss and gradients), the load-balancing loss in the update and
its metrics, and what sftplug refuses in one line."""

import json
import shutil

import pytest
import torch

import sftplug.plugins.sdpa as sdpa
from sftplug.config import ASSETS, TrainConfig
from sftplug.data.batches import batch_of
from sftplug.data.prepare import prepare_data
from sftplug.data.tokenizer import Tokenizer
from sftplug.errors import SftplugError
from sftplug.model.config import LayerType, ModelConfig
from sftplug.model.routing import load_balancing_loss, routings
from sftplug.model.transformer import Transformer
from sftplug.train.balance import balance_of
from sftplug.train.loop import train
from sftplug.train.loss import target_loss_sum

transformers = pytest.importorskip("transformers")

MOE = dict(vocab_size=1024, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4, n_kv_heads=2,
           architecture="qwen3_moe", experts=dict(count=8, top_k=2, intermediate_size=32, norm_top_k=True,
                                                  aux_loss_coef=0.01),
           layer_types=[LayerType(feed_forward="experts")] * 2)


@pytest.fixture(scope="module")
def moe_model():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**MOE))
    model.init_weights(0)
    model.set_attention(sdpa.math)
    return model


def losses_and_grads(model, rows, packed: bool):
    """Σ token cross-entropy, the load-balancing loss and the gradients of CE + aux, over all rows in one batch."""
    batch = batch_of(rows, list(range(len(rows))))
    model.zero_grad()
    hidden = model(batch["input_ids"], batch["positions"], batch["doc_ids"] if packed else None, hidden_only=True)
    ce, _ = target_loss_sum(hidden, batch["labels"], model.lm_head.weight)
    aux = load_balancing_loss(routings(model), 8, batch["real"])
    (ce + aux).backward()
    return float(ce.detach()), float(aux.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_rows_train_exactly_as_the_same_documents_unpacked(moe_model, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join((ASSETS / "default_train.jsonl").read_text().splitlines(keepends=True)[:12]))
    tok = Tokenizer(ASSETS)
    packed = prepare_data(tok, data=data, seq_len=96, pack=True).train.dense()
    unpacked = prepare_data(tok, data=data, seq_len=96, pack=False).train.dense()
    assert len(packed) < len(unpacked) and int(packed.docs_per_row.max()) > 2  # rows of several documents
    ce_a, aux_a, grads_a = losses_and_grads(moe_model, packed, packed=True)
    ce_b, aux_b, grads_b = losses_and_grads(moe_model, unpacked, packed=False)
    # the same per-token terms summed in another order: fp32 rounding, ~1e-6 of the totals
    assert ce_a == pytest.approx(ce_b, rel=1e-5) and aux_a == pytest.approx(aux_b, rel=1e-5)
    for name, grad in grads_a.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_padding_does_not_count_in_the_load_balancing_loss(moe_model):
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(4))
    real = torch.ones(2, 16, dtype=torch.bool)
    real[1, 9:] = False
    with torch.no_grad():
        moe_model(ids)
        with_padding = load_balancing_loss(routings(moe_model), 8, real)
        moe_model(ids[:, :9])  # the padding cut off: row 0's first 9 tokens, and row 1's real ones
        first = load_balancing_loss(routings(moe_model), 8, torch.ones(2, 9, dtype=torch.bool))
    assert float(with_padding) != pytest.approx(float(first))  # row 0's tokens 9..15 still count
    ids[1, 9:] = 7  # what the padding holds changes nothing
    with torch.no_grad():
        moe_model(ids)
        changed = load_balancing_loss(routings(moe_model), 8, real)
    assert float(changed) == float(with_padding)


@pytest.fixture
def moe_folder(tmp_path, make_hf_folder):
    make_hf_folder(tmp_path / "qwen3_moe", config_class="Qwen3MoeConfig", num_experts=8, num_experts_per_tok=2,
                   moe_intermediate_size=32, head_dim=16, router_aux_loss_coef=0.05)
    return tmp_path / "qwen3_moe"


def run_records(tmp_path, registry, quiet, folder, name, **options):
    data = tmp_path / "data.jsonl"
    data.write_text("".join((ASSETS / "default_train.jsonl").read_text().splitlines(keepends=True)[:64]))
    config = TrainConfig(model=str(folder), data=str(data), out=str(tmp_path / name), steps=2, micro_bsz=2,
                         seq_len=48, eval_data=None, warmup=0, log_every=100, full=True, **options)
    train(config, registry, echo=quiet)
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_the_load_balancing_loss_trains_beside_the_reported_cross_entropy(tmp_path, moe_folder, registry, quiet):
    default = run_records(tmp_path, registry, quiet, moe_folder, "default")
    off = run_records(tmp_path, registry, quiet, moe_folder, "off", router_aux_loss_coef=0.0)
    # the first update's loss is the cross-entropy before any step: the coefficient does not enter it
    assert default[0]["loss"] == off[0]["loss"]
    assert default[0]["aux_loss"] == off[0]["aux_loss"] > 0
    # its gradient does: the second update starts from other weights
    assert default[1]["loss"] != off[1]["loss"]
    for record in default:
        assert record["expert_load_max"] >= 1.0 >= record["expert_load_min"] >= 0.0


def test_a_coefficient_without_experts_and_glm_without_a_balance_loss_are_refused():
    dense = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, n_layers=1, n_heads=4,
                                    n_kv_heads=2))
    with pytest.raises(SftplugError, match="^--router-aux-loss-coef 0.1: this model has no mixture of experts$"):
        balance_of(dense, 0.1, 1, torch.device("cpu"))
    glm = ModelConfig(**{**MOE, "architecture": "glm4_moe",
                         "experts": dict(count=8, top_k=2, intermediate_size=32, router="sigmoid_groups")})
    with pytest.raises(SftplugError, match="glm4_moe balances its experts with e_score_correction_bias"):
        balance_of(Transformer(glm), 0.01, 1, torch.device("cpu"))
    assert balance_of(Transformer(glm), None, 1, torch.device("cpu")).coef == 0.0  # no loss of its own: none


def test_quantizing_the_experts_is_refused_in_one_line(moe_folder):
    from sftplug.loading import load_model
    from sftplug.model.quantize import quant_spec

    pytest.importorskip("bitsandbytes")
    with pytest.raises(SftplugError, match="^--quantize nf4: .* is a mixture of experts, and sftplug does not "
                                           "quantize its stacked experts"):
        load_model(str(moe_folder), quantize=quant_spec("nf4"))


def test_train_router_trains_the_routers_in_full_beside_the_lora(tmp_path, moe_folder, registry, quiet):
    from sftplug.checkpoint.export import export_checkpoint
    from sftplug.loading import load_model

    data = tmp_path / "data.jsonl"
    data.write_text("".join((ASSETS / "default_train.jsonl").read_text().splitlines(keepends=True)[:64]))
    options = dict(model=str(moe_folder), data=str(data), micro_bsz=2, seq_len=48, eval_data=None, warmup=0,
                   log_every=100, lr=0.05, train_router=True)
    train(TrainConfig(out=str(tmp_path / "a"), steps=3, save_every=1, **options), registry, echo=quiet)
    base = load_model(str(moe_folder), dtype=torch.float32).model.state_dict()
    trained = load_model(str(tmp_path / "a"), dtype=torch.float32).model
    weights = trained.state_dict()
    assert not torch.equal(weights["layers.0.mlp.router.weight"], base["layers.0.mlp.router.weight"])
    assert torch.equal(weights["layers.0.mlp.experts.gate_up_proj"], base["layers.0.mlp.experts.gate_up_proj"])
    # resumed from step 2, the routers come back trained: the same weights as the straight run
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-2", tmp_path / "b" / "checkpoints" / "step-2")
    train(TrainConfig(out=str(tmp_path / "b"), steps=3, resume="auto", **options), registry, echo=quiet)
    resumed = load_model(str(tmp_path / "b"), dtype=torch.float32).model.state_dict()
    assert all(torch.equal(resumed[name], weights[name]) for name in weights if ".router." in name)
    with pytest.raises(SftplugError, match="^cannot export a PEFT adapter: this run trained the routers in full"):
        export_checkpoint(str(tmp_path / "a"), tmp_path / "adapter", merge=False, registry=registry)
    export_checkpoint(str(tmp_path / "a"), tmp_path / "merged", registry=registry)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    ids = torch.randint(0, 1024, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(trained(ids), reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_train_router_on_a_dense_model_or_with_full_is_refused():
    with pytest.raises(SftplugError, match="^--train-router trains the routers beside LoRA adapters; --full trains"):
        TrainConfig(full=True, train_router=True)
    from sftplug.model.experts_lora import train_routers

    with pytest.raises(SftplugError, match="^--train-router: this model has no mixture of experts"):
        train_routers(Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, n_layers=1,
                                              n_heads=4, n_kv_heads=2)))
