"""QLoRA (--quantize): the 4-bit base as bitsandbytes quantizes it, loaded tensor by tensor, LoRA on it
equal to PEFT's bitsandbytes LoRA, training that resumes bitwise, and exports transformers and PEFT load."""

import json
import shutil
import sys
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from sftplug.cli import cli
from sftplug.config import DEFAULT_DATA, TrainConfig
from sftplug.errors import SftplugError
from sftplug.hf import load as hf_load
from sftplug.loading import load_model
from sftplug.model.lora import apply_lora
from sftplug.model.merged_lora import MergedLoRALinear, use_merged_forward
from sftplug.model.quantize import (
    BLOCK_LINEARS,
    QuantSpec,
    bitsandbytes_dequantizes_exactly,
    dense_weight,
    quantize_linear,
    quantized_bytes,
)
from sftplug.train.loop import train

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(3))
SPECS = [QuantSpec("nf4", True), QuantSpec("nf4", False), QuantSpec("fp4", True)]
HF_NAMES = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
            "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def relative_error(got, ref) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def original_weights(folder, layer: int) -> dict[str, torch.Tensor]:
    """Each block linear's weight as the HF files hold it, q/k/v and gate/up stacked as sftplug fuses them."""
    tensors = load_file(str(folder / "model.safetensors"))
    return {name: torch.cat([tensors[f"model.layers.{layer}.{hf}.weight"] for hf in parts])
            for name, parts in HF_NAMES.items()}


def block_linears(model, layer: int) -> dict[str, nn.Module]:
    block = model.layers[layer]
    return {"qkv": block.attn.qkv, "o": block.attn.o, "gate_up": block.mlp.gate_up, "down": block.mlp.down}


# -- the quantized base -----------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-dq{int(s.double_quant)}")
def test_the_dequantized_base_is_the_original_rounded_to_the_4bit_code(hf_folder, spec):
    model = hf_load.load_hf_folder(hf_folder, quantize=spec).model
    code = bnb.functional.get_4bit_type(spec.kind, device="cpu").double()
    half_gap = float((code.sort().values.diff()).max()) / 2
    for layer in range(2):
        for name, original in original_weights(hf_folder, layer).items():
            linear = block_linears(model, layer)[name]
            assert isinstance(linear, bnb.nn.Linear4bit) and linear.weight.dtype == torch.uint8
            state = linear.weight.quant_state
            got = dense_weight(linear.weight, torch.float32).double().view(-1, 64)
            want = original.double().view(-1, 64)
            absmax = want.abs().amax(dim=1, keepdim=True)  # each block's scale, as quantizing saw it
            stored = state.absmax.double() if not state.nested else (  # the scale dequantization uses
                bnb.functional.dequantize_blockwise(state.absmax, state.state2).double() + float(state.offset))
            stored = stored.view(-1, 1)
            # each weight is a code value times its block's stored scale (one fp32 rounding) ...
            nearest = (got[..., None] - code * stored[..., None]).abs().amin(dim=-1)
            assert bool((nearest <= 2**-23 * got.abs() + 1e-30).all()), name
            # ... the nearest code to weight / scale: off by at most half the code's largest gap,
            # plus what the 8-bit stored scale differs from the block's absmax (double quantization)
            bound = half_gap * absmax + (stored - absmax).abs() + 2**-22 * absmax
            assert bool(((got - want).abs() <= bound).all()), name
            if not state.nested:
                assert torch.equal(stored, absmax.float().double())


