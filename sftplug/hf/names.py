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
    """HF tensor name -> (sftplug parameter name, first row, end row) for every learned tensor.

    The rows of an experts' 3-D parameter are those of its first two dims flattened
    (:func:`rows_of`): expert e's gate_proj is rows [e·2I, e·2I + I) of gate_up_proj [E, 2I, H].
    """
    if config.architecture == "gemma4_text":  # q, k, v apart, per-layer inputs: a table of its own
        from sftplug.hf.gemma4_names import gemma4_layout

        return gemma4_layout(config)
    plan = {
        "model.embed_tokens.weight": ("embed_tokens.weight", 0, config.vocab_size),
        "model.norm.weight": ("norm.weight", 0, config.hidden_size),
    }
    if not config.tie_embeddings:
        plan["lm_head.weight"] = ("lm_head.weight", 0, config.vocab_size)
    for i in range(config.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        if config.layer_type(i).mixer == "linear_attention":
            plan.update(linear_attention_names(config, f"{hf}linear_attn.", f"{ours}attn."))
        else:
            plan.update(_attention_names(config, f"{hf}self_attn.", f"{ours}attn."))
        if config.layer_type(i).feed_forward == "experts":
            plan.update(experts_names(config, hf, f"{ours}mlp."))
        else:
            plan.update(_mlp_names(config, f"{hf}mlp.", f"{ours}mlp.", lora_layout(config)["gate_up"]))
        for hf_norm, our_norm in NORM_NAMES[config.norm.placement].items():
            plan[f"{hf}{hf_norm}.weight"] = (f"{ours}{our_norm}.weight", 0, config.hidden_size)
    return plan


def _attention_names(config: ModelConfig, hf: str, ours: str) -> dict[str, tuple[str, int, int]]:
    q, kv, hidden = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.hidden_size
    attention, plan = config.attention, {}
    for kind in ("weight", "bias") if attention.qkv_bias else ("weight",):
        for part, start, end in lora_layout(config)["qkv"]:
            plan[f"{hf}{part}.{kind}"] = (f"{ours}qkv.{kind}", start, end)
    for kind in ("weight", "bias") if attention.o_bias else ("weight",):
        plan[f"{hf}o_proj.{kind}"] = (f"{ours}o.{kind}", 0, hidden)
    if attention.qk_norm:
        per_head = attention.qk_norm == "head"
        plan[f"{hf}q_norm.weight"] = (f"{ours}q_norm.weight", 0, config.head_dim if per_head else q)
        plan[f"{hf}k_norm.weight"] = (f"{ours}k_norm.weight", 0, config.head_dim if per_head else kv)
    if attention.sinks:
        plan[f"{hf}sinks"] = (f"{ours}sinks", 0, config.n_heads)
    return plan


def linear_attention_names(config: ModelConfig, hf: str, ours: str) -> dict[str, tuple[str, int, int]]:
    """A Gated DeltaNet layer's tensors: the same names as the family stores them."""
    o, hidden = config.linear_attention, config.hidden_size
    key, value = o.key_heads * o.key_head_dim, o.value_heads * o.value_head_dim
    rows = {"conv1d": 2 * key + value, "out_proj": hidden}
    if o.projections == "grouped":
        rows.update(in_proj_qkvz=2 * key + 2 * value, in_proj_ba=2 * o.value_heads)
    else:
        rows.update(in_proj_qkv=2 * key + value, in_proj_z=value, in_proj_b=o.value_heads, in_proj_a=o.value_heads)
    plan = {f"{hf}{name}.weight": (f"{ours}{name}.weight", 0, n) for name, n in rows.items()}
    plan[f"{hf}norm.weight"] = (f"{ours}norm.weight", 0, o.value_head_dim)
    for name in ("dt_bias", "A_log"):
        plan[f"{hf}{name}"] = (f"{ours}{name}", 0, o.value_heads)
    return plan


def _mlp_names(config: ModelConfig, hf: str, ours: str, gate_up) -> dict[str, tuple[str, int, int]]:
    """A gated MLP's projections: ``gate_up`` the (HF projection, first row, end row) its gate_up holds."""
    plan = {f"{hf}{part}.weight": (f"{ours}gate_up.weight", start, end) for part, start, end in gate_up}
    plan[f"{hf}down_proj.weight"] = (f"{ours}down.weight", 0, config.hidden_size)
    return plan


# model_type -> (the MoE block's HF name, the router's, each expert's gate, up and down projections as stored
# one by one, or None where the experts are stored stacked, the shared expert's and its gate's)
MOE_NAMES = {
    "mixtral": ("block_sparse_moe", "gate", ("w1", "w3", "w2"), None, None),
    "gpt_oss": ("mlp", "router", None, None, None),
    "qwen2_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), "shared_expert", "shared_expert_gate"),
    "glm4_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), "shared_experts", None),
    "qwen3_next": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), "shared_expert", "shared_expert_gate"),
    "qwen3_5_moe_text": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), "shared_expert", "shared_expert_gate"),
}
DEFAULT_MOE_NAMES = ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"), None, None)  # Qwen3-MoE, OLMoE


