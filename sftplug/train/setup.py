"""Building a run: small steps that each return what they build, in the order of the data flow.

:func:`build_run` joins the process group, asks the plugins for the precision, refuses the
choices that cannot work here (:mod:`sftplug.train.choices`), claims the run folder
(:mod:`sftplug.train.run_folder`; and finds whether all nodes see it), loads the model (LoRA or
full, sharded or replicated), prepares the data (one process per run folder first), chooses
attention for that data, and makes the optimizer and schedule. A run that fails to start
leaves the folder as it found it.
"""

from __future__ import annotations

import random

import torch

from sftplug import distributed, probes
from sftplug.attention.choice import attach, steering_notes
from sftplug.config import TrainConfig, check_output_dir
from sftplug.config_file import dump_config
from sftplug.data.batches import Batches, MicroBatches
from sftplug.data.packing import Rows
from sftplug.data.prepare import Prepared, prepare_data
from sftplug.errors import SftplugError
from sftplug.fused.choice import attach_fused
from sftplug.fused.op import FusedOpsRequest
from sftplug.hf.peft_adapter import load_peft_adapter
from sftplug.linear_attention.choice import attach_linear_attention
from sftplug.loading import load_model
from sftplug.model.experts_lora import train_routers
from sftplug.model.lora import apply_lora, describe_lora
from sftplug.model.offload import describe_offload
from sftplug.model.quantize import quant_spec
from sftplug.train import run_folder
from sftplug.train.balance import balance_of
from sftplug.train.choices import check_choices, fused_request_for
from sftplug.train.flops import peak_flops
from sftplug.train.optimizers import make_optimizer
from sftplug.train.precision import PrecisionPolicy, resolve_dtype
from sftplug.train.run import Run
from sftplug.train.schedule import Schedule


def build_run(config: TrainConfig, registry, echo=print, rows: Rows | None = None) -> Run:
    """Everything a training run needs, ready for its first update.

    ``rows`` replaces the data files (benchmarks feed synthetic rows).
    """
    world = distributed.init_world(config.device)
    echo = echo if world.is_main else _silent
    device = training_device(config.device, world)
    precision = choose_precision(registry, config, device)  # (policy, why_chosen)
    check_choices(config, registry, device, precision[0].autocast_dtype or torch.float32)  # before any work
    if not world.is_main:
        distributed.barrier(world)  # rank 0 has claimed OUT
        out = check_output_dir(config.out)
        return assemble_run(config, registry, world, echo, out, rows, device, *precision)
    claim = run_folder.claim(config, echo)  # rank 0 holds the run's lock
    distributed.barrier(world)
    try:
        run = assemble_run(config, registry, world, echo, claim.out, rows, device, *precision)
        if config.overwrite and not config.resume:
            run_folder.start_over(claim.out, echo)
        (claim.out / "config.yaml").write_text(dump_config(config, nproc=world.size))
        return run
    except BaseException:
        claim.abandon()  # a run that failed to start leaves its folder as it found it
        raise


def assemble_run(config: TrainConfig, registry, world: distributed.World, echo, out, rows: Rows | None,
                 device: torch.device, precision: PrecisionPolicy, precision_why_chosen: str) -> Run:
    """The run's parts, in the order of the data flow (:func:`build_run` without the checks and the claim)."""
    world = distributed.share_out(world, out)  # whether every node sees rank 0's OUT
    check_shared_out(config, world, echo)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    loaded = load_model(config.model, dtype=base_dtype(config, precision), device=device, registry=registry,
                        attention=None, quantize=quant_spec(config.quantize, config.double_quant))
    tokenizer = loaded.tokenizer
    if config.chat_template:
        tokenizer.set_chat_template(config.chat_template)
    model = trainable_model(loaded.model, config, world, echo)
    params = [p for p in model.parameters() if p.requires_grad]
    replicated = distributed.replicate(model, world) if world.active and not distributed.is_sharded(model) else None
    data = Prepared(rows, None) if rows is not None else load_data(config, tokenizer, world, out, echo)
    compute_dtype = precision.autocast_dtype or torch.float32
    packed = bool(int(data.train.docs_per_row.max()) > 1)
    attention = attach(model, registry, config.attention, device, compute_dtype, packed=packed,
                       seq_len=config.seq_len)
    linear = attach_linear_attention(model, registry, config.linear_attention, device, compute_dtype, packed=packed,
                                     seq_len=config.seq_len)
    fused = attach_fused(model, registry, fused_request(model, config, device, compute_dtype), config.fused,
                         compiled=config.torch_compile)
    mode = f"full fine-tune, {sum(p.numel() for p in params):,} trainable params" if config.full else (
        ("adapter " + config.adapter + ": " if config.adapter else "") + describe_lora(model))
    echo(f"model: {loaded.description}; {mode} on {device}")
    precision_line = precision.name + (f" ({precision_why_chosen})" if precision_why_chosen else "")
    echo(f"precision: {precision_line}; attention: {attention.why_chosen}"
         + (f"; linear attention: {linear.why_chosen}" if linear else ""))
    echo(f"fused ops: {fused.describe()}")
    if config.offload_activations:
        echo(f"activations: {describe_offload(device, config.grad_ckpt)}")
    for note in steering_notes():
        echo(f"environment: {note}")
    if config.torch_compile:
        compile_blocks(model, config.compile_mode)
    return Run(
        config=config, registry=registry, world=world, echo=echo, out=out, device=device, precision=precision,
        model=model, tokenizer=tokenizer, params=params, replicated=replicated, data=data,
        batches=make_batches(data.train, config, device, world), attention=attention, fused=fused,
        optimizer=make_optimizer(config.optimizer, params, config.lr, config.weight_decay, device),
        schedule=Schedule(config.schedule, config.lr, config.warmup, config.steps, config.min_lr_ratio),
        peak_flops=peak_flops(device, half=precision.autocast_dtype is not None),
        balance=balance_of(model, config.router_aux_loss_coef, config.accum, device),
    )  # fmt: skip