def test_the_block_weights_take_a_third_of_their_bf16_bytes(hf_folder):
    loaded = hf_load.load_hf_folder(hf_folder, quantize=QuantSpec("nf4"))
    model = loaded.model
    stored, bf16 = quantized_bytes(model)
    dense = sum(w.numel() * 2 for layer in range(2) for w in original_weights(hf_folder, layer).values())
    assert bf16 == dense
    assert stored <= 0.35 * bf16
    assert loaded.info["quantized"] == {"kind": "nf4", "double_quant": True, "dtype": "fp32", "bytes": stored,
                                        "bf16_bytes": bf16}
    assert f"{stored / bf16:.2f}x" in loaded.description and "nf4" in loaded.description
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * len(BLOCK_LINEARS)  # embeddings, norms and the head stay dense
    assert model.lm_head.weight.dtype == model.embed_tokens.weight.dtype == torch.float32


def test_loading_holds_one_layer_of_dense_temporaries_at_most(hf_folder, tmp_path, monkeypatch):
    """A sharded folder (q, k and v of a layer in different files): every dense buffer is counted from
    its allocation until it is freed."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_folder))
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_folder / name, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({index[f"model.layers.{i}.self_attn.{p}_proj.weight"] for i in (0, 1) for p in "qkv"}) > 1
    live, peak, allocated = [0], [0], []
    original = hf_load.dense_buffer

    def counted(shape, dtype, device):
        buffer = original(shape, dtype, device)
        nbytes = buffer.numel() * buffer.element_size()
        live[0] += nbytes
        peak[0] = max(peak[0], live[0])
        allocated.append(nbytes)
        weakref.finalize(buffer, lambda: live.__setitem__(0, live[0] - nbytes))
        return buffer

    monkeypatch.setattr(hf_load, "dense_buffer", counted)
    sharded = hf_load.load_hf_folder(tmp_path, quantize=QuantSpec("nf4")).model
    layer_bytes = sum(w.numel() * 4 for w in original_weights(hf_folder, 0).values())
    assert len(allocated) == 2 * len(BLOCK_LINEARS) and sum(allocated) == 2 * layer_bytes
    assert 0 < peak[0] <= layer_bytes and live[0] == 0  # each freed once quantized
    single = hf_load.load_hf_folder(hf_folder, quantize=QuantSpec("nf4")).model
    for a, b in zip(block_linears(sharded, 1).values(), block_linears(single, 1).values()):
        assert torch.equal(a.weight.data, b.weight.data)
        assert torch.equal(a.weight.quant_state.absmax, b.weight.quant_state.absmax)


def test_a_missing_tensor_is_still_named_when_quantizing(hf_folder, tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_folder / name, tmp_path)
    tensors = load_file(str(hf_folder / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(SftplugError, match="model.layers.1.self_attn.k_proj.weight"):
        hf_load.load_hf_folder(tmp_path, quantize=QuantSpec("nf4"))


def test_presets_are_quantized_after_loading_and_a_missing_bitsandbytes_is_one_line(monkeypatch):
    loaded = load_model("tiny", quantize=QuantSpec("fp4", False), attention=None)
    assert isinstance(loaded.model.layers[0].mlp.down, bnb.nn.Linear4bit)
    assert loaded.info["quantized"]["kind"] == "fp4" and "block weights fp4" in loaded.description
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(SftplugError) as error:
        load_model("tiny", quantize=QuantSpec("nf4"), attention=None)
    assert str(error.value) == "--quantize nf4 needs bitsandbytes: pip install 'sftplug[quantize]' (bitsandbytes)"


# -- LoRA on the 4-bit base equals PEFT's bitsandbytes LoRA -----------------------------------


def lora_pair(dropout=0.0, dora=False, spec=None):
    """Two linears quantized as bitsandbytes does (Linear4bit.to(device)) with PEFT's own bnb LoRA, and the
    same quantized by sftplug with sftplug's forward; the same adapter in both."""
    spec = spec or QuantSpec("nf4")
    torch.manual_seed(0)
    dense = {"up": nn.Linear(64, 128), "down": nn.Linear(128, 64, bias=False)}
    theirs = nn.ModuleDict()
    for name, linear in dense.items():
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compress_statistics=spec.double_quant, quant_type=spec.kind)
        layer.load_state_dict(linear.state_dict())
        theirs[name] = layer.to("cpu")  # bitsandbytes quantizes here
    ours = nn.ModuleDict({name: quantize_linear(linear, linear.weight, spec) for name, linear in dense.items()})
    for name in dense:  # the same 4-bit weights
        assert torch.equal(ours[name].weight.data, theirs[name].weight.data)
        assert torch.equal(ours[name].weight.quant_state.absmax, theirs[name].weight.quant_state.absmax)
    config = peft.LoraConfig(r=8, lora_alpha=24, lora_dropout=dropout, target_modules=["up", "down"],
                             use_dora=dora)
    pair = []
    for layers in (theirs, ours):
        layers.is_loaded_in_4bit = True  # PEFT wraps Linear4bit in its bitsandbytes LoRA layer then
        layers.requires_grad_(False)
        pair.append(peft.inject_adapter_in_model(config, layers))
    theirs, ours = pair
    assert isinstance(ours["up"], peft.tuners.lora.bnb.Linear4bit)
    torch.manual_seed(1)
    with torch.no_grad():
        for (name, p), (_, q) in zip(theirs.named_parameters(), ours.named_parameters()):
            if "lora_B" in name:  # PEFT starts B at zero; a trained adapter is not
                p.normal_(std=0.1)
            if "lora_" in name:
                q.copy_(p)
    use_merged_forward(ours)
    return theirs, ours


