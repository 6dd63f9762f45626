"""`sftplug bench step`: sftplug against the peer (HF transformers + PEFT) on one workload.

Each side runs in a child process of its own (so peak memory is its own), in rounds that
alternate the order; both see the same synthetic rows, shapes, LoRA and optimizer.
Workloads W0 (CPU) and W1 (GPU) are defined in WORKLOADS below and in BENCHMARKS.md.
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

WORKLOADS = {
    "W0": dict(preset="w0", seq_len=512, micro_bsz=4, dtype="fp32", device="cpu"),
    "W1": dict(preset="w1", seq_len=2048, micro_bsz=8, dtype="bf16", device="cuda"),
}
LORA = dict(r=16, alpha=32.0, dropout=0.0)
# sftplug with one option on (`--variant`), timed as a side of its own
VARIANTS = {"compile": {"torch_compile": True}, "workers2": {"workers": 2}, "fused": {"fused": "all"},
            "unfused": {"fused": "none"}}
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
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


def run_sftplug(workload: str, steps: int, warmup: int, full: bool, attention: str, variant: str = "") -> SideResult:
    from sftplug.config import TrainConfig
    from sftplug.data.packing import IGNORE, Rows
    from sftplug.registry import build_registry
    from sftplug.train import lock
    from sftplug.train.setup import build_run

    w = WORKLOADS[workload]
    base_rss = _rss_mib("VmRSS")
    from sftplug.model.transformer import PRESETS

    tokens = synthetic_tokens(PRESETS[w["preset"]]["vocab_size"], w["micro_bsz"] * (steps + warmup), w["seq_len"])
    labels = tokens[:, 1:].clone()
    labels[:, : int(w["seq_len"] * PROMPT_FRACTION)] = IGNORE
    n, t = labels.shape
    rows = Rows(tokens[:, :-1], labels, torch.arange(t).expand(n, t).clone(), torch.zeros(n, t, dtype=torch.int32),
                torch.ones(n, dtype=torch.long))
    with tempfile.TemporaryDirectory(prefix="sftplug-bench-") as out:  # its own folder: benches may run side by side
        config = TrainConfig(model=w["preset"], out=out, steps=steps + warmup, micro_bsz=w["micro_bsz"],
                             seq_len=w["seq_len"], dtype=w["dtype"], device=w["device"], full=full, attention=attention,
                             lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], profile=True,
                             eval_data=None, warmup=1, **VARIANTS.get(variant, {}))
        run = build_run(config, build_registry(), echo=lambda *a: None, rows=rows)
        _reset_peak(run.device)
        records = [run.update() for _ in range(steps + warmup)][warmup:]  # compilation happens in warm-up
        run.batches.close()
        lock.release(run.out)
    return _summarize("+".join(filter(None, ["sftplug", variant])), records, _peak_mib(run.device, base_rss))


def run_peer(workload: str, steps: int, warmup: int, full: bool) -> SideResult:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftplug.model.transformer import PRESETS

    w = WORKLOADS[workload]
    p = PRESETS[w["preset"]]
    device = torch.device(w["device"])
    base_rss = _rss_mib("VmRSS")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=p["vocab_size"], hidden_size=p["hidden_size"],
                         intermediate_size=p["intermediate_size"], num_hidden_layers=p["n_layers"],
                         num_attention_heads=p["n_heads"], num_key_value_heads=p["n_kv_heads"],
                         tie_word_embeddings=False, attn_implementation="sdpa")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(w["dtype"])
    # The strong HF recipe, as sftplug does: LoRA keeps the frozen base in the half dtype
    # (PEFT keeps the adapters in fp32); full fine-tuning trains fp32 weights under autocast.
    base_dtype = autocast_dtype if autocast_dtype is not None and not full else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=base_dtype)
    if not full:
        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                 lora_dropout=LORA["dropout"], target_modules=HF_TARGETS))
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    tokens = synthetic_tokens(p["vocab_size"], w["micro_bsz"] * (steps + warmup), w["seq_len"])
    clock, records = _Clock(device), []
    _reset_peak(device)
    for i in range(steps + warmup):
        batch = tokens[i * w["micro_bsz"] : (i + 1) * w["micro_bsz"]].to(device)
        input_ids = batch[:, :-1]
        labels = input_ids.clone()
        labels[:, : int(w["seq_len"] * PROMPT_FRACTION) + 1] = -100  # HF shifts labels inside
        t0 = clock.now()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=input_ids, labels=labels).loss
        t1 = clock.now()
        loss.backward()
        t2 = clock.now()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = clock.now()
        records.append(dict(fwd_ms=1e3 * (t1 - t0), bwd_ms=1e3 * (t2 - t1), opt_ms=1e3 * (t3 - t2),
                            s_per_update=t3 - t0, tokens=input_ids.numel()))
    return _summarize("hf+peft", records[warmup:], _peak_mib(device, base_rss))


def _summarize(side: str, records: list[dict], peak: float) -> SideResult:
    mean = lambda key: statistics.fmean(r[key] for r in records)  # noqa: E731
    tps = sum(r["tokens"] for r in records) / sum(r["s_per_update"] for r in records)
    return SideResult(side, tps, mean("fwd_ms"), mean("bwd_ms"), mean("opt_ms"), peak)


def run_side_in_child(side: str, workload: str, steps: int, warmup: int, full: bool, attention: str):
    """One side in a process of its own: its SideResult, or the error it ended with (one line)."""
    cmd = [sys.executable, "-m", "sftplug.diagnostics.step_bench", side, workload, str(steps), str(warmup),
           str(int(full)), attention]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()] or [f"exit code {done.returncode}"]
        return f"{side} failed: {lines[-1].strip()}"
    return SideResult(**json.loads(done.stdout.strip().splitlines()[-1]))


def bench_step(workload: str, rounds: int = 2, steps: int = 5, warmup: int = 2, full: bool = False,
               attention: str = "auto", variants: tuple[str, ...] = (), echo=None) -> dict:
    """Alternate sftplug (and its variants) and the peer for ``rounds`` rounds; medians and ratios.

    A side that fails is reported with its error; the others are still timed and compared.
    ``echo`` gets one line per side as it finishes.
    """
    sides = ["sftplug", *(f"sftplug+{v}" for v in variants), "hf+peft"]
    results: dict[str, list[SideResult]] = {side: [] for side in sides}
    errors: dict[str, str] = {}
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            result = run_side_in_child(side, workload, steps, warmup, full, attention)
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
    for side, m in result["sides"].items():
        lines.append(f"{side:<18}{m['tps']:>10,.0f}{m['fwd_ms']:>10.0f}{m['bwd_ms']:>10.0f}{m['opt_ms']:>10.0f}"
                     f"{m['peak_mem_mib']:>10.0f}")
    for side, r in result["ratios"].items():
        lines.append(f"{side} / hf+peft: {r['tps']:.2f}x tokens/s, {r['memory']:.2f}x peak memory")
    lines += [f"failed: {error}" for error in result["errors"].values()]
    return "\n".join(lines)


if __name__ == "__main__":  # one side in a child process: prints one JSON line
    side, workload, steps, warmup, full, attention = sys.argv[1:7]
    if side.startswith("sftplug"):
        out = run_sftplug(workload, int(steps), int(warmup), bool(int(full)), attention, side.partition("+")[2])
    else:
        out = run_peer(workload, int(steps), int(warmup), bool(int(full)))
    print(json.dumps(out.as_dict()))
