"""Peak host memory of loading a sharded HF checkpoint, against the size of its weights.

Builds a ~320 MB fp32 Llama-shape checkpoint (3 shards + index, q/k/v split as in HF) in a
temporary folder, then loads it in fresh subprocesses and reads each one's peak resident
set (VmHWM in /proc/self/status: tracemalloc and getrusage do not see torch's allocator
the same way, and a fresh process gives a clean high-water mark):

* sftplug   sftplug's HF loader (meta-device model, tensors read straight into fused params)
* naive     what the seed script did: build the model with random init, load_file() each
            shard into a state dict, torch.cat q/k/v and gate/up, load_state_dict

The number that matters is (peak - RSS after imports) / weight bytes: 1.0 is the floor
(the model itself).

    python benchmarks/load_memory.py [--layers 4] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=16384,
    hidden_size=1024,
    intermediate_size=2752,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    torch_dtype="float32",
)


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def hf_shapes(c: dict) -> dict[str, tuple]:
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q), p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })  # fmt: skip
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


def build(folder: Path, config: dict, n_shards: int = 3) -> int:
    """Write the checkpoint shard by shard; returns the weight bytes."""
    import torch
    from safetensors.torch import save_file

    from sftplug.config import ASSETS

    shapes = hf_shapes(config)
    total = sum(4 * torch.Size(s).numel() for s in shapes.values())
    names, weight_map, shard, size, written = list(shapes), {}, {}, 0, 0
    generator = torch.Generator().manual_seed(0)

    def flush():
        nonlocal shard, size, written
        written += 1
        name = f"model-{written:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, str(folder / name), {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for key in names:
        shard[key] = torch.randn(shapes[key], generator=generator) * 0.02
        size += shard[key].numel() * 4
        if size >= total / n_shards and written < n_shards - 1:
            flush()
    flush()
    if written != n_shards:  # name the files by the count actually written
        for old in sorted(folder.glob("model-*.safetensors")):
            old.rename(folder / old.name.replace(f"-of-{n_shards:05d}", f"-of-{written:05d}"))
        weight_map = {k: v.replace(f"-of-{n_shards:05d}", f"-of-{written:05d}") for k, v in weight_map.items()}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / name, folder)
    return total


def measure(mode: str, folder: Path) -> dict:
    """Runs in a fresh subprocess: load the folder one way, report memory in KiB."""
    import time

    import torch
    from safetensors.torch import load_file

    from sftplug.attention.choice import attach
    from sftplug.hf.load import load_hf_folder, read_hf_config
    from sftplug.hf.names import hf_layout
    from sftplug.model.transformer import Transformer
    from sftplug.registry import build_registry

    config = read_hf_config(folder)
    with torch.device("meta"):  # warm up imports and the attention probe outside the measurement
        attach(Transformer(config), build_registry(), "auto", "cpu", torch.float32)
    baseline = status_kib("VmRSS")
    started = time.perf_counter()
    if mode == "sftplug":
        model = load_hf_folder(folder).model
    else:
        model = Transformer(config)
        model.init_weights(0)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        state = {}
        for name in sorted(set(index["weight_map"].values())):
            state.update(load_file(str(folder / name)))
        fused: dict[str, list] = {}
        for hf_name, (ours, start, _) in hf_layout(config).items():
            fused.setdefault(ours, []).append((start, state.pop(hf_name)))
        fused_state = {k: torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])]) for k, parts in fused.items()}
        model.load_state_dict(fused_state)
        del fused_state
    seconds = time.perf_counter() - started
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = status_kib("VmHWM")
    return {"mode": mode, "baseline_kib": baseline, "peak_kib": peak, "param_bytes": params, "s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    parser.add_argument("--keep", type=Path, help="build the checkpoint here and keep it")
    parser.add_argument("--measure", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="sftplug-load-memory-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        weight_bytes = build(folder, {**CONFIG, "num_hidden_layers": args.layers})
        shards = len(list(folder.glob("model-*.safetensors")))
        print(f"checkpoint: {weight_bytes / 2**20:.0f} MiB fp32 in {shards} shards ({folder})")
        for mode in ("sftplug", "naive"):
            out = subprocess.run(
                [sys.executable, __file__, "--measure", mode, str(folder)], check=True, capture_output=True, text=True
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            extra = r["peak_kib"] * 1024 - r["baseline_kib"] * 1024
            print(
                f"{mode:<8} peak RSS {r['peak_kib'] / 1024:7.0f} MiB  "
                f"after imports {r['baseline_kib'] / 1024:5.0f} MiB  "
                f"load added {extra / 2**20:6.0f} MiB = {extra / weight_bytes:.2f}x the weights  ({r['s']:.2f} s)"
            )
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
