"""The hook contract between the core and every plugin, built-in or third-party.

Hooks are called with keyword arguments only. A plugin implements any subset of them
with ``@sftplug.hookimpl``; parameters it does not need may be left out. They are listed
in the order a run calls them: precision, the model, the kernels, the loggers, then the
training state at each checkpoint and on resume. (Before loading anything, a run also asks
the kernel hooks once whether its ``--attention`` and ``--fused`` choices can work here.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from sftplug.attention import AttentionBackend, AttentionRequest
    from sftplug.config import TrainConfig
    from sftplug.fused import FusedOp, FusedOpsRequest
    from sftplug.linear_attention.backend import LinearAttentionBackend, LinearAttentionRequest
    from sftplug.model.contract import LoadedModel
    from sftplug.model.quantize import QuantSpec
    from sftplug.train.loggers import Logger
    from sftplug.train.precision import PrecisionPolicy
    from sftplug.train.run import Run

PROJECT = "sftplug"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- Precision: once, before anything is loaded (the weights' dtype follows from it). --


@hookspec(firstresult=True)
def configure_precision(dtype: str, device: torch.device, tf32: bool) -> PrecisionPolicy | None:
    """Return the precision policy for a run.

    Stops at the first non-None result.

    :param dtype: "bf16", "fp16" or "fp32", as given by ``--dtype``.
    :param device: the device the run trains on.
    :param tf32: whether ``--tf32`` asked for TF32 matmuls in fp32.
    """


# -- The model: loaded once per run, and again by generate and export. --


# The base loader was called load_model until it was named for what it loads: a plugin that
# still declares load_model gets it, and a DeprecationWarning when it registers.
LOAD_MODEL_RENAMED = DeprecationWarning("load_state's argument load_model is deprecated: use load_base")


@hookspec(firstresult=True, warn_on_impl_args={"load_model": LOAD_MODEL_RENAMED})
def load_state(
    source: str,
    dtype: torch.dtype | None,
    device: torch.device,
    load_base: Callable[..., LoadedModel],
    quantize: QuantSpec | None,
    load_model: Callable[..., LoadedModel],
) -> LoadedModel | None:
    """Load the model and tokenizer that ``source`` names; None when this plugin does not handle it.

    Stops at the first non-None result.

    :param source: a built-in preset name, an HF checkpoint folder or an sftplug
        checkpoint folder, as given by ``--model`` or ``sftplug generate``.
    :param dtype: the dtype for the weights, or None for the source's own.
    :param device: the device to load onto.
    :param load_base: the core's loader of a base model, callable as
        ``load_base(source, quantize=None)``, for formats that build on another model (an
        adapter on its base).
    :param quantize: set when the run keeps the base's block linears in 4-bit
        (``--quantize``), else None. A plugin may quantize while it reads (never holding the
        dense model) and set ``info["quantized"]``; one that ignores this argument (or leaves
        it out) returns dense weights, and the core quantizes them afterwards, layer by layer.
    :param load_model: ``load_base`` under its old name, still given to a plugin that declares
        it (which warns, with a DeprecationWarning, when it registers).
    """


# -- The kernels: once the model is loaded, for its shapes and the run's device and dtype. --


@hookspec
def select_attention(request: AttentionRequest) -> AttentionBackend | None:
    """Offer this plugin's attention backend for a run, or return None.

    Every plugin is asked; the core then takes the backend whose name was requested,
    or for ``--attention auto`` the highest ``priority_for(request)`` among the offered
    backends whose ``check(request)`` passes. Not firstresult: all offers are collected.

    :param request: the name asked for, device, dtype, head dim, query and key/value heads,
        whether rows are packed, and the model's attention options (window, soft-cap, scale).
    """


@hookspec
def select_linear_attention(request: LinearAttentionRequest) -> list[LinearAttentionBackend] | None:
    """Offer this plugin's backends of the gated delta rule (Gated DeltaNet layers), or return None.

    Every plugin is asked; the core takes the backend named by ``--linear-attention``, or for
    ``auto`` the highest ``priority_for(request)`` whose ``check(request)`` passes. Asked only
    for models with linear-attention layers. Not firstresult: all offers are collected.

    :param request: the name asked for, device, dtype, key/value heads and head dims, packed rows.
    """


@hookspec
def select_fused_ops(request: FusedOpsRequest) -> list[FusedOp] | None:
    """Offer this plugin's fused forms of the ops outside the matrix products, or return None.

    Every plugin is asked; for each op the core takes the form named by ``--fused``, or for
    ``auto`` the highest ``priority_for(request)`` above 0 (PyTorch's form) whose
    ``check(request)`` passes. Not firstresult: all offers are collected.

    :param request: device, compute dtype, the model's sizes, the tokens of a micro-batch,
        activation and norm form.
    :returns: one :class:`~sftplug.fused.FusedOp` per op it fuses, or None.
    """


# -- Loggers: on rank 0, once per name of --log-to, before the first update. --


@hookspec(firstresult=True)
def open_logger(name: str, config: TrainConfig, out: Path) -> Logger | None:
    """Open the metrics logger ``name`` for a run, or return None.

    Stops at the first non-None result. A plugin provides the logger of its own name (the
    name it is registered under). The logger gets ``log(record)`` after each update with the
    record exactly as written to OUT/metrics.jsonl (which the core always writes), and
    ``close()`` at the end of the run, also when the run fails.

    :param name: the logger's name, as given in ``--log-to``.
    :param config: the run's settings (``config.to_dict()`` for a plain dict); the one time
        the logger sees them.
    :param out: the run folder; write files under it.
    :returns: any object with ``log(record)`` and ``close()``, or None when this plugin does
        not provide ``name``.
    """


# -- The training state: resume_state at every checkpoint, on_resume when a run resumes. --


@hookspec
def resume_state(run: Run) -> dict[str, Any] | None:
    """Return this plugin's part of the training state to save in a checkpoint.

    :param run: the run being checkpointed.
    :returns: a dict ``{namespace: value}`` (tensors, numbers, strings, nested dicts
        and lists of those), or None. Namespaces must be unique across plugins.
    """


@hookspec
def on_resume(run: Run, state: dict[str, Any]) -> None:
    """Restore this plugin's part of a saved training state.

    :param run: the run being resumed, already built.
    :param state: the merged dict of every plugin's :func:`resume_state` at save time;
        take your own namespace from it.
    """
