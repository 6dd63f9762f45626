"""`sftplug bench step`: sftplug against the peer (HF transformers + PEFT) on one workload.

Each side runs in a child process of its own (so peak memory is its own), in rounds that
alternate the order; both see the same synthetic rows, shapes, LoRA and optimizer.
Workloads W0 (CPU) and W1 (GPU), their mixtures of experts W0-MoE and W1-MoE, and the hybrid W0-Hybrid
are defined in WORKLOADS below and in BENCHMARKS.md. The peer of a dense workload is LlamaForCausalLM;
of an MoE workload Qwen3MoeForCausalLM with transformers' fastest experts implementation on the device
(timed first: :func:`pick_experts_implementation`) and PEFT's ``target_parameters`` LoRA on the
experts, no load-balancing loss on either side (coefficient 0; HF's output_router_logits off); of
W0-Hybrid Qwen3_5ForCausalLM (its PyTorch gated delta rule where flash-linear-attention is absent).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from sftplug.errors import SftplugError

WORKLOADS = {
    "W0": dict(preset="w0", seq_len=512, micro_bsz=4, dtype="fp32", device="cpu"),
    "W1": dict(preset="w1", seq_len=2048, micro_bsz=8, dtype="bf16", device="cuda"),
    "W0-MoE": dict(preset="w0-moe", seq_len=512, micro_bsz=4, dtype="fp32", device="cpu"),
    "W1-MoE": dict(preset="w1-moe", seq_len=2048, micro_bsz=4, dtype="bf16", device="cuda"),
    "W0-Hybrid": dict(preset="w0-hybrid", seq_len=512, micro_bsz=4, dtype="fp32", device="cpu"),
}
LORA = dict(r=16, alpha=32.0, dropout=0.0)
# sftplug with one option on (`--variant`), timed as a side of its own
VARIANTS = {"compile": {"torch_compile": True}, "workers2": {"workers": 2}, "fused": {"fused": "all"},
            "unfused": {"fused": "none"}}
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
HF_TARGETS = ATTENTION_TARGETS + ["gate_proj", "up_proj", "down_proj"]
LINEAR_ATTENTION_TARGETS = ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]  # Qwen3.5's
EXPERTS_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # PEFT's target_parameters
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")  # transformers' on any device
PROMPT_FRACTION = 0.25  # labels masked on the first 25% of each row


@dataclass
class SideResult:
    side: str
    tps: float
    fwd_ms: float
    bwd_ms: float
    opt_ms: float
    peak_mem_mib: float  # GPU: max allocated; CPU: peak RSS growth over the process at start

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def synthetic_tokens(vocab: int, rows: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, seq_len + 1), generator=generator)


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak(device: torch.device) -> None:
    """Peaks from here on: set-up (building, loading) is not part of a training step."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the peak resident set size (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mib(device: torch.device, base_rss: float) -> float:
    """Peak memory since :func:`_reset_peak`: the live weights included, load-time transients not."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _rss_mib("VmHWM") - base_rss


class _Clock:
    def __init__(self, device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()


def workload_config(workload: str):
    """The ModelConfig both sides build (its preset)."""
    from sftplug.model.config import ModelConfig

    return ModelConfig.preset(WORKLOADS[workload]["preset"])


def peft_targets(config) -> tuple[list[str], list[str]]:
    """PEFT's target_modules and target_parameters: every block projection (the linear-attention
    layers' too), or, in a mixture of experts, the attention projections and the experts' stacked ones."""
    if config.has_experts:
        return ATTENTION_TARGETS, EXPERTS_PARAMETERS
    hybrid = config.linear_attention.key_heads > 0
    return HF_TARGETS + (LINEAR_ATTENTION_TARGETS if hybrid else []), []


def peer_config(config, experts_implementation: str | None = None):
    """transformers' config of the model ``config`` describes: a Llama, a Qwen3-MoE with every layer MoE,
    or a Qwen3.5 (text) with its layers' mixers."""
    from transformers import LlamaConfig, Qwen3_5TextConfig, Qwen3MoeConfig

    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.n_layers,
                  num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
                  head_dim=config.head_dim, rms_norm_eps=config.norm.eps, max_position_embeddings=config.max_seq_len,
                  rope_parameters={"rope_type": "default", "rope_theta": config.rotary.theta},
                  tie_word_embeddings=config.tie_embeddings, attn_implementation="sdpa")
    if config.architecture == "qwen3_5_text":
        o, rotary = config.linear_attention, common["rope_parameters"]
        rotary["partial_rotary_factor"] = config.rotary.dims / config.head_dim
        mixers = {"linear_attention": "linear_attention", "attention": "full_attention"}
        return Qwen3_5TextConfig(**common, linear_num_key_heads=o.key_heads, linear_num_value_heads=o.value_heads,
                                 linear_key_head_dim=o.key_head_dim, linear_value_head_dim=o.value_head_dim,
                                 linear_conv_kernel_dim=o.conv_kernel,
                                 layer_types=[mixers[config.layer_type(i).mixer] for i in range(config.n_layers)])
    if not config.has_experts:
        return LlamaConfig(**common)
    e = config.experts
    return Qwen3MoeConfig(**common, num_experts=e.count, num_experts_per_tok=e.top_k,
                          moe_intermediate_size=e.intermediate_size, norm_topk_prob=e.norm_top_k,
                          decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False,
                          router_aux_loss_coef=0.0, experts_implementation=experts_implementation)


