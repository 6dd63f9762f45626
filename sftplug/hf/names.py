"""HF-format models as sftplug sees them: config.json <-> ModelConfig, tensor names, PEFT names.

HF Llama-family checkpoints keep q/k/v and gate/up as separate tensors; sftplug fuses them
(``attn.qkv`` = rows [q; k; v], ``mlp.gate_up`` = rows [gate; up]). :func:`hf_layout` is the
single table both directions use: HF tensor name -> (sftplug parameter, first row, end row).

PEFT renames a wrapped layer's weight ``qkv.weight`` -> ``qkv.base_layer.weight``;
:func:`map_names_to_model` maps state-dict names either way, and :func:`load_state_dict_exact`
loads a state dict into a plain or wrapped model, failing loudly on any mismatch.
"""

from __future__ import annotations

import difflib
import re

import torch

from sftplug.dtypes import hf_dtype_name
from sftplug.errors import SftplugError
from sftplug.model.transformer import ModelConfig

# model_type -> the transformers class that loads it.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SHOW = 3  # keys named in one error message; the rest are counted

# Tensors some HF checkpoints carry that are derived from config.json, not learned.
IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# -- config.json <-> ModelConfig ------------------------------------------------------


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """The ModelConfig of an HF config.json (Llama 2/3/3.1, Mistral, Qwen2); the source is kept in ``extra``."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise SftplugError(
            f"{where}: model_type {model_type!r} is not supported; sftplug loads {', '.join(ARCHITECTURES)}"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int):
            raise SftplugError(f"{where}: {key} is missing or not an integer")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise SftplugError(f"{where}: hidden_act {act!r} is not supported (sftplug's MLP is SwiGLU: silu)")
    if model_type == "llama" and hf.get("attention_bias"):
        raise SftplugError(f"{where}: attention_bias=true (biases on q/k/v/o) is not supported")
    if hf.get("mlp_bias"):
        raise SftplugError(f"{where}: mlp_bias=true is not supported")
    theta, scaling = _rope_from_hf(hf, where)
    n_heads = hf["num_attention_heads"]
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or 0,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",  # Qwen2: biases on q/k/v, none on o
            architecture=model_type,
            extra=dict(hf),
        )
    except ValueError as exc:
        raise SftplugError(f"{where}: {exc}") from None


def _rope_from_hf(hf: dict, where: str) -> tuple[float, dict | None]:
    params = hf.get("rope_parameters")  # transformers 5: rope_theta lives inside
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:  # transformers 4: rope_theta + rope_scaling
        theta, scaling = hf.get("rope_theta", 10000.0), hf.get("rope_scaling")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise SftplugError(f"{where}: partial_rotary_factor is not supported")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind not in ("llama3", "linear"):
        raise SftplugError(f"{where}: rope type {kind!r} is not supported (supported: default, llama3, linear)")
    return theta, {k: v for k, v in scaling.items() if k != "rope_theta"}


def config_to_hf(config: ModelConfig, dtype: torch.dtype, tokenizer=None) -> dict:
    """The config.json that makes transformers build the same model as ``config``."""
    arch = config.architecture if config.architecture in ARCHITECTURES else "llama"
    if config.qkv_bias != (arch == "qwen2"):
        raise SftplugError(
            f"cannot export a {arch} model with qkv_bias={config.qkv_bias}: "
            "only Qwen2 has q/k/v biases without an o bias"
        )
    hf = {k: v for k, v in config.extra.items() if k not in ("transformers_version", "_name_or_path")}
    hf.update(
        architectures=[ARCHITECTURES[arch]],
        model_type=arch,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
    )
    if "head_dim" in hf or config.head_dim != config.hidden_size // config.n_heads:
        hf["head_dim"] = config.head_dim
    if arch == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    if "rope_parameters" in hf:  # keep the source's config style (transformers 5)
        hf["rope_parameters"] = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    else:
        hf.update(rope_theta=config.rope_theta, rope_scaling=config.rope_scaling)
    hf["dtype" if "dtype" in hf else "torch_dtype"] = hf_dtype_name(dtype)
    if tokenizer is not None:
        for key, value in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)):
            if hf.get(key) is None and value is not None:
                hf[key] = value
        if hf.get("pad_token_id") is None and tokenizer.pad_token is not None:
            hf["pad_token_id"] = tokenizer.pad_id
    return dict(sorted(hf.items()))


# -- tensor names ---------------------------------------------------------------------


def hf_layout(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """HF tensor name -> (sftplug parameter name, first row, end row) for every learned tensor."""
    q, kv, inter = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.intermediate_size
    plan = {
        "model.embed_tokens.weight": ("embed_tokens.weight", 0, config.vocab_size),
        "model.norm.weight": ("norm.weight", 0, config.hidden_size),
    }
    if not config.tie_embeddings:
        plan["lm_head.weight"] = ("lm_head.weight", 0, config.vocab_size)
    for i in range(config.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
            plan[f"{hf}self_attn.q_proj.{kind}"] = (f"{ours}attn.qkv.{kind}", 0, q)
            plan[f"{hf}self_attn.k_proj.{kind}"] = (f"{ours}attn.qkv.{kind}", q, q + kv)
            plan[f"{hf}self_attn.v_proj.{kind}"] = (f"{ours}attn.qkv.{kind}", q + kv, q + 2 * kv)
        plan[f"{hf}self_attn.o_proj.weight"] = (f"{ours}attn.o.weight", 0, config.hidden_size)
        plan[f"{hf}mlp.gate_proj.weight"] = (f"{ours}mlp.gate_up.weight", 0, inter)
        plan[f"{hf}mlp.up_proj.weight"] = (f"{ours}mlp.gate_up.weight", inter, 2 * inter)
        plan[f"{hf}mlp.down_proj.weight"] = (f"{ours}mlp.down.weight", 0, config.hidden_size)
        plan[f"{hf}input_layernorm.weight"] = (f"{ours}attn_norm.weight", 0, config.hidden_size)
        plan[f"{hf}post_attention_layernorm.weight"] = (f"{ours}mlp_norm.weight", 0, config.hidden_size)
    return plan


def hf_pieces(config: ModelConfig) -> dict[str, list[tuple[str, int, int]]]:
    """sftplug parameter name -> its HF tensors with their rows (the inverse of hf_layout)."""
    pieces: dict[str, list[tuple[str, int, int]]] = {}
    for hf_name, (ours, start, end) in hf_layout(config).items():
        pieces.setdefault(ours, []).append((hf_name, start, end))
    return pieces


def to_hf_state_dict(plain: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """sftplug weights (plain names) as HF tensors: q/k/v and gate/up split again (row views)."""
    pieces = hf_pieces(config)
    unknown = sorted(set(plain) - set(pieces) - ({"lm_head.weight"} if config.tie_embeddings else set()))
    missing = sorted(set(pieces) - set(plain))
    if unknown or missing:
        raise SftplugError(f"cannot export: {_few(unknown)} have no HF name; {_few(missing)} are missing")
    return {hf: plain[ours][start:end] for ours, parts in pieces.items() for hf, start, end in parts}


def map_names_to_model(state_dict_keys, model: torch.nn.Module) -> dict[str, str | None]:
    """For each state-dict name, the name of the same tensor in ``model``, or None if it has none.

    A name that ``model`` has maps to itself; ``x.qkv.weight`` maps to ``x.qkv.base_layer.weight``
    when ``model`` is PEFT-wrapped, and ``x.qkv.base_layer.weight`` to ``x.qkv.weight`` when it is not.
    """
    own = set(model.state_dict().keys())
    mapping: dict[str, str | None] = {}
    for key in state_dict_keys:
        if key in own:
            mapping[key] = key
            continue
        prefix, _, leaf = key.rpartition(".")
        wrapped = f"{prefix}.base_layer.{leaf}" if prefix else None
        plain = key.replace(".base_layer.", ".", 1) if ".base_layer." in key else None
        mapping[key] = wrapped if wrapped in own else plain if plain in own else None
    return mapping


def load_state_dict_exact(model: torch.nn.Module, state_dict: dict, source: str, expected=None) -> None:
    """Copy ``state_dict`` into ``model`` (plain or PEFT-wrapped), or raise naming every mismatch.

    :param source: the file the tensors came from, for the message.
    :param expected: the model names that must be present (default: every tensor of the model;
        tied weights count once).
    """
    own = model.state_dict(keep_vars=True)
    mapping = map_names_to_model(state_dict.keys(), model)
    unexpected = {k: source for k, target in mapping.items() if target is None}
    loaded = {target for target in mapping.values() if target is not None}
    aliases = _aliases(own)
    expected = set(own if expected is None else expected)
    missing = sorted(n for n in expected if not ({n} | aliases.get(n, set())) & loaded)
    wrong = [
        (k, source, tuple(t.shape), tuple(own[target].shape))
        for k, t in state_dict.items()
        if (target := mapping[k]) is not None and tuple(t.shape) != tuple(own[target].shape)
    ]
    if unexpected or missing or wrong:
        raise mismatch_error(source, unexpected, missing, wrong, expected_names=sorted(expected), missing_where=source)
    with torch.no_grad():
        for key, tensor in state_dict.items():
            own[mapping[key]].copy_(tensor)


def _aliases(own: dict) -> dict[str, set[str]]:
    """Names that share one tensor (tied embeddings): name -> the other names."""
    by_ptr: dict[tuple, list[str]] = {}
    for name, t in own.items():
        if t.device.type != "meta":
            by_ptr.setdefault((t.data_ptr(), tuple(t.shape)), []).append(name)
    return {n: set(group) - {n} for group in by_ptr.values() if len(group) > 1 for n in group}


# -- error messages -------------------------------------------------------------------


def natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _few(names, show: int = SHOW) -> str:
    names = sorted(names, key=natural_key)
    shown = ", ".join(f"'{n}'" for n in names[:show])
    return shown + (f" and {len(names) - show} more" if len(names) > show else "")


def _closest(name: str, candidates) -> str | None:
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def mismatch_error(
    where: str,
    unexpected: dict[str, str],
    missing: list[str],
    wrong: list[tuple[str, str, tuple, tuple]],
    expected_names,
    missing_where: str,
    note: str = "",
) -> SftplugError:
    """One line naming the unexpected, missing and wrongly shaped tensors, with the closest names."""
    parts = []
    if unexpected:
        first = sorted(unexpected, key=natural_key)[0]
        files = sorted(set(unexpected.values()))
        hint = _closest(first, set(expected_names) - set(unexpected))
        parts.append(
            f"{len(unexpected)} unexpected tensor{'s' * (len(unexpected) > 1)} {_few(unexpected)} "
            f"in {', '.join(files)}" + (f" (closest expected name for '{first}': '{hint}')" if hint else "")
        )
    if missing:
        first = sorted(missing, key=natural_key)[0]
        hint = _closest(first, unexpected)
        parts.append(
            f"{len(missing)} missing tensor{'s' * (len(missing) > 1)} {_few(missing)} "
            f"(not in {missing_where})" + (f" (closest name found: '{hint}')" if hint else "")
        )
    for key, file, got, want in sorted(wrong, key=lambda w: natural_key(w[0]))[:SHOW]:
        parts.append(f"'{key}' in {file} has shape {list(got)}, expected {list(want)}")
    if len(wrong) > SHOW:
        parts.append(f"{len(wrong) - SHOW} more wrongly shaped tensors")
    return SftplugError(f"{where}: the weights do not match the model: " + "; ".join(parts) + note)
