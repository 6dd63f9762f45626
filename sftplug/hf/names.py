"""HF tensor names as sftplug sees them: the fused layout, PEFT names, and mismatch errors.

HF Llama-family checkpoints keep q/k/v and gate/up as separate tensors; sftplug fuses them
(``attn.qkv`` = rows [q; k; v], ``mlp.gate_up`` = rows [gate; up]). :func:`hf_layout` is the
single table both directions use: HF tensor name -> (sftplug parameter, first row, end row).

LoRA targets are named as HF and PEFT name them (``q_proj`` ... ``down_proj``, ``lm_head``);
:func:`lora_layout` says which rows of which sftplug layer each one is.

PEFT renames a wrapped layer's weight ``qkv.weight`` -> ``qkv.base_layer.weight``;
:func:`map_names_to_model` maps state-dict names either way, and :func:`load_state_dict_exact`
loads a state dict into a plain or wrapped model, failing loudly on any mismatch.
"""

from __future__ import annotations

import re

import torch

from sftplug.errors import SftplugError, closest
from sftplug.model.transformer import ModelConfig

SHOW = 3  # keys named in one error message; the rest are counted

# Tensors some HF checkpoints carry that are derived from config.json, not learned.
IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# LoRA targets: sftplug layer -> the HF projections it holds, in row order.
LORA_PARTS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
    "lm_head": ("lm_head",),
}
LORA_TARGETS = tuple(part for parts in LORA_PARTS.values() for part in parts)  # HF order
LORA_ALIASES = {layer: parts for layer, parts in LORA_PARTS.items() if layer != "lm_head"}  # earlier names
# Projections some checkpoints store fused (Phi-3/4): PEFT's LoRA there is one layer, one A for all parts.
STORED_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def hf_targets(targets) -> tuple[str, ...]:
    """``--lora-targets`` as HF projection names, in HF order (qkv, o, gate_up, down are aliases)."""
    names = set()
    aliases = {**LORA_ALIASES, **STORED_FUSED}
    for name in targets:
        if name not in LORA_TARGETS and name not in aliases:
            raise SftplugError(
                f"--lora-targets: no linear layer named {name}; this model has {', '.join(LORA_TARGETS)} "
                f"(or the fused {', '.join(aliases)})"
            )
        names.update(aliases.get(name, (name,)))
    if not names:
        raise SftplugError("--lora-targets: name at least one linear layer")
    return tuple(t for t in LORA_TARGETS if t in names)


# -- tensor names ---------------------------------------------------------------------

# ModelConfig.norms -> HF norm name -> sftplug norm, per block (the same HF name means
# different norms in different families: post_attention_layernorm is Llama's pre-MLP norm).
NORM_NAMES = {
    "pre": {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"},
    "sandwich": {"input_layernorm": "attn_norm", "post_attention_layernorm": "attn_post_norm",
                 "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "mlp_post_norm"},
    "post": {"post_attention_layernorm": "attn_post_norm", "post_feedforward_layernorm": "mlp_post_norm"},
}


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
        if config.architecture == "phi3":  # stored fused already, in sftplug's row order
            plan[f"{hf}self_attn.qkv_proj.weight"] = (f"{ours}attn.qkv.weight", 0, q + 2 * kv)
            plan[f"{hf}mlp.gate_up_proj.weight"] = (f"{ours}mlp.gate_up.weight", 0, 2 * inter)
        else:
            for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
                plan[f"{hf}self_attn.q_proj.{kind}"] = (f"{ours}attn.qkv.{kind}", 0, q)
                plan[f"{hf}self_attn.k_proj.{kind}"] = (f"{ours}attn.qkv.{kind}", q, q + kv)
                plan[f"{hf}self_attn.v_proj.{kind}"] = (f"{ours}attn.qkv.{kind}", q + kv, q + 2 * kv)
            plan[f"{hf}mlp.gate_proj.weight"] = (f"{ours}mlp.gate_up.weight", 0, inter)
            plan[f"{hf}mlp.up_proj.weight"] = (f"{ours}mlp.gate_up.weight", inter, 2 * inter)
        plan[f"{hf}self_attn.o_proj.weight"] = (f"{ours}attn.o.weight", 0, config.hidden_size)
        plan[f"{hf}mlp.down_proj.weight"] = (f"{ours}mlp.down.weight", 0, config.hidden_size)
        if config.qk_norm:
            per_head = config.qk_norm == "head"
            plan[f"{hf}self_attn.q_norm.weight"] = (f"{ours}attn.q_norm.weight", 0, config.head_dim if per_head else q)
            plan[f"{hf}self_attn.k_norm.weight"] = (f"{ours}attn.k_norm.weight", 0, config.head_dim if per_head else kv)
        for hf_norm, our_norm in NORM_NAMES[config.norms].items():
            plan[f"{hf}{hf_norm}.weight"] = (f"{ours}{our_norm}.weight", 0, config.hidden_size)
    return plan


def lora_layout(config: ModelConfig) -> dict[str, tuple[tuple[str, int, int], ...]]:
    """sftplug layer name -> (HF projection, first row, end row) of each projection it holds."""
    q, kv, inter = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.intermediate_size
    rows = {"qkv": (0, q, q + kv, q + 2 * kv), "o": (0, config.hidden_size), "gate_up": (0, inter, 2 * inter),
            "down": (0, config.hidden_size), "lm_head": (0, config.vocab_size)}
    layout = {layer: tuple((part, rows[layer][i], rows[layer][i + 1]) for i, part in enumerate(parts))
              for layer, parts in LORA_PARTS.items()}
    if config.architecture == "phi3":  # one HF projection each, as the checkpoint stores them
        layout.update(qkv=(("qkv_proj", 0, q + 2 * kv),), gate_up=(("gate_up_proj", 0, 2 * inter),))
    return layout


def targeted(part: str, targets) -> bool:
    """Whether the HF projection ``part`` is among ``targets`` (HF names); a projection stored fused
    (Phi-3's qkv_proj) is when all it holds are, and cannot be in part."""
    members = STORED_FUSED.get(part, (part,))
    chosen = [m for m in members if m in targets]
    if chosen and len(chosen) < len(members):
        raise SftplugError(f"--lora-targets: this checkpoint stores {', '.join(members)} as one {part} (PEFT's LoRA "
                           f"there is one layer): target {', '.join(members)} together, or name {part}")
    return bool(chosen)


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