def run(layers, x, saved=None):
    layers.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    pack = (lambda t: saved.append(t) or t) if saved is not None else (lambda t: t)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layers["down"](F.silu(layers["up"](x)))
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    grads = {n: p.grad.clone() for n, p in layers.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def no_dense_weight_among(saved: list) -> bool:
    return not any(t.is_floating_point() and tuple(t.shape) in {(128, 64), (64, 128)} for t in saved)


@pytest.mark.parametrize("spec", [QuantSpec("nf4"), QuantSpec("fp4", False)], ids=["nf4-dq", "fp4"])
def test_the_merged_forward_on_4bit_equals_peft_bnb_lora(spec, monkeypatch):
    theirs, ours = lora_pair(spec=spec)
    x = torch.randn(3, 7, 64)
    calls, saved, original = [], [], MergedLoRALinear.apply
    monkeypatch.setattr(MergedLoRALinear, "apply", lambda *a: calls.append(1) or original(*a))
    y1, dx1, g1 = run(theirs, x)
    y2, dx2, g2 = run(ours, x, saved)
    assert len(calls) == 2 and no_dense_weight_among(saved)  # dequantized again in backward, never kept
    # x (W + s B A)^T against x W^T + s (x A^T) B^T with the same dequantized W: fp32 rounding only
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx2, dx1, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys() and len(g1) == 4
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-5)


def test_dropout_and_dora_on_4bit_are_peft_bnb_s_own_computation():
    theirs, ours = lora_pair(dropout=0.2)
    x = torch.randn(2, 5, 64)
    torch.manual_seed(3)
    y1, dx1, g1 = run(theirs, x)
    torch.manual_seed(3)
    saved = []
    y2, dx2, g2 = run(ours, x, saved)
    assert no_dense_weight_among(saved)
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)  # the same masks, the same dequantized base
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
    theirs, ours = lora_pair(dora=True)  # PEFT's DoRA: the norm of the dequantized W + s B A per row
    y1, dx1, g1 = run(theirs, x)
    y2, dx2, g2 = run(ours, x)
    assert any("magnitude" in n for n in g1)
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    assert all(torch.equal(g1[n], g2[n]) for n in g1)


