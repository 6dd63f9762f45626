"""A training run: what it holds, one update, and the held-out loss.

The loss of an update is the sum of token losses over all its micro-batches divided by
the update's total number of target tokens, so ``--micro-bsz 2 --accum 4`` and
``--micro-bsz 8 --accum 1`` train identically. Plugins receive the :class:`Run` in
``resume_state`` and ``on_resume``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from sftplug import distributed
from sftplug.attention.choice import AttentionChoice
from sftplug.config import TrainConfig
from sftplug.data.batches import Batches, batch_of
from sftplug.data.packing import IGNORE
from sftplug.data.prepare import Prepared
from sftplug.errors import SftplugError
from sftplug.fused.choice import FusedChoice
from sftplug.model.lora import lm_head_weight
from sftplug.train.balance import Balance
from sftplug.train.flops import active_adapter_params, update_flops
from sftplug.train.loss import target_loss_sum
from sftplug.train.precision import PrecisionPolicy
from sftplug.train.schedule import Schedule

if TYPE_CHECKING:
    from sftplug.data.tokenizer import Tokenizer
    from sftplug.model.contract import DecoderModel
    from sftplug.registry import Registry
    from sftplug.train.loggers import Logger


class UpdateCounts(NamedTuple):
    """An update's counts, taken on the host where the labels are (summed over ranks under torchrun)."""

    target_tokens: int  # the tokens the loss averages over
    tokens: int  # what tok/s counts: packed rows whole, unpacked rows without the padding batching adds
    stop: int  # ranks asked to stop (0: none)

    @classmethod
    def of(cls, micro: list[dict], pack: bool, stop_requested: bool) -> UpdateCounts:
        tokens = sum(mb["labels"].numel() if pack else mb["tokens"] for mb in micro)
        return cls(sum(int((mb["labels"] != IGNORE).sum()) for mb in micro), tokens, int(stop_requested))


