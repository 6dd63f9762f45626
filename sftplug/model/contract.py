"""What the trainer needs of a model: the contract a load_state plugin's model keeps, and
what such a plugin returns.

sftplug's own :class:`~sftplug.model.transformer.Transformer` keeps it; a third-party
architecture usually keeps it by subclassing that and its blocks (README, "An architecture
sftplug does not ship").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sftplug.attention import AttentionBackend
    from sftplug.attention.choice import AttentionChoice
    from sftplug.data.tokenizer import Tokenizer
    from sftplug.fused import OpSet
    from sftplug.model.transformer import ModelConfig


@runtime_checkable
class DecoderModel(Protocol):
    """A decoder language model sftplug can train, checkpoint, export and generate from."""

    config: ModelConfig  # sizes for the kernel requests, logit transforms for the loss, architecture for export
    layers: nn.ModuleList  # the blocks: FSDP shards, --torch-compile compiles, --grad-ckpt checkpoints each one
    lm_head: nn.Linear  # its weight is what the loss multiplies (tied or not)
    checkpoint_blocks: bool  # --grad-ckpt's switch

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        positions: torch.Tensor | None = None,  # [B, T], restarting at each packed document
        doc_ids: torch.Tensor | None = None,  # [B, T], which document of the row each token is in
        hidden_only: bool = False,  # the final hidden states [B, T, C] instead of logits [B, T, V]
        caches: list[Any] | None = None,  # one cache per layer, for generation
    ) -> torch.Tensor: ...

    def set_attention(self, backend: AttentionBackend) -> None:
        """Call ``backend(q, k, v, causal=True, doc_ids=..., **options)`` for every attention."""

    def attention_options(self, seq_len: int = 0) -> dict[str, Any]:
        """The options it passes the backend for rows of ``seq_len`` (window, softcap, scale)."""

    def set_fused_ops(self, ops: OpSet) -> None:
        """Compute its RMSNorms, gated MLPs and RoPE with these forms."""


@dataclass
class LoadedModel:
    """What a load_state plugin returns (also importable from sftplug.loading)."""

    model: DecoderModel
    tokenizer: Tokenizer
    source: str
    description: str = ""
    info: dict = field(default_factory=dict)  # format-specific facts (base source, lora, step)
    attention: AttentionChoice | None = None  # set by sftplug.loading.load_model