def test_a_compiled_4bit_lora_layer_is_the_eager_one():
    """--torch-compile with --quantize: bitsandbytes' dequantization is an op torch.compile traces."""
    _, ours = lora_pair()
    x = torch.randn(3, 7, 64)
    eager = run(ours, x)
    ours["up"].compile()
    compiled = run(ours, x)
    # the same matmuls; inductor may fuse the elementwise ops around them: fp32 rounding at most
    for got, want in zip(compiled[:2], eager[:2]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name in eager[2]:
        torch.testing.assert_close(compiled[2][name], eager[2][name], rtol=1e-5, atol=1e-5)


def test_dora_is_refused_where_bitsandbytes_dequantizes_wrongly(hf_folder):
    """PEFT's DoRA norms come from bitsandbytes' own dequantization; its CPU kernel gets the 64x96 down
    projection of this model wrong (sftplug's flat dequantization does not)."""
    model = hf_load.load_hf_folder(hf_folder, quantize=QuantSpec("nf4")).model
    model.requires_grad_(False)
    down = model.layers[0].mlp.down.weight
    wrong = not bitsandbytes_dequantizes_exactly(down)
    if wrong:
        with pytest.raises(SftplugError, match=r"dora: bitsandbytes dequantizes the 4-bit layers.0.mlp.down.weight"):
            apply_lora(model, 4, 8.0, 0.0, ("down_proj",), "dora")
    apply_lora(model, 4, 8.0, 0.0, ("q_proj", "v_proj"), "dora")  # 64 inputs: whole blocks per row


# -- training, resuming, exporting ------------------------------------------------------------


def qlora_config(base, data, out, **options):
    options = {**dict(model=str(base), data=str(data), out=str(out), steps=4, save_every=2, micro_bsz=2,
                      seq_len=48, eval_data=None, lr=1e-2, warmup=0, log_every=100, quantize="nf4",
                      dtype="bf16", lora_dropout=0.1), **options}
    return TrainConfig(**options)


def few_records(folder):
    """A few plain-text records: tokenizing is not what is tested here, and text has no sample prompt
    to answer (generation on the CPU would be most of the time)."""
    data = folder / "data.jsonl"
    rows = [json.loads(line) for line in DEFAULT_DATA.read_text().splitlines()[:64]]
    data.write_text("".join(json.dumps({"text": f"{r['prompt']} {r['completion']}"}) + "\n" for r in rows))
    return data


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def qlora_run(hf_folder, tmp_path_factory, registry, quiet):
    """4 QLoRA updates in bf16 (the base quantized from bf16), checkpoints at 2 and 4."""
    tmp_path = tmp_path_factory.mktemp("qlora")
    train(qlora_config(hf_folder, few_records(tmp_path), tmp_path / "run"), registry, echo=quiet)
    return tmp_path / "run"


def test_qlora_trains_and_resumes_bitwise(qlora_run, hf_folder, tmp_path, registry, quiet):
    curve = losses(qlora_run)
    assert len(curve) == 4 and curve[-1] < curve[0]
    resumed = tmp_path / "resumed"  # a run that has only the step-2 checkpoint, as if the first had died
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(qlora_run / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    data = qlora_run.parent / "data.jsonl"
    train(qlora_config(hf_folder, data, resumed, resume="auto"), registry, echo=quiet)
    assert losses(resumed) == curve[2:]
    a = load_file(str(qlora_run / "checkpoints" / "step-4" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-4" / "model.safetensors"))
    assert a.keys() == b.keys() and all("lora_" in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_checkpoint_loads_its_base_quantized_as_the_run_trained_it(qlora_run, hf_folder):
    manifest = json.loads((qlora_run / "checkpoints" / "step-4" / "run.json").read_text())
    assert manifest["lora"]["base_dtype"] == "bf16"
    loaded = load_model(str(qlora_run), dtype=torch.float32, attention=None)  # as export loads it
    assert loaded.info["quantized"]["dtype"] == "bf16"
    trained = load_model(str(hf_folder), dtype=torch.bfloat16, quantize=QuantSpec("nf4"), attention=None).model
    from_fp32 = load_model(str(hf_folder), dtype=torch.float32, quantize=QuantSpec("nf4"), attention=None).model
    differs = False
    for layer in range(2):
        for name, ours in block_linears(trained, layer).items():
            got = block_linears(loaded.model, layer)[name].base_layer.weight
            assert torch.equal(got.data, ours.weight.data)
            assert torch.equal(dense_weight(got, torch.bfloat16), dense_weight(ours.weight, torch.bfloat16))
            other = dense_weight(block_linears(from_fp32, layer)[name].weight, torch.bfloat16)
            differs |= not torch.equal(other, dense_weight(ours.weight, torch.bfloat16))
    assert differs  # quantizing from fp32 would not have been the trained base


def test_exports_are_the_dequantized_base_with_the_adapter(qlora_run, tmp_path):
    from sftplug.checkpoint.export import export_checkpoint

    model = load_model(str(qlora_run), attention="auto").model  # sftplug's QLoRA model, in eval
    with torch.no_grad():
        ours = model(IDS)
    merged = export_checkpoint(qlora_run, tmp_path / "merged", merge=True)["model"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(merged), attn_implementation="eager").eval()
    with torch.no_grad():
        # the same dequantized base and adapter; merged in another order than sftplug's addmm, and
        # attention computed another way: fp32 rounding through two layers
        assert relative_error(hf(IDS).logits, ours) <= 1e-4
    parts = export_checkpoint(qlora_run, tmp_path / "split", merge=False)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(parts["base"]), attn_implementation="eager")
    exported = load_file(str(parts["base"] / "model.safetensors"))
    qkv = block_linears(model, 1)["qkv"].base_layer.weight
    assert torch.equal(torch.cat([exported[f"model.layers.1.{n}.weight"] for n in HF_NAMES["qkv"]]),
                       dense_weight(qkv, torch.float32))  # the base trained on, not the original
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.PeftModel.from_pretrained(base, str(parts["adapter"])).eval()
    with torch.no_grad():
        assert relative_error(wrapped(IDS).logits, ours) <= 1e-4


def test_cli_trains_a_quantized_preset_and_says_so(tmp_path):
    out, data = tmp_path / "run", few_records(tmp_path)
    result = CliRunner().invoke(cli, ["train", "--model", "tiny", "--quantize", "nf4", "--steps", "2", "--micro-bsz",
                                      "2", "--seq-len", "32", "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith("model:"))
    assert "block weights nf4 from fp32, double-quantized scales" in header and "x their" in header
    assert len(losses(out)) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_trains_on_cuda_in_bf16(hf_folder, tmp_path, registry, quiet):
    out = tmp_path / "run"
    config = qlora_config(hf_folder, few_records(tmp_path), out, device="cuda", save_every=0)
    train(config, registry, echo=quiet)
    curve = losses(out)
    assert len(curve) == 4 and curve[-1] < curve[0]
    loaded = load_model(str(out), device="cuda", attention="auto")
    assert loaded.info["quantized"]["dtype"] == "bf16"
    assert loaded.model.layers[0].attn.qkv.base_layer.weight.device.type == "cuda"


@pytest.mark.parametrize("options, message", [
    (dict(linear_attention=dict(key_heads=2, value_heads=4), layer_types=[dict(mixer="linear_attention"), {}]),
     "has Gated DeltaNet layers, whose projections sftplug does not quantize"),
    (dict(architecture="gemma4_text"), "is a Gemma 4, whose separate q/k/v projections sftplug does not quantize"),
], ids=["hybrid", "gemma4"])
def test_models_with_layers_quantize_would_leave_dense_are_refused_in_one_line(options, message):
    from sftplug.model.config import ModelConfig
    from sftplug.model.quantize import check_quantizable

    config = ModelConfig(n_layers=2, **options)
    with pytest.raises(SftplugError, match=f"^--quantize nf4: the model {message} in 4-bit yet; train it with LoRA"):
        check_quantizable(config, "nf4", "the model")