@dataclass(eq=False)
class Run:
    """Everything one training run holds; built by :func:`sftplug.train.setup.build_run`."""

    config: TrainConfig
    registry: Registry
    world: distributed.World
    echo: Callable[..., None]  # print-like; silent on ranks other than 0
    out: Path
    device: torch.device
    precision: PrecisionPolicy
    model: DecoderModel
    tokenizer: Tokenizer
    params: list[torch.nn.Parameter]  # the trainable parameters
    replicated: torch.nn.Module | None  # the DDP view of the model for training forwards
    data: Prepared
    batches: Batches
    attention: AttentionChoice
    fused: FusedChoice  # the form of each fused op; the loss's cross_entropy step among them
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    peak_flops: float | None = None  # per device, for MFU (sftplug.train.flops)
    step: int = 0  # updates done
    tokens_seen: int = 0
    tokens_at_start: int = 0  # tokens_seen when this process started timing
    loggers: list[Logger] = field(default_factory=list)  # the --log-to loggers (rank 0)
    balance: Balance | None = None  # the experts' load-balancing loss and loads (a model with experts)

    @property
    def sharded(self) -> bool:
        return distributed.is_sharded(self.model)

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    # -- one update ---------------------------------------------------------------
    def loss_sum(self, mb: dict, model=None) -> tuple[torch.Tensor, int]:
        """(sum of target-token losses, number of targets) of one micro-batch.

        Labels and doc_ids stay on the host: target positions and packed-row plans are
        found there, so the GPU is never asked for them.
        """
        ids, positions = (mb[k].to(self.device, non_blocking=True) for k in ("input_ids", "positions"))
        with self.precision.autocast(self.device):
            hidden = (model or self.model)(ids, positions, mb["doc_ids"], hidden_only=True)
            model_config = self.model.config
            return target_loss_sum(hidden, mb["labels"], lm_head_weight(self.model),
                                   cross_entropy=self.fused.ops.cross_entropy, logit_scale=model_config.logit_scale,
                                   logit_softcap=model_config.logit_softcap)

    def update(self, stop_requested: bool = False) -> dict:
        """One optimizer update over ``--accum`` micro-batches; returns its metrics record.

        The device is read once, after backward (:func:`host_values`): the loss and the
        gradient norm, and under torchrun the update's token counts and whether any rank
        was asked to stop (``record["stop"]``), all-reduced together. fp16's GradScaler
        reads its own scale besides.
        """
        lr = self.schedule.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = [self.batches.next() for _ in range(self.config.accum)]
        # Every rank divides by the target tokens of the whole update, all ranks together: under
        # torchrun one all-reduce sums the counts, started here and read back with the loss.
        counts = UpdateCounts.of(micro, self.config.pack, stop_requested)
        summed = None  # the counts of every rank, on the device
        if self.world.active:
            summed = distributed.sum_tensor_(self.world, torch.tensor(counts).to(self.device, non_blocking=True))
        timer = Timer(self.device, self.config.profile)
        if self.balance is not None:
            self.balance.start()
        loss_sum = self._accumulate(micro, counts.target_tokens if summed is None else summed[0], timer)
        # The update's one read of the device, then the step (or its skip when not finite).
        with timer("opt"):
            distributed.sum_tensor_(self.world, loss_sum)
            balance = [] if self.balance is None else [distributed.sum_tensor_(self.world, self.balance.sums)]
            grad_norm = self._clip(self.precision.scaler)
            on_device = [loss_sum, grad_norm] + ([] if summed is None else [summed]) + balance
            loss_value, norm_value, *rest = host_values(*on_device)
            if summed is not None:
                counts, rest = UpdateCounts(*(int(v) for v in rest[:len(counts)])), rest[len(counts):]
            finite = math.isfinite(loss_value) and math.isfinite(norm_value)
            skipped = self._step(self.precision.scaler, finite, loss_value)
        seconds = timer.elapsed()
        self.step += 1
        self.tokens_seen += counts.tokens
        record = self._record(lr, loss_value, norm_value, counts, skipped, seconds, timer)
        if self.balance is not None:
            record.update(self.balance.record(rest, self.world.size))
        return record

    def _accumulate(self, micro: list[dict], n_targets: int | torch.Tensor, timer: Timer) -> torch.Tensor:
        """Backward through each micro-batch's loss (the update's gradients); the summed token losses."""
        scaler = self.precision.scaler
        loss_sum = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro):
            # DDP all-reduces during the backward of the update's last micro-batch only
            with distributed.gradient_sync(self.replicated, enabled=i == len(micro) - 1):
                with timer("fwd"):
                    total, _ = self.loss_sum(mb, self.replicated)
                    # DDP and FSDP average gradients over ranks; the update needs their sum
                    loss = total / n_targets * self.world.size
                    if self.balance is not None:  # the experts' load-balancing loss, a mean (sftplug.train.balance)
                        aux = self.balance.after_forward(self.model, mb)
                        loss = loss if aux is None else loss + aux
                with timer("bwd"):
                    (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += total.detach()
        return loss_sum

    def _record(self, lr: float, loss_value: float, grad_norm: float, counts: UpdateCounts, skipped: bool,
                seconds: float, timer: Timer) -> dict:
        """The update's line of metrics.jsonl (``stop`` is popped by the loop before it is written)."""
        record = {
            "step": self.step,
            "loss": loss_value / counts.target_tokens,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": counts.tokens,
            "target_tokens": counts.target_tokens,
            "tps": counts.tokens / seconds,
            "s_per_update": seconds,
            "stop": bool(counts.stop),
        }
        if skipped or self.precision.scaler is not None:
            record["skipped"] = skipped
        if self.peak_flops:
            config = self.config
            trained = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            adapters = 0 if config.full else active_adapter_params(trained, self.model.config)
            model_flops = update_flops(self.model.config, counts.tokens, counts.target_tokens, config.seq_len,
                                       config.full, adapters)
            record["mfu"] = model_flops / seconds / (self.peak_flops * self.world.size)
        if self.config.profile:
            record.update(fwd_ms=timer.ms("fwd"), bwd_ms=timer.ms("bwd"), opt_ms=timer.ms("opt"))
        return record

    def _clip(self, scaler) -> torch.Tensor:
        """The gradient norm (a device tensor), after clipping to --max-grad-norm."""
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        max_norm = self.config.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else 1e30)
        if hasattr(grad_norm, "full_tensor"):  # sharded parameters give a sharded norm
            grad_norm = grad_norm.full_tensor()
        return grad_norm

    def _step(self, scaler, finite: bool, loss_value: float) -> bool:
        """Step the optimizer unless the update is not finite; returns whether it was skipped."""
        skipped = False
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.step(self.optimizer)  # skips the step itself on inf/NaN gradients
            scaler.update()
            skipped = scaler.get_scale() < scale
        elif not finite:
            if self.config.on_nonfinite == "stop":
                raise SftplugError(
                    f"loss is {loss_value} at step {self.step + 1}: training stopped and the last checkpoint "
                    "kept; lower --lr, or pass --on-nonfinite skip to skip such updates"
                )
            skipped = True
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return skipped

    # -- held-out loss and metrics ------------------------------------------------------
    @torch.no_grad()
    def eval_loss(self) -> float | None:
        """Mean loss over the held-out rows; rank 0 alone unless the model is sharded."""
        # a sharded model needs every rank in each forward
        if self.data.eval is None or not (self.world.is_main or self.sharded):
            return None
        self.model.eval()
        total, count = 0.0, 0
        n_rows, bsz = len(self.data.eval), self.config.micro_bsz
        for start in range(0, n_rows, bsz):
            loss, n = self.loss_sum(batch_of(self.data.eval, list(range(start, min(start + bsz, n_rows)))))
            total += float(loss)
            count += n
        self.model.train()
        return total / max(count, 1)

    def log(self, record: dict) -> None:
        """Append one update's record to OUT/metrics.jsonl and hand it to every logger (rank 0)."""
        if self.world.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            for logger in self.loggers:
                logger.log(record)


def host_values(*tensors: torch.Tensor) -> list[float]:
    """The values of device tensors on the host, in one copy: an update's one read of the GPU."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    return flat.cpu().tolist()


class Timer:
    """Wall-clock sections of an update; synchronizes the GPU only when profiling."""

    def __init__(self, device: torch.device, sync: bool):
        self.sync = sync and device.type == "cuda"
        self.totals: dict[str, float] = {}
        self.started = time.perf_counter()
        self._name = None

    def __call__(self, name: str):
        self._name = name
        return self

    def __enter__(self):
        if self.sync:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.sync:
            torch.cuda.synchronize()
        self.totals[self._name] = self.totals.get(self._name, 0.0) + time.perf_counter() - self._t0

    def ms(self, name: str) -> float:
        return 1000 * self.totals.get(name, 0.0)

    def elapsed(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter() - self.started
