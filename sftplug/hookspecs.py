"""The hook contract between the core and every plugin, built-in or third-party.

Hooks are called with keyword arguments only. A plugin implements any subset of them
with ``@sftplug.hookimpl``; parameters it does not need may be left out.
"""

import pluggy

PROJECT = "sftplug"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def select_attention(request):
    """Offer this plugin's attention backend for a run, or return None.

    Every plugin is asked; the core then takes the backend whose name was requested,
    or for ``--attention auto`` the highest ``priority`` among the offered backends
    whose ``check(request)`` passes. Not firstresult: all offers are collected.

    :param request: an :class:`sftplug.attention.AttentionRequest` (name asked for,
        device, dtype, head dim, query and key/value heads, whether rows are packed).
    :returns: an :class:`sftplug.attention.AttentionBackend`, or None.
    """


@hookspec(firstresult=True)
def configure_precision(dtype, device, tf32):
    """Return the precision policy for a run.

    Stops at the first non-None result.

    :param dtype: "bf16", "fp16" or "fp32", as given by ``--dtype``.
    :param device: the :class:`torch.device` the run trains on.
    :param tf32: whether ``--tf32`` asked for TF32 matmuls in fp32.
    :returns: an :class:`sftplug.train.precision.PrecisionPolicy`, or None.
    """


@hookspec(firstresult=True)
def load_state(source, dtype, device, load_model, quantize):
    """Load the model and tokenizer that ``source`` names.

    Stops at the first non-None result.

    :param source: a built-in preset name, an HF checkpoint folder or an sftplug
        checkpoint folder, as given by ``--model`` or ``sftplug generate``.
    :param dtype: the :class:`torch.dtype` for the weights, or None for the source's own.
    :param device: the :class:`torch.device` to load onto.
    :param load_model: the core's loader, callable as ``load_model(source, quantize=None)``,
        for formats that build on another model (an adapter on its base).
    :param quantize: a :class:`sftplug.model.quantize.QuantSpec` when the run keeps the base's
        block linears in 4-bit (``--quantize``), else None. A plugin may quantise while it reads
        (never holding the dense model) and set ``info["quantized"]``; one that ignores this
        argument (or leaves it out) returns dense weights, and the core quantises them
        afterwards, layer by layer.
    :returns: an :class:`sftplug.loading.LoadedModel`, or None when this plugin does not
        handle the source.
    """


@hookspec
def resume_state(run):
    """Return this plugin's part of the training state to save in a checkpoint.

    :param run: the :class:`sftplug.train.run.Run` being checkpointed.
    :returns: a dict ``{namespace: value}`` (tensors, numbers, strings, nested dicts
        and lists of those), or None. Namespaces must be unique across plugins.
    """


@hookspec
def on_resume(run, state):
    """Restore this plugin's part of a saved training state.

    :param run: the :class:`sftplug.train.run.Run` being resumed, already built.
    :param state: the merged dict of every plugin's :func:`resume_state` at save time;
        take your own namespace from it.
    """


@hookspec(firstresult=True)
def open_logger(name, config, out):
    """Open the metrics logger ``name`` for a run, or return None.

    Stops at the first non-None result. Called on rank 0 only, once per name of
    ``--log-to``, before the first update; a plugin provides the logger of its own name
    (the name it is registered under). The logger gets ``log(record)`` after each update
    with the record exactly as written to OUT/metrics.jsonl (which the core always
    writes), and ``close()`` at the end of the run, also when the run fails.

    :param name: the logger's name, as given in ``--log-to``.
    :param config: the run's :class:`sftplug.config.TrainConfig` (``config.to_dict()`` for a
        plain dict); the one time the logger sees it.
    :param out: the run folder (a :class:`pathlib.Path`); write files under it.
    :returns: an :class:`sftplug.train.loggers.Logger` (any object with ``log(record)`` and
        ``close()``), or None when this plugin does not provide ``name``.
    """


@hookspec
def select_fused_ops(request):
    """Offer this plugin's fused forms of the ops outside the matrix products, or return None.

    Every plugin is asked; for each op the core takes the form named by ``--fused``, or for
    ``auto`` the highest ``priority_for(request)`` above 0 (PyTorch's form) whose
    ``check(request)`` passes. Not firstresult: all offers are collected.

    :param request: a :class:`sftplug.fused.FusedOpsRequest` (device, compute dtype, the
        model's sizes, the tokens of a micro-batch, activation and norm form).
    :returns: a list of :class:`sftplug.fused.FusedOp` (one per op it fuses), or None.
    """
