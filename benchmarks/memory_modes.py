"""Peak RSS growth of one LoRA update on the W0 shape on the CPU, each mode in a fresh process.

    .venv/bin/python benchmarks/memory_modes.py [--rounds 2]

W0: preset "w0" (hidden 512, 6 layers, vocab 8192), fp32 (the CPU's dtype), rows of 512 tokens of
one document each, micro-batch 4, LoRA r=16 alpha 32 on every block linear, the first 25% of each
row prompt. A child builds the run, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``)
and runs one update (gradients, the optimizer's first state, activations); its growth is the peak
minus the RSS before. Modes alternate over the rounds, so drift on the machine spreads over all of
them. Beside each: sftplug.train.memory's prediction of the same growth (gradients + optimizer
state + activations + the loss's chunk of logits). On the CPU, offloading copies the saved tensors
into other CPU memory, so it is predicted (and expected) to save nothing here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {
    "LoRA fp32": {},
    "+ grad-ckpt": {"grad_ckpt": True},
    "+ offload-activations": {"offload_activations": True},
    "QLoRA nf4": {"quantize": "nf4"},
    "QLoRA nf4 + grad-ckpt": {"quantize": "nf4", "grad_ckpt": True},
    "adamw8bit": {"optimizer": "adamw8bit"},
}
SEQ_LEN, MICRO_BSZ, PROMPT_FRACTION = 512, 4, 0.25


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(options: dict) -> dict:
    """One update in this process: its RSS growth and the model's prediction, in bytes."""
    import torch

    from sftplug.config import TrainConfig
    from sftplug.data.packing import IGNORE, Rows
    from sftplug.registry import build_registry
    from sftplug.train import memory
    from sftplug.train.setup import build_run

    n, t = 16, SEQ_LEN
    tokens = torch.randint(0, 8192, (n, t + 1), generator=torch.Generator().manual_seed(0))
    labels = tokens[:, 1:].clone()
    labels[:, : int(t * PROMPT_FRACTION)] = IGNORE
    rows = Rows(tokens[:, :-1].contiguous(), labels, torch.arange(t).expand(n, t).clone(),
                torch.zeros(n, t, dtype=torch.int32), torch.ones(n, dtype=torch.long))
    with tempfile.TemporaryDirectory(prefix="sftplug-memory-") as out:
        config = TrainConfig(model="w0", out=out, steps=1, micro_bsz=MICRO_BSZ, seq_len=t, dtype="fp32",
                             device="cpu", lora_r=16, lora_alpha=32, eval_data=None, warmup=0, **options)
        run = build_run(config, build_registry(), echo=lambda *a: None, rows=rows)
        Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS mark back to the current RSS
        before = rss_kib("VmRSS")
        run.update()
        growth = (rss_kib("VmHWM") - before) * 1024
        targets = int((labels[:MICRO_BSZ] != IGNORE).sum())
        setting = memory.Setting(mode=config.quantize if config.quantize != "none" else "lora", dtype="fp32",
                                 optimizer=config.optimizer, tokens=MICRO_BSZ * t, targets=targets,
                                 grad_ckpt=config.grad_ckpt, attention=run.attention.backend.name)  # no offload
        e = memory.estimate(run.model.config, setting)
        run.batches.close()
    return {"growth": growth, "predicted": e.gradients + e.optimizer + e.activations + e.loss_chunk,
            "attention": run.attention.backend.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    results = {name: [] for name in MODES}
    for r in range(args.rounds):
        order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
        for name in order:
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(MODES[name])], capture_output=True,
                                  text=True)
            if done.returncode:
                print(f"{name}: failed: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                continue
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    mib = 2**20
    base = statistics.median(x["growth"] for x in results["LoRA fp32"]) if results["LoRA fp32"] else None
    print("| mode | peak RSS growth MiB (each round) | median | / LoRA fp32 | predicted MiB | measured / predicted |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, runs in results.items():
        if not runs:
            print(f"| {name} | failed | | | | |")
            continue
        median = statistics.median(x["growth"] for x in runs)
        ratio = f"{median / base:.2f}x" if base else ""
        each = ", ".join(f"{x['growth'] / mib:,.0f}" for x in runs)
        predicted = runs[0]["predicted"]
        print(f"| {name} | {each} | {median / mib:,.0f} | {ratio} | {predicted / mib:,.0f} | "
              f"{median / predicted:.2f} |")
    print(f"attention: {results['LoRA fp32'][0]['attention'] if results['LoRA fp32'] else '?'}")


if __name__ == "__main__":
    main()
