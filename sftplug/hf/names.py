"""HF tensor names as sftplug sees them: the fused layout, PEFT-wrapped names, and mismatch errors.

HF Llama-family checkpoints keep q/k/v and gate/up as separate tensors; sftplug fuses them
(``attn.qkv`` = rows [q; k; v], ``mlp.gate_up`` = rows [gate; up]). :func:`hf_layout` is the
single table both directions use: HF tensor name -> (sftplug parameter, first row, end row);
the rows of each projection are the model's own (sftplug.model.lora_targets.lora_layout).

PEFT renames a wrapped layer's weight ``qkv.weight`` -> ``qkv.base_layer.weight``;
:func:`map_names_to_model` maps state-dict names either way, and :func:`load_state_dict_exact`
loads a state dict into a plain or wrapped model, failing loudly on any mismatch.
"""

from __future__ import annotations

import re

import torch

from sftplug.errors import SftplugError, closest
from sftplug.model.config import ModelConfig
from sftplug.model.lora_targets import lora_layout  # also imported from here by code written before it moved

SHOW = 3  # keys named in one error message; the rest are counted

# Tensors some HF checkpoints carry that are derived from config.json, not learned.
IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# -- tensor names ---------------------------------------------------------------------

# ModelConfig.norm.placement -> HF norm name -> sftplug norm, per block (the same HF name means
# different norms in different families: post_attention_layernorm is Llama's pre-MLP norm).
NORM_NAMES = {
    "pre": {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"},
    "sandwich": {"input_layernorm": "attn_norm", "post_attention_layernorm": "attn_post_norm",
                 "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "mlp_post_norm"},
    "post": {"post_attention_layernorm": "attn_post_norm", "post_feedforward_layernorm": "mlp_post_norm"},
}


def hf_layout(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """HF tensor name -> (sftplug parameter name, first row, end row) for every learned tensor."""
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    projections = lora_layout(config)  # the HF projections each fused layer holds, with their rows
    plan = {
        "model.embed_tokens.weight": ("embed_tokens.weight", 0, config.vocab_size),
        "model.norm.weight": ("norm.weight", 0, config.hidden_size),
    }
    if not config.tie_embeddings:
        plan["lm_head.weight"] = ("lm_head.weight", 0, config.vocab_size)
    for i in range(config.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias") if config.attention.qkv_bias else ("weight",):
            for part, start, end in projections["qkv"]:
                plan[f"{hf}self_attn.{part}.{kind}"] = (f"{ours}attn.qkv.{kind}", start, end)
        for part, start, end in projections["gate_up"]:
            plan[f"{hf}mlp.{part}.weight"] = (f"{ours}mlp.gate_up.weight", start, end)
        plan[f"{hf}self_attn.o_proj.weight"] = (f"{ours}attn.o.weight", 0, config.hidden_size)
        plan[f"{hf}mlp.down_proj.weight"] = (f"{ours}mlp.down.weight", 0, config.hidden_size)
        if config.attention.qk_norm:
            per_head = config.attention.qk_norm == "head"
            plan[f"{hf}self_attn.q_norm.weight"] = (f"{ours}attn.q_norm.weight", 0, config.head_dim if per_head else q)
            plan[f"{hf}self_attn.k_norm.weight"] = (f"{ours}attn.k_norm.weight", 0, config.head_dim if per_head else kv)
        for hf_norm, our_norm in NORM_NAMES[config.norm.placement].items():
            plan[f"{hf}{hf_norm}.weight"] = (f"{ours}{our_norm}.weight", 0, config.hidden_size)
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
        hint = closest(first, set(expected_names) - set(unexpected))
        parts.append(
            f"{len(unexpected)} unexpected tensor{'s' * (len(unexpected) > 1)} {_few(unexpected)} "
            f"in {', '.join(files)}" + (f" (closest expected name for '{first}': '{hint}')" if hint else "")
        )
    if missing:
        first = sorted(missing, key=natural_key)[0]
        hint = closest(first, unexpected)
        parts.append(
            f"{len(missing)} missing tensor{'s' * (len(missing) > 1)} {_few(missing)} "
            f"(not in {missing_where})" + (f" (closest name found: '{hint}')" if hint else "")
        )
    for key, file, got, want in sorted(wrong, key=lambda w: natural_key(w[0]))[:SHOW]:
        parts.append(f"'{key}' in {file} has shape {list(got)}, expected {list(want)}")
    if len(wrong) > SHOW:
        parts.append(f"{len(wrong) - SHOW} more wrongly shaped tensors")
    return SftplugError(f"{where}: the weights do not match the model: " + "; ".join(parts) + note)
