"""The model's configuration: its sizes, the options of each part (rotary, norms, attention,
feed-forward) in a group of their own, and each layer's kind of token mixer and feed-forward.

The dense families' options (Qwen3, Gemma 2/3, Phi-3/4, OLMo 2, SmolLM3, Granite, sliding
windows) are off by default: a plain ModelConfig is a Llama. Checkpoints saved before the
options were grouped hold them as one flat dict, which :meth:`ModelConfig.from_dict` reads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from sftplug.fused import pytorch

# The kinds of attention layer RoPE is set per (sftplug.model.rope.rope_kind): HF's layer_types names.
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass
class Rope:
    """One RoPE: its base frequency, its scaling and the dims of each head it rotates."""

    theta: float = 10000.0
    scaling: dict | None = None  # {"rope_type": "llama3" | "linear" | "longrope" | "yarn", ...}; None: unscaled
    dims: int = 0  # 0: the model's rotary dims (ModelConfig sets them)


@dataclass
class RotaryConfig:
    """RoPE: its base frequency and scaling, the dims of each head it rotates and the layers it rotates
    in; the sliding-window layers may have a RoPE of their own (Gemma 3, OLMo 3).

    ``theta``, ``scaling`` and ``dims`` are the full-attention layers' RoPE, and every layer's
    where ``sliding`` is None; :meth:`of` gives each kind's as a :class:`Rope`.
    """

    theta: float = 10000.0
    scaling: dict | None = None  # Llama-3.1 style {"rope_type": "llama3", ...}
    dims: int = 0  # dims of each head RoPE rotates (partial_rotary_factor); 0: head_dim
    layers: tuple[bool, ...] = ()  # which layers apply RoPE (SmolLM3 has layers without); (): all
    sliding: Rope | None = None  # the sliding-window layers' own RoPE (a saved config holds a dict)

    def __post_init__(self):
        self.layers = tuple(self.layers)
        if isinstance(self.sliding, dict):
            self.sliding = Rope(**self.sliding)

    def applies_to(self, layer: int) -> bool:
        return self.layers[layer] if self.layers else True

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of layer with a RoPE of their own."""
        return (FULL, SLIDING) if self.sliding else (FULL,)

    def of(self, kind: str) -> Rope:
        """The RoPE of the layers of this kind (FULL or SLIDING)."""
        if kind == SLIDING and self.sliding:
            return self.sliding
        return Rope(self.theta, self.scaling, self.dims)


@dataclass
class NormConfig:
    """The RMSNorms: their epsilon, where they sit in a block, and their form."""

    eps: float = 1e-5
    placement: str = "pre"  # "pre" (Llama), "sandwich": before and after each sublayer (Gemma), "post" (OLMo 2)
    gemma: bool = False  # RMSNorm as (1 + w) * x in fp32 (Gemma)

    def __post_init__(self):
        _check_choice("norm placement", self.placement, ("pre", "sandwich", "post"))


@dataclass
class AttentionConfig:
    """The softmax attention mixer: its projections, q/k norms, windows, scale and soft-cap."""

    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False  # a bias on the output projection too (gpt-oss)
    sinks: bool = False  # a learned logit per head in the softmax's denominator (gpt-oss)
    output_gate: bool = False  # q_proj also gives a gate per head: output times its sigmoid (Qwen3.5, Qwen3-Next)
    qk_norm: str = ""  # RMSNorm of q and k: "head" per head (Qwen3, Gemma 3), "projection" whole (OLMo 2)
    windows: tuple[int, ...] = ()  # each layer's sliding window, 0 for full attention; (): none
    scale: float = 0.0  # softmax scale; 0: head_dim ** -0.5 (Gemma's query_pre_attn_scalar, Granite)
    softcap: float = 0.0  # attention scores soft-capped at this (Gemma 2); 0: none
    # queries times 1 + beta * log(1 + floor(position / period)) after RoPE (Llama 4's, Ministral 3); 0: none
    query_scale_beta: float = 0.0
    query_scale_period: int = 0  # original_max_position_embeddings

    def __post_init__(self):
        self.windows = tuple(self.windows)
        _check_choice("qk_norm", self.qk_norm, ("", "head", "projection"))
        if self.query_scale_beta and self.query_scale_period <= 0:
            raise ValueError(f"query_scale_beta {self.query_scale_beta} needs a query_scale_period of at least 1")

    def window(self, layer: int) -> int:
        return self.windows[layer] if self.windows else 0