def experts_names(config: ModelConfig, hf_layer: str, ours: str) -> dict[str, tuple[str, int, int]]:
    """An MoE layer's HF tensors: the router, the experts (one by one or stacked) and the shared expert."""
    block, router, per_expert, shared, shared_gate = MOE_NAMES.get(config.architecture, DEFAULT_MOE_NAMES)
    o, hidden, inter = config.experts, config.hidden_size, config.experts.intermediate_size
    hf = f"{hf_layer}{block}."
    plan = {f"{hf}{router}.weight": (f"{ours}router.weight", 0, o.count)}
    if o.router_bias:
        plan[f"{hf}{router}.bias"] = (f"{ours}router.bias", 0, o.count)
    if o.router == "sigmoid_groups":
        plan[f"{hf}{router}.e_score_correction_bias"] = (f"{ours}router.e_score_correction_bias", 0, o.count)
    if per_expert is None:  # stacked as in memory
        for name, (out, inp) in {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}.items():
            rows = o.count * (inp if o.transposed else out)
            plan[f"{hf}experts.{name}"] = (f"{ours}experts.{name}", 0, rows)
            if o.bias:
                plan[f"{hf}experts.{name}_bias"] = (f"{ours}experts.{name}_bias", 0, o.count)
    else:
        gate, up, down = per_expert
        for e in range(o.count):
            expert, gate_up = f"{hf}experts.{e}.", 2 * inter * e
            plan[f"{expert}{gate}.weight"] = (f"{ours}experts.gate_up_proj", gate_up, gate_up + inter)
            plan[f"{expert}{up}.weight"] = (f"{ours}experts.gate_up_proj", gate_up + inter, gate_up + 2 * inter)
            plan[f"{expert}{down}.weight"] = (f"{ours}experts.down_proj", hidden * e, hidden * (e + 1))
    if o.shared_size:
        parts = (("gate_proj", 0, o.shared_size), ("up_proj", o.shared_size, 2 * o.shared_size))
        plan.update(_mlp_names(config, f"{hf}{shared}.", f"{ours}shared.", parts))
    if o.shared_gate:
        plan[f"{hf}{shared_gate}.weight"] = (f"{ours}shared_gate.weight", 0, 1)
    return plan


def rows_of(tensor: torch.Tensor) -> torch.Tensor:
    """The rows hf_layout's row ranges index: an experts' 3-D parameter with its first two dims flattened."""
    return tensor.flatten(0, 1) if tensor.dim() == 3 else tensor


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
    return {hf: _piece(plain[ours], start, end) for ours, parts in pieces.items() for hf, start, end in parts}


def _piece(tensor: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of ``tensor`` as HF stores them: all of it keeps its shape (stacked experts)."""
    rows = rows_of(tensor)
    return tensor if (start, end) == (0, len(rows)) else rows[start:end]


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
