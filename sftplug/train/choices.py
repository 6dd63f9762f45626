"""Refuse before working: a run's choices that do not depend on its data, checked before OUT is
touched, the model loaded or the data read.

Each check asks what the run's set-up asks later (the same functions, the same one-line
errors) with what is known before loading: the device, the precision, and the model's shape
where it can be read without its weights (a preset, an HF folder's config.json, an sftplug
checkpoint's manifest). Attention is asked for unpacked rows and without the model's attention
options, a request every backend that can run the real one also runs, so nothing usable is
refused here; whether the data's packed rows need more is asked once they exist.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sftplug import probes
from sftplug.attention.backend import AttentionRequest
from sftplug.attention.choice import attention_skipped, choose_backend, choose_from, survey
from sftplug.checkpoint import folders
from sftplug.checkpoint.run_state import check_resumable, resume_folder
from sftplug.config import TrainConfig
from sftplug.data import sources
from sftplug.errors import SftplugError
from sftplug.fused.choice import choose_fused_ops, fused_skipped
from sftplug.fused.op import FusedOpsRequest
from sftplug.hf.load import CONFIG, read_hf_config
from sftplug.linear_attention.backend import LinearAttentionRequest
from sftplug.linear_attention.choice import choose_linear_attention, linear_attention_skipped
from sftplug.model.config import LinearAttentionConfig
from sftplug.model.lora_targets import EXPERTS_TARGETS
from sftplug.model.transformer import PRESETS, ModelConfig
from sftplug.train.loggers import check_log_to
from sftplug.train.optimizers import check_optimizer


def check_choices(config: TrainConfig, registry, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Raise the one-line SftplugError the run would raise later for a choice that cannot work here."""
    check_log_to(registry, config.log_to)
    for path in (config.data, config.eval_data):  # missing or unsupported data files, unread
        if path:
            sources.check_path(path)
    check_optimizer(config.optimizer, device)
    if config.quantize != "none":
        probes.import_bitsandbytes(f"--quantize {config.quantize}")
    shape = model_shape(config.model)
    check_attention(registry, config, device, compute_dtype, shape)
    check_linear_attention(registry, config, device, compute_dtype, shape)
    if shape is not None and config.fused not in ("auto", "none"):  # auto and none always have an answer
        choose_fused_ops(registry.hook, fused_request_for(shape, config, device, compute_dtype), config.fused,
                         config.torch_compile, fused_skipped(registry))
    if config.resume and config.resume != "auto":  # auto's checkpoint is OUT's, checked once OUT is held
        check_resumable(resume_folder(config.resume, Path(config.out)), config)


def check_linear_attention(registry, config: TrainConfig, device: torch.device, dtype: torch.dtype,
                           shape: ModelConfig | None) -> None:
    """``--linear-attention``: for a hybrid model of known shape, whether it runs here; else whether it is offered."""
    if config.linear_attention == "auto" and shape is None:
        return
    hybrid = shape is not None and any(t.mixer == "linear_attention" for t in shape.layer_types)
    o = shape.linear_attention if hybrid else LinearAttentionConfig(key_heads=1, value_heads=1)
    request = LinearAttentionRequest(config.linear_attention, device, dtype, o.key_heads, o.value_heads,
                                     o.key_head_dim, o.value_head_dim, seq_len=config.seq_len)
    if hybrid or config.linear_attention != "auto":  # a dense model: only whether the name is known
        choose_linear_attention(registry.hook, request, linear_attention_skipped(registry))


def check_attention(registry, config: TrainConfig, device: torch.device, dtype: torch.dtype,
                    shape: ModelConfig | None) -> None:
    """``--attention``: for a model of known shape, whether it runs here; else whether the name is offered."""
    skipped = attention_skipped(registry)
    if shape is not None:
        choose_backend(registry.hook, AttentionRequest(config.attention, device, dtype, shape.head_dim, shape.n_heads,
                                                       shape.n_kv_heads, seq_len=config.seq_len), skipped)
        return
    if config.attention == "auto":
        return
    # The shape only its loader knows: a typical one, to learn which names are offered.
    request = AttentionRequest(config.attention, device, dtype, 64, 1, 1, seq_len=config.seq_len)
    offers = survey(registry.hook, request)
    if config.attention not in {o.name for o in offers}:
        choose_from(offers, request, skipped)  # raises: unknown, or its plugin unavailable


def fused_request_for(shape: ModelConfig, config: TrainConfig, device: torch.device,
                      dtype: torch.dtype) -> FusedOpsRequest:
    """The fused ops' request of a model of this shape trained with ``config``."""
    experts = shape.experts if shape.has_experts else None
    experts_lora = not config.full and any(t in EXPERTS_TARGETS for t in config.lora_targets)
    return FusedOpsRequest(device=device, dtype=dtype, hidden_size=shape.hidden_size,
                           intermediate_size=shape.intermediate_size, head_dim=shape.head_dim,
                           rotary_dim=shape.rotary.dims, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads,
                           vocab_size=shape.vocab_size, tokens=config.micro_bsz * config.seq_len,
                           activation=shape.feed_forward.activation, gemma_norm=shape.norm.gemma,
                           trains_norms=config.full, experts=experts.count if experts else 0,
                           expert_intermediate_size=experts.intermediate_size if experts else 0,
                           top_k=experts.top_k if experts else 0,
                           lora_rank=config.lora_r if experts and experts_lora else 0)


def model_shape(source: str) -> ModelConfig | None:
    """The model's config read without its weights: a preset, an sftplug checkpoint or an HF folder;
    None where only its loader can tell (a third-party source, or one no loader knows)."""
    if source in PRESETS:
        return ModelConfig.preset(source)
    path = Path(source)
    try:
        if folders.is_checkpoint(path):
            saved = json.loads((folders.resolve(path) / folders.MANIFEST).read_text())["model_config"]
            return ModelConfig.from_dict(saved)
        if (path / CONFIG).is_file():
            return read_hf_config(path)
    except (OSError, ValueError, KeyError, TypeError, SftplugError):
        return None  # the loader says what is wrong with it
    return None