@dataclass
class FeedForwardConfig:
    """The gated MLP."""

    activation: str = "silu"  # silu (SwiGLU) or gelu_tanh (GeGLU, Gemma)

    def __post_init__(self):
        _check_choice("activation", self.activation, pytorch.ACTIVATIONS)


@dataclass
class ExpertsConfig:
    """A mixture of experts: the router, the experts (stacked, as transformers 5 stores them) and
    the shared expert beside them. ``count`` 0: the model has none."""

    count: int = 0  # routed experts per MoE layer
    top_k: int = 0  # experts per token
    intermediate_size: int = 0  # of each expert
    # "softmax": softmax, then the top k (Qwen, Mixtral, OLMoE); "logits": the top k logits, then
    # their softmax (gpt-oss); "sigmoid_groups": sigmoid scores, top k within the best groups, in fp32 (GLM-4.5);
    # "gemma4": Gemma 4's, which norms and scales its input and scales each expert's weight (sftplug.model.gemma4_moe)
    router: str = "softmax"
    norm_top_k: bool = False  # the chosen weights renormalised to sum to 1
    router_bias: bool = False  # the router has a bias (gpt-oss)
    groups: int = 1  # sigmoid_groups: expert groups, ...
    top_groups: int = 1  # ... of which the best top_groups are searched
    scale: float = 1.0  # the chosen weights times this (GLM-4.5's routed_scaling_factor)
    bias: bool = False  # the experts' projections have biases (gpt-oss)
    # "silu": SwiGLU over gate_up's halves, "gelu_tanh": GeGLU (Gemma 4); "clamped_swiglu": gpt-oss's, over
    # interleaved gate/up columns
    activation: str = "silu"
    swiglu_alpha: float = 1.702  # clamped_swiglu: gate * sigmoid(alpha * gate) ...
    swiglu_limit: float = 7.0  # ... with gate and up clamped at this
    transposed: bool = False  # stored [experts, in, out] (gpt-oss), not [experts, out, in]
    shared_size: int = 0  # intermediate size of the shared expert (Qwen2-MoE, GLM-4.5); 0: none
    shared_gate: bool = False  # the shared expert's output times sigmoid(a linear gate) (Qwen2-MoE)
    aux_loss_coef: float = 0.0  # the load-balancing loss's coefficient the model was trained with

    def __post_init__(self):
        _check_choice("router", self.router, ("softmax", "logits", "sigmoid_groups", "gemma4"))
        _check_choice("experts activation", self.activation, ("silu", "gelu_tanh", "clamped_swiglu"))
        if self.count and not 0 < self.top_k <= self.count:
            raise ValueError(f"experts top_k {self.top_k} must be between 1 and the {self.count} experts")
        if self.count % self.groups or not 0 < self.top_groups <= self.groups:
            raise ValueError(f"{self.count} experts cannot form {self.groups} groups of which {self.top_groups} "
                             "are searched")


@dataclass
class LinearAttentionConfig:
    """The Gated DeltaNet token mixer (Qwen3.5, Qwen3-Next): its heads, the causal convolution before
    the gated delta rule, and how its input projections are stored."""

    key_heads: int = 0  # q/k heads; 0: the model has no linear-attention layers
    value_heads: int = 0  # a multiple of key_heads
    key_head_dim: int = 128
    value_head_dim: int = 128
    conv_kernel: int = 4  # the depthwise causal convolution's width
    # "split": in_proj_qkv, in_proj_z, in_proj_b, in_proj_a (Qwen3.5); "grouped": in_proj_qkvz and
    # in_proj_ba, interleaved per key head (Qwen3-Next)
    projections: str = "split"

    def __post_init__(self):
        _check_choice("linear attention projections", self.projections, ("split", "grouped"))
        if self.key_heads and self.value_heads % self.key_heads:
            raise ValueError(f"linear attention: {self.value_heads} value heads are not a multiple of "
                             f"{self.key_heads} key heads")