def peer_model(workload: str, full: bool, experts_implementation: str | None = None):
    """HF transformers (+ PEFT's LoRA unless ``full``) on the workload's device, seeded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    w = WORKLOADS[workload]
    config = workload_config(workload)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(w["dtype"])
    # The strong HF recipe, as sftplug does: LoRA keeps the frozen base in the half dtype
    # (PEFT keeps the adapters in fp32); full fine-tuning trains fp32 weights under autocast.
    base_dtype = autocast_dtype if autocast_dtype is not None and not full else torch.float32
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(base_dtype)
    try:  # built on the device in its dtype: W1-MoE's fp32 copy on the host would be 42 GB
        with torch.device(w["device"]):
            model = AutoModelForCausalLM.from_config(peer_config(config, experts_implementation))
    finally:
        torch.set_default_dtype(default_dtype)
    if not full:
        modules, parameters = peft_targets(config)
        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                 target_modules=modules, target_parameters=parameters or None))
    return model.train(), autocast_dtype


def run_sftplug(workload: str, steps: int, warmup: int, full: bool, attention: str, variant: str = "") -> SideResult:
    from sftplug.config import TrainConfig
    from sftplug.data.packing import IGNORE, Rows
    from sftplug.registry import build_registry
    from sftplug.train import lock
    from sftplug.train.setup import build_run

    w = WORKLOADS[workload]
    base_rss = _rss_mib("VmRSS")
    model_config = workload_config(workload)
    tokens = synthetic_tokens(model_config.vocab_size, w["micro_bsz"] * (steps + warmup), w["seq_len"])
    labels = tokens[:, 1:].clone()
    labels[:, : int(w["seq_len"] * PROMPT_FRACTION)] = IGNORE
    n, t = labels.shape
    rows = Rows(tokens[:, :-1], labels, torch.arange(t).expand(n, t).clone(), torch.zeros(n, t, dtype=torch.int32),
                torch.ones(n, dtype=torch.long))
    targets = tuple(name for group in peft_targets(model_config) for name in group)  # the peer's, by HF name
    with tempfile.TemporaryDirectory(prefix="sftplug-bench-") as out:  # its own folder: benches may run side by side
        config = TrainConfig(model=w["preset"], out=out, steps=steps + warmup, micro_bsz=w["micro_bsz"],
                             seq_len=w["seq_len"], dtype=w["dtype"], device=w["device"], full=full, attention=attention,
                             lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             lora_targets=targets, router_aux_loss_coef=0.0, profile=True, eval_data=None, warmup=1,
                             **VARIANTS.get(variant, {}))
        run = build_run(config, build_registry(), echo=lambda *a: None, rows=rows)
        _reset_peak(run.device)
        records = [run.update() for _ in range(steps + warmup)][warmup:]  # compilation happens in warm-up
        run.batches.close()
        lock.release(run.out)
    return _summarize("+".join(filter(None, ["sftplug", variant])), records, _peak_mib(run.device, base_rss))


def _peer_update(model, params, optimizer, batch: torch.Tensor, autocast_dtype, clock: _Clock) -> dict:
    """One update of the peer: forward, backward, clipping and AdamW, each timed."""
    input_ids = batch[:, :-1]
    labels = input_ids.clone()
    labels[:, : int(input_ids.shape[1] * PROMPT_FRACTION) + 1] = -100  # HF shifts labels inside
    t0 = clock.now()
    with torch.autocast(batch.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = model(input_ids=input_ids, labels=labels).loss
    t1 = clock.now()
    loss.backward()
    t2 = clock.now()
    if optimizer is not None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    for p in params:
        p.grad = None
    t3 = clock.now()
    return dict(fwd_ms=1e3 * (t1 - t0), bwd_ms=1e3 * (t2 - t1), opt_ms=1e3 * (t3 - t2), s_per_update=t3 - t0,
                tokens=input_ids.numel())


def _peer_tokens(workload: str, rows: int) -> torch.Tensor:
    return synthetic_tokens(workload_config(workload).vocab_size, rows, WORKLOADS[workload]["seq_len"])


def run_peer(workload: str, steps: int, warmup: int, full: bool, experts_implementation: str = "") -> SideResult:
    w = WORKLOADS[workload]
    device = torch.device(w["device"])
    base_rss = _rss_mib("VmRSS")
    model, autocast_dtype = peer_model(workload, full, experts_implementation or None)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    tokens = _peer_tokens(workload, w["micro_bsz"] * (steps + warmup))
    clock, records = _Clock(device), []
    _reset_peak(device)
    for i in range(steps + warmup):
        batch = tokens[i * w["micro_bsz"] : (i + 1) * w["micro_bsz"]].to(device)
        records.append(_peer_update(model, params, optimizer, batch, autocast_dtype, clock))
    return _summarize("hf+peft", records[warmup:], _peak_mib(device, base_rss))


def time_experts_implementation(workload: str, full: bool, name: str, repeats: int = 2) -> float | str:
    """Seconds of the peer's forward + backward with transformers' experts implementation ``name``
    (the best of ``repeats`` after one untimed), or why it was not run."""
    w = WORKLOADS[workload]
    device = torch.device(w["device"])
    if name == "batched_mm":  # it copies each routed token's expert weights, kept for backward
        needed, free = _batched_mm_bytes(workload, full), _free_bytes(device)
        if needed > free:
            return (f"{name} skipped: it would keep {needed / 2**30:,.0f} GiB of copied expert weights "
                    f"({free / 2**30:,.0f} free)")
    model, autocast_dtype = peer_model(workload, full, name)
    params = [q for q in model.parameters() if q.requires_grad]
    batch = _peer_tokens(workload, w["micro_bsz"]).to(device)
    runs = [_peer_update(model, params, None, batch, autocast_dtype, _Clock(device)) for _ in range(1 + repeats)]
    return min(r["s_per_update"] for r in runs[1:])  # the first one untimed


def _batched_mm_bytes(workload: str, full: bool) -> int:
    """What batched_mm saves for backward: every (token, expert) pair's copy of gate_up and down, in every layer."""
    w, config = WORKLOADS[workload], workload_config(workload)
    e = config.experts
    itemsize = 4 if full or w["dtype"] == "fp32" else 2
    pairs = w["micro_bsz"] * w["seq_len"] * e.top_k
    moe_layers = sum(config.layer_type(i).feed_forward == "experts" for i in range(config.n_layers))
    return pairs * 3 * e.intermediate_size * config.hidden_size * itemsize * moe_layers


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def _summarize(side: str, records: list[dict], peak: float) -> SideResult:
    mean = lambda key: statistics.fmean(r[key] for r in records)  # noqa: E731
    tps = sum(r["tokens"] for r in records) / sum(r["s_per_update"] for r in records)
    return SideResult(side, tps, mean("fwd_ms"), mean("bwd_ms"), mean("opt_ms"), peak)


