"""The Python steps of benchmarks/gpu_check.sh: python benchmarks/gpu_steps.py STEP OUT.

preflight  versions, imports and the GPU; writes OUT/skip when there is no GPU
compare    one W1 packed update with --attention triton against flash: loss and grad norm
           agree to 1e-3; tok/s and peak memory of a few updates each (OUT/compare.json)
syncs      the steady-state update under torch.cuda.set_sync_debug_mode("warn"): the GPU is
           read once per update, the stated read (OUT/syncs.json)
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import torch


def preflight(out: Path) -> None:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for name in ("triton", "transformers", "peft", "safetensors", "tokenizers", "pluggy", "click"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:  # a missing package is a finding, not a crash
            versions[name] = "missing"
    import sftplug
    from sftplug.registry import build_registry

    versions["sftplug"] = sftplug.__version__
    versions["plugins"] = {p.name: p.available for p in build_registry().plugins}
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name()
        versions["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        (out / "skip").write_text("no CUDA GPU on this machine\n")
    print(json.dumps(versions, indent=1))
    (out / "versions.json").write_text(json.dumps(versions, indent=1))


def _w1_run(attention: str, steps: int):
    """A W1 run (TinyLlama shape, bf16, LoRA) on the bundled data packed into 2048-token rows."""
    from sftplug.config import TrainConfig
    from sftplug.registry import build_registry
    from sftplug.train.setup import build_run

    config = TrainConfig(model="w1", dtype="bf16", seq_len=2048, micro_bsz=8, steps=steps, attention=attention,
                         out=tempfile.mkdtemp(prefix=f"sftplug-gpu-{attention}-"), eval_data=None, warmup=1,
                         profile=True)
    return build_run(config, build_registry(), echo=print)


def compare(out: Path) -> None:
    results = {}
    for attention in ("flash", "triton"):
        torch.manual_seed(0)
        run = _w1_run(attention, steps=4)
        torch.cuda.reset_peak_memory_stats()
        records = [run.update() for _ in range(4)]
        results[attention] = {"first_loss": records[0]["loss"], "first_grad_norm": records[0]["grad_norm"],
                              "tps": records[-1]["tps"], "mfu": records[-1].get("mfu"),
                              "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        del run
        torch.cuda.empty_cache()
    flash, triton = results["flash"], results["triton"]
    results["agree"] = all(abs(triton[k] - flash[k]) <= 1e-3 * abs(flash[k]) for k in ("first_loss", "first_grad_norm"))
    print(json.dumps(results, indent=1))
    (out / "compare.json").write_text(json.dumps(results, indent=1))
    if not results["agree"]:
        sys.exit("triton and flash disagree on the first update")


def syncs(out: Path) -> None:
    import sftplug.train.run as run_module

    run = _w1_run("auto", steps=4)
    run.update()  # compiles, autotunes and creates the optimizer state
    reads = {"stated": 0}
    real = run_module.host_values

    def counted(*tensors):
        reads["stated"] += 1
        return real(*tensors)

    run_module.host_values = counted
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            run.update()
    torch.cuda.set_sync_debug_mode("default")
    found = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    result = {"updates": 2, "stated_reads": reads["stated"], "syncs": len(found), "messages": sorted(set(found))}
    print(json.dumps(result, indent=1))
    (out / "syncs.json").write_text(json.dumps(result, indent=1))
    if len(found) > reads["stated"]:
        sys.exit(f"{len(found)} syncs in 2 updates, {reads['stated']} stated")


if __name__ == "__main__":
    step, out = sys.argv[1], Path(sys.argv[2])
    {"preflight": preflight, "compare": compare, "syncs": syncs}[step](out)