@dataclass
class Gemma4Options:
    """Gemma 4's block options (sftplug.model.gemma4): each layer's own input embedding, the
    full-attention layers' own head shape, keys used as values there, and the last layers reusing
    the keys and values of an earlier layer. All off by default."""

    per_layer_input_size: int = 0  # hidden_size_per_layer_input; 0: no per-layer inputs
    per_layer_input_vocab: int = 0  # vocab_size_per_layer_input
    full_head_dim: int = 0  # the full-attention layers' head_dim (global_head_dim); 0: head_dim
    full_kv_heads: int = 0  # their key/value heads (num_global_key_value_heads); 0: n_kv_heads
    full_k_eq_v: bool = False  # their values are their keys, before the norms (attention_k_eq_v)
    kv_shared_layers: int = 0  # the last layers reuse the keys/values of the last earlier layer of their kind
    double_wide_shared_mlp: bool = False  # those layers' MLPs are twice as wide (use_double_wide_mlp)


@dataclass(frozen=True)
class LayerType:
    """One layer's token mixer and feed-forward, by kind (sftplug.model.transformer maps kinds to modules)."""

    mixer: str = "attention"  # softmax attention, full or sliding as AttentionConfig.windows says,
    # or "linear_attention": Gated DeltaNet (ModelConfig.linear_attention)
    feed_forward: str = "mlp"  # the gated MLP, or "experts": a mixture of experts (ModelConfig.experts)


# ModelConfig's groups: field -> its dataclass.
GROUPS = {"rotary": RotaryConfig, "norm": NormConfig, "attention": AttentionConfig,
          "feed_forward": FeedForwardConfig, "experts": ExpertsConfig, "linear_attention": LinearAttentionConfig,
          "gemma4": Gemma4Options}