def _in_child(side: str, workload: str, steps: int, warmup: int, full: bool, attention: str, experts: str = ""):
    """Run this module's main in a process of its own: the JSON it printed, or the error it ended with (one line)."""
    cmd = [sys.executable, "-m", "sftplug.diagnostics.step_bench", side, workload, str(steps), str(warmup),
           str(int(full)), attention, experts]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()] or [f"exit code {done.returncode}"]
        return f"{side} failed: {lines[-1].strip()}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_side_in_child(side: str, workload: str, steps: int, warmup: int, full: bool, attention: str,
                      experts: str = ""):
    """One side in a process of its own: its SideResult, or the error it ended with (one line)."""
    result = _in_child(side, workload, steps, warmup, full, attention, experts)
    return result if isinstance(result, str) else SideResult(**result)


def pick_experts_implementation(workload: str, full: bool) -> tuple[str, dict]:
    """transformers' fastest experts implementation for the peer on the workload's device, and every
    implementation's seconds per forward + backward, or why it did not run (each in a process of its own)."""
    timed = {name: _in_child(f"hf-experts {name}", workload, 0, 0, full, "", name) for name in EXPERTS_IMPLEMENTATIONS}
    usable = {name: s for name, s in timed.items() if not isinstance(s, str)}
    if not usable:
        raise SftplugError(f"no experts implementation of transformers ran on {WORKLOADS[workload]['device']}: {timed}")
    return min(usable, key=usable.get), timed


