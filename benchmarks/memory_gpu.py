"""Peak memory and tok/s of LoRA, QLoRA and QLoRA + offloading at W1 and an 8B Llama shape.

    python benchmarks/memory_gpu.py OUT [--shapes w1,llama-8b] [--modes lora,qlora,qlora-offload] [--steps 4]

Each (shape, mode) runs in a fresh process, so one peak never includes another's: a bf16
run on the bundled data packed into 2048-token rows, one warm-up update, then ``--steps``
timed ones; it reports tokens/s and ``torch.cuda.max_memory_allocated`` beside
sftplug.train.memory's predicted peak (every token counted a target: an upper bound). The 8B shape
(Llama-3.1-8B's dimensions) is a random model initialized on the GPU itself through a
``load_state`` plugin of this script: initializing 8B values on the host would take longer
than the measurement. ``--device cpu --shapes tiny`` runs the same code on the CPU (its test).
Results: one JSON line per run in OUT/memory.jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sftplug import hookimpl

MODES = {  # TrainConfig options of each mode
    "lora": {},
    "qlora": {"quantize": "nf4"},
    "qlora-offload": {"quantize": "nf4", "offload_activations": True},
    "qlora-offload-ckpt": {"quantize": "nf4", "offload_activations": True, "grad_ckpt": True},
}
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, n_layers=32, n_heads=32,
                n_kv_heads=8, rotary={"theta": 500000.0})


class DeviceInitialized:
    """Loads ``llama-8b``: Llama-3.1-8B's shape, random weights written on the target device."""

    @hookimpl
    def load_state(self, source, dtype, device):
        import torch

        from sftplug.config import ASSETS
        from sftplug.data.tokenizer import Tokenizer
        from sftplug.hf.load import empty_model
        from sftplug.loading import LoadedModel
        from sftplug.model.transformer import ModelConfig

        if source != "llama-8b":
            return None
        model = empty_model(ModelConfig(**LLAMA_8B), dtype or torch.bfloat16, device)
        generator = torch.Generator(device).manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02, generator=generator)
        # the bundled tokenizer's 1024 ids are a subset of the 8B vocabulary
        return LoadedModel(model, Tokenizer(ASSETS), source, "Llama-3.1-8B shape, random on the device")


def measure(shape: str, mode: str, steps: int, device: str) -> dict:
    import torch

    from sftplug.config import TrainConfig
    from sftplug.registry import build_registry
    from sftplug.train.memory import estimate
    from sftplug.train.setup import build_run

    registry = build_registry(entrypoints=False)
    registry.add("llama-8b", DeviceInitialized, source="benchmarks/memory_gpu.py")
    cuda = device == "cuda"
    config = TrainConfig(model=shape, device=device, dtype="bf16" if cuda else "fp32", seq_len=2048 if cuda else 64,
                         micro_bsz=1 if shape == "llama-8b" else 8, steps=steps + 1, eval_data=None, warmup=1,
                         out=tempfile.mkdtemp(prefix=f"sftplug-memory-{shape}-{mode}-"), **MODES[mode])
    run = build_run(config, registry, echo=lambda *a: None)
    mode_of_model = config.quantize if config.quantize != "none" else "lora"
    predicted = estimate(run.model.config, mode=mode_of_model, dtype=config.dtype,
                         tokens=config.micro_bsz * config.seq_len, grad_ckpt=config.grad_ckpt,
                         offload=config.offload_activations and cuda).peak
    run.update()  # warm-up: kernels chosen, allocator populated
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        record = run.update()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = steps * config.micro_bsz * config.accum * config.seq_len
    return {"shape": shape, "mode": mode, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__, "tokens_per_s": tokens / seconds, "loss": record["loss"],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "predicted_peak_gib": predicted / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shapes", default="w1,llama-8b")
    parser.add_argument("--modes", default="lora,qlora,qlora-offload")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--one", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.steps, args.device)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "memory.jsonl").open("a") as log:
        for shape in args.shapes.split(","):
            for mode in args.modes.split(","):
                done = subprocess.run([sys.executable, __file__, str(args.out), "--one", shape, mode, "--steps",
                                       str(args.steps), "--device", args.device], capture_output=True, text=True)
                line = done.stdout.strip().splitlines()[-1] if done.returncode == 0 else json.dumps(
                    {"shape": shape, "mode": mode, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
                print(line, flush=True)
                log.write(line + "\n")


if __name__ == "__main__":
    main()