def fused_request(model, config: TrainConfig, device: torch.device, dtype: torch.dtype) -> FusedOpsRequest:
    return fused_request_for(model.config, config, device, dtype)


def training_device(name: str, world: distributed.World) -> torch.device:
    """``--device`` resolved; under torchrun each process takes the GPU of its local rank."""
    device = probes.resolve_device(name)
    if world.active and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    return device


def choose_precision(registry, config: TrainConfig, device: torch.device) -> tuple[PrecisionPolicy, str]:
    """The policy the plugins give for ``--dtype`` (auto resolved first), and why auto chose it."""
    dtype, why_chosen = resolve_dtype(config.dtype, device)
    policy = registry.hook.configure_precision(dtype=dtype, device=device, tf32=config.tf32)
    if policy is None:  # the built-in precision plugin cannot be disabled, but a hook may decline
        raise SftplugError(f"--dtype {dtype}: no plugin configures this precision")
    return policy, why_chosen


def base_dtype(config: TrainConfig, precision: PrecisionPolicy) -> torch.dtype:
    """LoRA under bf16/fp16 keeps the frozen base in that dtype: half the memory, no per-step
    weight casts; trainable weights and optimizer state stay fp32 either way."""
    half = precision.autocast_dtype
    return half if half is not None and not config.full else torch.float32


def trainable_model(model: torch.nn.Module, config: TrainConfig, world: distributed.World, echo) -> torch.nn.Module:
    """The loaded model made trainable: every weight, or LoRA adapters; sharded under --strategy fsdp."""
    model.checkpoint_blocks = config.grad_ckpt
    model.offload_activations = config.offload_activations
    if config.full:
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        if config.adapter:  # a PEFT adapter continued: its own r, alpha, targets and variant
            model = load_peft_adapter(model, config.adapter)
        else:
            model = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets,
                               config.lora_variant, config.rslora)
        if config.train_router:
            train_routers(model)
    if config.strategy == "fsdp":  # LoRA: the frozen base and the adapters, after the adapters' hooks are set
        shard_model(model, world, echo)
    model.train()
    return model


def shard_model(model: torch.nn.Module, world: distributed.World, echo) -> None:
    """``--strategy fsdp``: FSDP2 per block under torchrun; says how a 4-bit base is sharded."""
    if not world.active:
        echo("strategy: fsdp shards across processes; this run has one, so nothing is sharded "
             "(start several with --nproc N or torchrun)")
        return
    packed = distributed.shard(model)
    if packed:
        echo(f"strategy: fsdp shards the 4-bit base as its packed bytes ({packed / 2**20:,.1f} MiB in all), "
             "each layer's quantization scales kept whole")


def check_shared_out(config: TrainConfig, world: distributed.World, echo) -> None:
    """What every process reads or writes in OUT needs one folder that all of them see."""
    if world.shared_out:
        return
    if config.strategy == "fsdp":
        raise SftplugError(f"--strategy fsdp: every process writes its checkpoint shards into --out {config.out}, but "
                           "some nodes do not see rank 0's folder; give all nodes one shared --out, or use "
                           "--strategy ddp")
    if config.resume:
        raise SftplugError(f"--resume: every process reads the checkpoint from --out {config.out}, but some nodes do "
                           "not see rank 0's folder; give all nodes one shared --out to resume")
    echo(f"out: some nodes do not see rank 0's --out {config.out}; each node's first process keeps the data cache "
         "in its own, checkpoints and logs are rank 0's")


def load_data(config: TrainConfig, tokenizer, world: distributed.World, out, echo) -> Prepared:
    """Tokenized rows; one process per OUT folder (rank 0 where all share it, else each node's
    first process) tokenizes and fills the cache, the other processes then read it."""
    with distributed.leaders_first(world, world.writes_cache):
        prepared = prepare_data(
            tokenizer, data=config.data, eval_data=config.eval_data, eval_split=config.eval_split,
            seq_len=config.seq_len, pack=config.pack, fmt=config.format, train_on_prompt=config.train_on_prompt,
            overlong=config.overlong, skip_bad_records=config.skip_bad_records, field_map=config.field_map,
            train_turns=config.train_turns, cache_dir=out / "cache", seed=config.seed,
        )  # fmt: skip
    batch_fill = None
    if cuts_batches(config):  # the rows' own fill would count padding the cut batches never compute
        batch_fill = MicroBatches(prepared.train, config.micro_bsz, config.seed, trim=True, world=world.size).fill()
    echo(prepared.describe(batch_fill))
    return prepared


def cuts_batches(config: TrainConfig) -> bool:
    """Unpacked rows are cut to the longest document of each micro-batch, except when
    compiled blocks want one fixed shape."""
    return not config.pack and not config.torch_compile


def make_batches(rows: Rows, config: TrainConfig, device: torch.device, world: distributed.World) -> Batches:
    return Batches(rows, config.micro_bsz, config.seed, workers=config.workers, pin_memory=device.type == "cuda",
                   trim=cuts_batches(config), rank=world.rank, world=world.size)


def compile_blocks(model: torch.nn.Module, compile_mode: str) -> None:
    """Compile each block once its attention is set; compilation happens in the first update."""
    mode = None if compile_mode == "default" else compile_mode
    for block in model.layers:
        block.compile(mode=mode, dynamic=False)  # packed rows have one fixed shape: no recompiles


def _silent(*args, **kwargs) -> None:
    pass