def bench_step(workload: str, rounds: int = 2, steps: int = 5, warmup: int = 2, full: bool = False,
               attention: str = "auto", variants: tuple[str, ...] = (), echo=None) -> dict:
    """Alternate sftplug (and its variants) and the peer for ``rounds`` rounds; medians and ratios.

    A side that fails is reported with its error; the others are still timed and compared.
    ``echo`` gets one line per side as it finishes.
    """
    sides = ["sftplug", *(f"sftplug+{v}" for v in variants), "hf+peft"]
    peer_experts, experts_seconds = "", {}
    if workload_config(workload).has_experts:
        peer_experts, experts_seconds = pick_experts_implementation(workload, full)
        if echo is not None:
            echo(f"hf experts implementation: {peer_experts} ({_format_seconds(experts_seconds)})")
    results: dict[str, list[SideResult]] = {side: [] for side in sides}
    errors: dict[str, str] = {}
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            result = run_side_in_child(side, workload, steps, warmup, full, attention,
                                       *([peer_experts] if side == "hf+peft" and peer_experts else []))
            if isinstance(result, str):
                errors[side] = result
            else:
                results[side].append(result)
            if echo is not None:
                echo(f"round {r + 1}/{rounds} {side}: " + (result if isinstance(result, str) else
                     f"{result.tps:,.0f} tok/s, peak {result.peak_mem_mib:,.0f} MiB"))
    fields = ("tps", "fwd_ms", "bwd_ms", "opt_ms", "peak_mem_mib")
    med = {side: {k: statistics.median(getattr(x, k) for x in rs) for k in fields}
           for side, rs in results.items() if rs}
    peer = med.get("hf+peft")
    ratios = {side: {"tps": m["tps"] / peer["tps"], "memory": m["peak_mem_mib"] / max(peer["peak_mem_mib"], 1e-9)}
              for side, m in med.items() if side != "hf+peft" and peer is not None}
    return {
        "workload": workload,
        "mode": "full" if full else "lora",
        "rounds": rounds,
        "steps": steps,
        "device": _device_name(WORKLOADS[workload]["device"]),
        "torch": torch.__version__,
        "hf_experts_implementation": peer_experts or None,  # the peer's, where the model has experts
        "hf_experts_seconds": experts_seconds,  # each one's forward + backward, how it was picked
        "sides": med,
        "errors": errors,
        "ratios": ratios,
        "tps_ratio": ratios.get("sftplug", {}).get("tps"),
        "memory_ratio": ratios.get("sftplug", {}).get("memory"),
    }


def _device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def format_step_table(result: dict) -> str:
    lines = [f"bench step {result['workload']} ({result['mode']}) on {result['device']}, torch {result['torch']}, "
             f"median of {result['rounds']} rounds x {result['steps']} updates",
             f"{'side':<18}{'tok/s':>10}{'fwd ms':>10}{'bwd ms':>10}{'opt ms':>10}{'peak MiB':>10}"]
    if result.get("hf_experts_implementation"):
        lines.insert(1, f"hf+peft experts: {result['hf_experts_implementation']}, the fastest here "
                        f"({_format_seconds(result['hf_experts_seconds'])})")
    for side, m in result["sides"].items():
        lines.append(f"{side:<18}{m['tps']:>10,.0f}{m['fwd_ms']:>10.0f}{m['bwd_ms']:>10.0f}{m['opt_ms']:>10.0f}"
                     f"{m['peak_mem_mib']:>10.0f}")
    for side, r in result["ratios"].items():
        lines.append(f"{side} / hf+peft: {r['tps']:.2f}x tokens/s, {r['memory']:.2f}x peak memory")
    lines += [f"failed: {error}" for error in result["errors"].values()]
    return "\n".join(lines)


def _format_seconds(seconds: dict) -> str:
    return ", ".join(f"{name} {s * 1e3:,.0f} ms" if not isinstance(s, str) else s
                     for name, s in seconds.items()) + " per forward + backward"


if __name__ == "__main__":  # one side in a child process: prints one JSON line
    side, workload, steps, warmup, full, attention, experts = sys.argv[1:8]
    if side.startswith("hf-experts"):
        print(json.dumps(time_experts_implementation(workload, bool(int(full)), experts)))
    elif side.startswith("sftplug"):
        out = run_sftplug(workload, int(steps), int(warmup), bool(int(full)), attention, side.partition("+")[2])
        print(json.dumps(out.as_dict()))
    else:
        print(json.dumps(run_peer(workload, int(steps), int(warmup), bool(int(full)), experts).as_dict()))
