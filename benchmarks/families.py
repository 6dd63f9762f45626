"""Each model family sftplug loads, from a ~300 MB sharded random checkpoint saved by transformers:
the logits' error against transformers (fp32), sftplug's load time and the host memory the load adds.

For every family a checkpoint of the same shape (hidden 1024, 4 layers, 16/8 heads of 64, vocab
16384, the family's own options on: sliding windows of 128 < the 256 tokens compared, partial
rotary, soft-capping, multipliers) is written with ``save_pretrained(max_shard_size="100MB")``;
a fresh process loads it with sftplug (peak RSS over the RSS after imports, from /proc, as in
benchmarks/load_memory.py) and compares 2 x 256 tokens' logits with transformers' eager model.

    python benchmarks/families.py [--family gemma2 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPE = dict(vocab_size=16384, hidden_size=1024, intermediate_size=2752, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=8, head_dim=64, max_position_embeddings=2048)
IDS_TOKENS = 256
GEMMA4 = dict(global_head_dim=128, num_global_key_value_heads=4, attention_k_eq_v=True, sliding_window=128,
              layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2, use_double_wide_mlp=True,
              hidden_size_per_layer_input=64, vocab_size_per_layer_input=16384, final_logit_softcapping=30.0)
FAMILIES = {
    "llama": dict(config_class="LlamaConfig"),
    "mistral": dict(config_class="MistralConfig", sliding_window=128),
    "qwen2": dict(config_class="Qwen2Config", use_sliding_window=True, sliding_window=128, max_window_layers=2),
    "qwen3": dict(config_class="Qwen3Config"),
    "gemma2": dict(config_class="Gemma2Config", query_pre_attn_scalar=48, sliding_window=128,
                   attn_logit_softcapping=2.0, final_logit_softcapping=2.0),
    "gemma3": dict(config_class="Gemma3TextConfig", query_pre_attn_scalar=48, sliding_window=128,
                   layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]),
    "phi3": dict(config_class="Phi3Config", partial_rotary_factor=0.75, sliding_window=128, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2),
    "olmo2": dict(config_class="Olmo2Config", pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # OLMo 3's long-context RoPE (YaRN on the full layer, the sliding layers' own) with lengths cut to 128
    "olmo3": dict(config_class="Olmo3Config", sliding_window=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
                                   "full_attention": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0,
                                                      "original_max_position_embeddings": 128}}),
    # Ministral-3's RoPE and query scale, its original length cut to 64 (the scale steps up 3 times)
    "ministral3": dict(config_class="Ministral3Config", pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                                        "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                                        "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}),
    # Gemma 4: per-layer inputs, full layers with their own head shape and keys as values, the last two layers
    # reusing earlier layers' keys and values with double-wide MLPs; and with experts beside each MLP
    "gemma4": dict(config_class="Gemma4TextConfig", **GEMMA4),
    "gemma4-moe": dict(config_class="Gemma4TextConfig", **GEMMA4, enable_moe_block=True, num_experts=8,
                       top_k_experts=2, moe_intermediate_size=256),
    "smollm3": dict(config_class="SmolLM3Config", pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "granite": dict(config_class="GraniteConfig", embedding_multiplier=12.0, residual_multiplier=0.22,
                    attention_multiplier=0.015625, logits_scaling=8.0),
}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build(folder: Path, family: str) -> int:
    """The family's random checkpoint, sharded, with the bundled tokenizer; returns its weight bytes."""
    import torch
    import transformers

    from sftplug.config import ASSETS

    options = dict(FAMILIES[family])
    config = getattr(transformers, options.pop("config_class"))(**SHAPE, **options)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # norms and biases away from their init, so they matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder, max_shard_size="100MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS / name, folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied embeddings once


def measure(folder: Path) -> dict:
    """In a fresh process: sftplug's load (time, memory), then the logits against transformers'."""
    import time

    import torch
    import transformers

    from sftplug.attention.choice import attach
    from sftplug.hf.load import read_hf_config
    from sftplug.loading import load_model
    from sftplug.model.transformer import Transformer
    from sftplug.registry import build_registry

    ids = torch.randint(0, SHAPE["vocab_size"], (2, IDS_TOKENS), generator=torch.Generator().manual_seed(1))
    with torch.device("meta"):  # imports and the attention probes outside the measurement
        attach(Transformer(read_hf_config(folder)), build_registry(), "auto", "cpu", torch.float32)
    baseline = status_kib("VmRSS")
    started = time.perf_counter()
    loaded = load_model(str(folder))
    seconds = time.perf_counter() - started
    peak = status_kib("VmHWM")
    with torch.no_grad():
        ours = loaded.model(ids)
        reference = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
        theirs = reference.eval()(ids).logits
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    return {"seconds": seconds, "added_kib": peak - baseline, "error": error,
            "attention": loaded.attention.backend.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="append", choices=list(FAMILIES), help="repeatable; default: all")
    parser.add_argument("--measure", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure))))
        return
    print(f"{'family':<9}{'weights MiB':>12}{'shards':>8}{'load s':>8}{'added MiB':>11}{'x weights':>10}"
          f"{'rel. error':>12}  attention")
    for family in args.family or FAMILIES:
        folder = Path(tempfile.mkdtemp(prefix=f"sftplug-{family}-"))
        try:
            weights = build(folder, family)
            shards = len(list(folder.glob("model-*.safetensors"))) or 1
            out = subprocess.run([sys.executable, __file__, "--measure", str(folder)], check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            added = r["added_kib"] * 1024
            print(f"{family:<9}{weights / 2**20:>12.0f}{shards:>8}{r['seconds']:>8.2f}{added / 2**20:>11.0f}"
                  f"{added / weights:>10.2f}{r['error']:>12.1e}  {r['attention']}", flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