# The flat keys of checkpoints saved before the groups: key -> (group, field).
FLAT_KEYS = {
    "rope_theta": ("rotary", "theta"), "rope_scaling": ("rotary", "scaling"), "rotary_dim": ("rotary", "dims"),
    "rope_local_theta": ("rotary", "local_theta"), "rope_layers": ("rotary", "layers"),
    "rms_norm_eps": ("norm", "eps"), "norms": ("norm", "placement"), "gemma_norm": ("norm", "gemma"),
    "qkv_bias": ("attention", "qkv_bias"), "qk_norm": ("attention", "qk_norm"),
    "layer_windows": ("attention", "windows"), "attn_scale": ("attention", "scale"),
    "attn_softcap": ("attention", "softcap"), "activation": ("feed_forward", "activation"),
}


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 688
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 0  # 0: hidden_size // n_heads
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    architecture: str = "llama"
    extra: dict = field(default_factory=dict)  # source config fields kept for export
    # Each part's options (sftplug.hf.config sets them from config.json); a dict is read as the group.
    rotary: RotaryConfig = field(default_factory=RotaryConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    feed_forward: FeedForwardConfig = field(default_factory=FeedForwardConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    linear_attention: LinearAttentionConfig = field(default_factory=LinearAttentionConfig)
    gemma4: Gemma4Options = field(default_factory=Gemma4Options)
    layer_types: tuple[LayerType, ...] = ()  # each layer's mixer and feed-forward; (): attention and mlp
    # The residual stream's and the LM head's scales.
    embed_scale: float = 1.0  # embeddings times this (Gemma: sqrt(hidden); Granite: embedding_multiplier)
    residual_scale: float = 1.0  # mixer and feed-forward outputs times this before the residual add (Granite)
    logit_scale: float = 1.0  # logits divided by this (Granite's logits_scaling)
    logit_softcap: float = 0.0  # logits soft-capped at this (Gemma 2's final_logit_softcapping); 0: none

    def __post_init__(self):
        for name, group in GROUPS.items():  # a saved config holds each group as a dict
            if isinstance(getattr(self, name), dict):
                setattr(self, name, group(**getattr(self, name)))
        self.layer_types = tuple(t if isinstance(t, LayerType) else LayerType(**t) for t in self.layer_types)
        if self.head_dim == 0:
            if self.hidden_size % self.n_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of n_heads {self.n_heads}")
            self.head_dim = self.hidden_size // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        self.rotary = replace(self.rotary, dims=self.rotary.dims or self.head_dim)
        if self.rotary.sliding:
            self.rotary.sliding = replace(self.rotary.sliding, dims=self.rotary.sliding.dims or self.rotary.dims)
        for kind in self.rotary.kinds:
            dims = self.rotary.of(kind).dims
            head_dim = self.gemma4.full_head_dim or self.head_dim if kind == FULL else self.head_dim  # Gemma 4's own
            if dims % 2 or dims > head_dim:
                raise ValueError(f"rotary dims {dims} must be even and at most head_dim {head_dim}")
        per_layer = {"attention windows": self.attention.windows, "rotary layers": self.rotary.layers,
                     "layer_types": self.layer_types}
        for name, values in per_layer.items():
            if len(values) not in (0, self.n_layers):
                raise ValueError(f"{name} has {len(values)} entries for {self.n_layers} layers")
        if any(t.mixer == "linear_attention" for t in self.layer_types) and not self.linear_attention.key_heads:
            raise ValueError("layer_types name linear_attention, but its config has no heads")
        if self.has_experts and not self.experts.count:
            raise ValueError("layer_types name experts, but the experts config has none (experts.count is 0)")

    @property
    def has_experts(self) -> bool:
        """Whether some layer's feed-forward is a mixture of experts."""
        return any(t.feed_forward == "experts" for t in self.layer_types)

    def layer_type(self, layer: int) -> LayerType:
        return self.layer_types[layer] if self.layer_types else LayerType()

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise KeyError(name)
        return cls(**PRESETS[name])

    @classmethod
    def from_dict(cls, saved: dict) -> ModelConfig:
        """The config :meth:`to_dict` saved, or the flat dict of a checkpoint saved before the groups."""
        fields, groups = dict(saved), {}
        for key, (group, name) in FLAT_KEYS.items():
            if key in fields:
                groups.setdefault(group, {})[name] = fields.pop(key)
        rotary = groups.get("rotary", fields.get("rotary"))
        if isinstance(rotary, dict) and "local_theta" in rotary:  # saved before RoPE per layer kind
            rotary = dict(rotary)
            local_theta = rotary.pop("local_theta")  # Gemma 3's sliding layers: their own base, unscaled
            rotary["sliding"] = {"theta": local_theta} if local_theta else None
            groups["rotary"] = rotary
            fields.pop("rotary", None)
        return cls(**fields, **groups)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(map(repr, allowed))}")


PRESETS = {
    # The built-in default: small enough to fine-tune on 2 CPU cores in a minute or two.
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=688, n_layers=4, n_heads=4, n_kv_heads=2),
    # The benchmark workloads' models (W0, W1: BENCHMARKS.md); w1 is TinyLlama-1.1B's shape.
    "w0": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, n_layers=6, n_heads=8, n_kv_heads=4),
    "w1": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, n_layers=22, n_heads=32, n_kv_heads=4),
    # W0-MoE: w0's sizes and attention (plus Qwen3's q/k norms), every feed-forward 8 experts of 512, top 2
    "w0-moe": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, n_layers=6, n_heads=8, n_kv_heads=4,
                   architecture="qwen3_moe", attention=dict(qk_norm="head"),
                   experts=dict(count=8, top_k=2, intermediate_size=512, norm_top_k=True),
                   layer_types=(dict(feed_forward="experts"),) * 6),
    # W1-MoE: Qwen3-30B-A3B's layer (128 experts of 768, top 8, head dim 128) cut to 16 of its 48 layers:
    # 10.6B parameters, 21 GB in bf16, so HF + PEFT's LoRA fits one 80 GB GPU beside it
    "w1-moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, n_layers=16, n_heads=32,
                   n_kv_heads=4, head_dim=128, max_seq_len=40960, architecture="qwen3_moe",
                   rotary=dict(theta=1000000.0), norm=dict(eps=1e-6), attention=dict(qk_norm="head"),
                   experts=dict(count=128, top_k=8, intermediate_size=768, norm_top_k=True),
                   layer_types=(dict(feed_forward="experts"),) * 16),
    # W0-Hybrid: w0's sizes as Qwen3.5 (qwen3_5_text) builds them, 8 layers so its pattern of three Gated
    # DeltaNet layers to one gated attention layer holds twice; 4 key / 8 value heads of 64 in the linear layers
    "w0-hybrid": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, n_layers=8, n_heads=8, n_kv_heads=4,
                      architecture="qwen3_5_text", rotary=dict(dims=16), norm=dict(eps=1e-6, gemma=True),
                      attention=dict(output_gate=True, qk_norm="head"),
                      linear_attention=dict(key_heads=4, value_heads=8, key_head_dim=64, value_head_dim=64),
                      layer_types=(dict(mixer="linear_attention"),) * 3 + (dict(),)
                      + (dict(mixer="linear_attention"),) * 3 + (dict(),)),
}
