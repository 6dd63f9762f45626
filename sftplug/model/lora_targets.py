"""What a LoRA can target: the model's linear layers, named by the HF projections they hold.

sftplug keeps q/k/v fused in ``qkv`` (rows [q; k; v]) and gate/up in ``gate_up`` (rows
[gate; up]); HF and PEFT name the projections (``q_proj`` ... ``down_proj``, ``lm_head``).
:func:`lora_layout` says which rows of which layer each projection is: the model's own
layout, which sftplug.hf.names spells out as HF tensor names. ``--lora-targets`` names
projections, the fused names (``qkv``) standing for all they hold (:func:`hf_targets`).

A mixture of experts keeps its experts' projections as stacked 3-D parameters, not linear
layers: ``experts.gate_up_proj`` and ``experts.down_proj`` (transformers' parameter names, which
PEFT's ``target_parameters`` names) target them (sftplug.model.experts_lora).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sftplug.errors import SftplugError

if TYPE_CHECKING:
    from sftplug.model.config import ModelConfig

LORA_VARIANTS = ("lora", "dora")  # PEFT's LoRA, and DoRA (its use_dora)

# sftplug layer -> the HF projections it holds, in row order.
LORA_PARTS = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    **{name[0]: (name,) for name in ("q_proj", "k_proj", "v_proj")},  # kept apart (Gemma 4: q, k, v)
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
    # a Gated DeltaNet layer's (Qwen3.5: in_proj_qkv, z, b, a; Qwen3-Next: in_proj_qkvz, ba), as stored
    **{name: (name,) for name in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "in_proj_qkvz", "in_proj_ba",
                                  "out_proj")},
    "lm_head": ("lm_head",),
}
LORA_TARGETS = tuple(dict.fromkeys(part for parts in LORA_PARTS.values() for part in parts))  # HF order
LINEAR_ATTENTION_TARGETS = LORA_TARGETS[LORA_TARGETS.index("in_proj_qkv"):LORA_TARGETS.index("lm_head")]
LORA_ALIASES = {layer: parts for layer, parts in LORA_PARTS.items() if layer != "lm_head"}  # earlier names
EXPERTS_TARGETS = ("experts.gate_up_proj", "experts.down_proj")  # an MoE's stacked experts (PEFT target_parameters)
# --lora-targets' default: every block projection (each model has some of them); the experts where it has them
DEFAULT_LORA_TARGETS = LORA_TARGETS[:-1] + EXPERTS_TARGETS
# Projections some checkpoints store fused (Phi-3/4): PEFT's LoRA there is one layer, one A for all parts.
STORED_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def hf_targets(targets) -> tuple[str, ...]:
    """``--lora-targets`` as HF projection names, in HF order (qkv, o, gate_up, down are aliases)."""
    names = set()
    aliases = {**LORA_ALIASES, **STORED_FUSED}
    for name in targets:
        name = name.removeprefix("mlp.")  # mlp.experts.down_proj, as PEFT's target_parameters may spell it
        if name not in LORA_TARGETS and name not in EXPERTS_TARGETS and name not in aliases:
            raise SftplugError(
                f"--lora-targets: no linear layer named {name}; this model has {', '.join(LORA_TARGETS)} "
                f"(or the fused {', '.join(aliases)}; the experts of a mixture: {', '.join(EXPERTS_TARGETS)})"
            )
        names.update(aliases.get(name, (name,)))
    if not names:
        raise SftplugError("--lora-targets: name at least one linear layer")
    return tuple(t for t in LORA_TARGETS + EXPERTS_TARGETS if t in names)


def lora_layout(config: ModelConfig) -> dict[str, tuple[tuple[str, int, int], ...]]:
    """sftplug layer name -> (HF projection, first row, end row) of each projection it holds."""
    q, kv, inter = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.intermediate_size
    q *= 2 if config.attention.output_gate else 1  # each query head followed by its output gate (Qwen3.5)
    linear = config.linear_attention
    key, value = linear.key_heads * linear.key_head_dim, linear.value_heads * linear.value_head_dim
    hv = linear.value_heads
    rows = {"qkv": (0, q, q + kv, q + 2 * kv), "q": (0, q), "k": (0, kv), "v": (0, kv),
            "o": (0, config.hidden_size), "gate_up": (0, inter, 2 * inter),
            "down": (0, config.hidden_size), "lm_head": (0, config.vocab_size),
            "in_proj_qkv": (0, 2 * key + value), "in_proj_z": (0, value), "in_proj_b": (0, hv), "in_proj_a": (0, hv),
            "in_proj_qkvz": (0, 2 * key + 2 * value), "in_proj_ba": (0, 2 * hv), "out_proj": (0, config.hidden_size)}
    layout = {layer: tuple((part, rows[layer][i], rows[layer][i + 1]) for i, part in enumerate(parts))
              for layer, parts in LORA_PARTS.items()}
    if config.architecture == "phi3":  # one HF projection each, as the checkpoint stores them
        layout.update(qkv=(("qkv_proj", 0, q + 2 * kv),), gate_up=(("gate_up_proj", 0, 2 * inter),))
    return layout


def layer_parts(layout, layer: str, out_features: int) -> tuple[tuple[str, int, int], ...]:
    """:func:`lora_layout`'s parts of one linear layer with ``out_features`` rows: a gated MLP's
    gate/up halves are those of its own width (an MoE's shared expert is narrower than a dense MLP)."""
    parts = layout[layer]
    if len(parts) == 1:  # all its rows (Phi-3's one gate_up_proj; Gemma 4's q, k, v, whose sizes vary by layer)
        return ((parts[0][0], 0, out_features),)
    if layer != "gate_up":
        return parts
    half = out_features // 2
    return ((parts[0][0], 0, half), (parts[1][0], half, out_features))


def targeted(part: str, targets) -> bool:
    """Whether the HF projection ``part`` is among ``targets`` (HF names); a projection stored fused
    (Phi-3's qkv_proj) is when all it holds are, and cannot be in part."""
    members = STORED_FUSED.get(part, (part,))
    chosen = [m for m in members if m in targets]
    if chosen and len(chosen) < len(members):
        raise SftplugError(f"--lora-targets: this checkpoint stores {', '.join(members)} as one {part} (PEFT's LoRA "
                           f"there is one layer): target {', '.join(members)} together, or name {part}")
    return bool(chosen)
