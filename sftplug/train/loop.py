"""The training loop: micro-batches, exact accumulation, optimizer, schedule, metrics.

The loss of an update is the sum of token losses over all its micro-batches divided by
the update's total number of target tokens, so ``--micro-bsz 2 --accum 4`` and
``--micro-bsz 8 --accum 1`` train identically.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import torch

from sftplug.checkpoint import folders as checkpoint
from sftplug.data import prepare as data
from sftplug.data import records
from sftplug.train import distributed
from sftplug.attention import attach, steering_notes
from sftplug.data.batches import Batches, batch_of
from sftplug.config import TrainConfig, check_output_dir
from sftplug.errors import SftplugError
from sftplug.model.generate import answer
from sftplug.loading import load_model, resolve_device
from sftplug.model.lora import apply_lora, lm_head_weight, lora_settings, trainable_state_dict
from sftplug.train.loss import target_loss_sum
from sftplug.data.packing import IGNORE, Rows
from sftplug.checkpoint.run_state import resume_run
from sftplug.train.schedule import Schedule

STATE_FILE = "state.pt"


class Run:
    """Everything one training run holds; plugins receive it in resume_state / on_resume."""

    def __init__(self, config: TrainConfig, registry, echo=print, rows: Rows | None = None):
        """Build the run; ``rows`` replaces the data files (benchmarks feed synthetic rows)."""
        self.world = distributed.init_world(config.device)
        self.config, self.registry = config, registry
        self.echo = echo if self.world.is_main else _silent
        self.step = 0  # updates done
        self.tokens_seen = self.tokens_at_start = 0
        self.out = check_output_dir(config.out)
        self.device = resolve_device(config.device)
        if self.world.active and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)
        hook = registry.hook
        self.precision = hook.configure_precision(dtype=config.dtype, device=self.device, tf32=config.tf32)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        # LoRA under bf16/fp16 keeps the frozen base in that dtype: half the memory and no
        # per-step weight casts; trainable weights and optimizer state stay fp32 either way.
        half = self.precision.autocast_dtype
        base_dtype = half if half is not None and not config.full else torch.float32
        loaded = load_model(config.model, dtype=base_dtype, device=self.device, registry=registry)
        self.tokenizer = loaded.tokenizer
        if config.chat_template:
            self.tokenizer.set_chat_template(config.chat_template)
        self.model = loaded.model
        self.model.checkpoint_blocks = config.grad_ckpt
        if config.full:
            self.model.requires_grad_(True)
            if config.strategy == "fsdp" and self.world.active:
                distributed.shard(self.model)
            elif config.strategy == "fsdp":
                self.echo("strategy: fsdp shards across processes; this run has one, so nothing is sharded "
                          "(start several with --nproc N or torchrun)")
        else:
            self.model.requires_grad_(False)
            apply_lora(self.model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.sharded = distributed.is_sharded(self.model)
        # DDP all-reduces gradient buckets while backward still runs; FSDP2 reduce-scatters
        replicate = self.world.active and not self.sharded
        self.replicated = distributed.replicate(self.model, self.world) if replicate else None
        if rows is None:
            self.load_data()
        else:
            self.rows, self.eval_rows, self.data_sha256, self.data_stats = rows, None, None, {}
            self.batches = self.make_batches(rows)
        self.choose_attention(loaded.description)
        if config.torch_compile:
            self.compile_blocks()
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay, eps=1e-8
        )
        self.schedule = Schedule(config.schedule, config.lr, config.warmup, config.steps, config.min_lr_ratio)
        self.metrics_path = self.out / "metrics.jsonl"

    # -- set-up ---------------------------------------------------------------------
    def load_data(self) -> None:
        c = self.config
        for turn in ("main", "others"):  # rank 0 tokenises and fills the cache; the others read it
            if (turn == "main") == self.world.is_main:
                prepared = data.prepare_data(
                    self.tokenizer, data=c.data, eval_data=c.eval_data, eval_split=c.eval_split, seq_len=c.seq_len,
                    pack=c.pack, fmt=c.format, train_on_prompt=c.train_on_prompt, overlong=c.overlong,
                    skip_bad_records=c.skip_bad_records, cache_dir=self.out / "cache", seed=c.seed,
                )  # fmt: skip
            distributed.barrier(self.world)
        self.rows, self.eval_rows, self.data_stats = prepared.train, prepared.eval, prepared.stats
        self.data_sha256 = prepared.stats["data_sha256"]
        self.batches = self.make_batches(self.rows)
        self.echo(prepared.describe())

    def make_batches(self, rows: Rows) -> Batches:
        c = self.config
        # Unpacked rows are cut to the longest document of each micro-batch, except when
        # compiled blocks want one fixed shape.
        return Batches(rows, c.micro_bsz, c.seed, workers=c.workers, pin_memory=self.device.type == "cuda",
                       trim=not c.pack and not c.torch_compile, rank=self.world.rank, world=self.world.size)

    def compile_blocks(self) -> None:
        """Compile each block once its attention is set; compilation happens in the first update."""
        mode = None if self.config.compile_mode == "default" else self.config.compile_mode
        for block in self.model.layers:
            block.compile(mode=mode, dynamic=False)  # packed rows have one fixed shape: no recompiles

    def choose_attention(self, model_description: str) -> None:
        dtype = self.precision.autocast_dtype or torch.float32
        packed = bool(int(self.rows.docs_per_row.max()) > 1)
        self.attention = attach(self.model, self.registry, self.config.attention, self.device, dtype, packed,
                                self.config.seq_len)
        trainable = sum(p.numel() for p in self.params)
        mode = "full fine-tune" if self.config.full else f"LoRA r={self.config.lora_r}"
        self.echo(f"model: {model_description}; {mode}, {trainable:,} trainable params on {self.device}")
        self.echo(f"precision: {self.precision.name}; attention: {self.attention.reason}")
        for note in steering_notes():
            self.echo(f"environment: {note}")

    # -- one update ---------------------------------------------------------------
    def loss_sum(self, mb: dict, model=None) -> tuple[torch.Tensor, int]:
        """(sum of target-token losses, number of targets) of one micro-batch."""
        mb = {k: (v.to(self.device, non_blocking=True) if v is not None else None) for k, v in mb.items()}
        with self.precision.autocast(self.device):
            hidden = (model or self.model)(mb["input_ids"], mb["positions"], mb["doc_ids"], hidden_only=True)
            return target_loss_sum(hidden, mb["labels"], lm_head_weight(self.model))

    def update(self) -> dict:
        c, device = self.config, self.device
        lr = self.schedule.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = [self.batches.next() for _ in range(c.accum)]
        # Every rank divides by the target tokens of the whole update, all ranks together.
        targets_here = sum(int((mb["labels"] != IGNORE).sum()) for mb in micro)
        n_targets = distributed.sum_int(self.world, targets_here, device)
        n_tokens = distributed.sum_int(self.world, sum(mb["labels"].numel() for mb in micro), device)
        scaler = self.precision.scaler
        timer = _Timer(device, c.profile)
        loss_sum = torch.zeros((), device=device)
        for i, mb in enumerate(micro):
            # DDP all-reduces during the backward of the update's last micro-batch only
            with distributed.gradient_sync(self.replicated, enabled=i == len(micro) - 1):
                with timer("fwd"):
                    total, _ = self.loss_sum(mb, self.replicated)
                    # DDP and FSDP average gradients over ranks; the update needs their sum
                    loss = total / n_targets * self.world.size
                with timer("bwd"):
                    (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += total.detach()
        with timer("opt"):
            distributed.sum_tensor_(self.world, loss_sum)
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm if c.max_grad_norm > 0 else 1e30)
            if hasattr(grad_norm, "full_tensor"):  # sharded parameters give a sharded norm
                grad_norm = grad_norm.full_tensor()
            skipped = False
            if scaler is not None:
                scale = scaler.get_scale()
                scaler.step(self.optimizer)  # skips the step itself on inf/NaN gradients
                scaler.update()
                skipped = scaler.get_scale() < scale
            elif not (math.isfinite(float(loss_sum)) and math.isfinite(float(grad_norm))):
                if c.on_nonfinite == "stop":
                    raise SftplugError(
                        f"loss is {float(loss_sum)} at step {self.step + 1}: training stopped and the last checkpoint "
                        "kept; lower --lr, or pass --on-nonfinite skip to skip such updates"
                    )
                skipped = True
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        seconds = timer.elapsed()
        self.step += 1
        self.tokens_seen += n_tokens
        record = {
            "step": self.step,
            "loss": float(loss_sum) / n_targets,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": n_tokens,
            "target_tokens": n_targets,
            "tps": n_tokens / seconds,
            "s_per_update": seconds,
        }
        if skipped or scaler is not None:
            record["skipped"] = skipped
        if c.profile:
            record.update(fwd_ms=timer.ms("fwd"), bwd_ms=timer.ms("bwd"), opt_ms=timer.ms("opt"))
        return record

    # -- evaluation and checkpoints ------------------------------------------------
    @torch.no_grad()
    def eval_loss(self) -> float | None:
        # a sharded model needs every rank in each forward; else rank 0 evaluates alone
        if self.eval_rows is None or not (self.world.is_main or self.sharded):
            return None
        self.model.eval()
        total, count = 0.0, 0
        n_rows, bsz = len(self.eval_rows), self.config.micro_bsz
        for start in range(0, n_rows, bsz):
            loss, n = self.loss_sum(batch_of(self.eval_rows, list(range(start, min(start + bsz, n_rows)))))
            total += float(loss)
            count += n
        self.model.train()
        return total / max(count, 1)

    def sample_prompt(self) -> str | None:
        if self.config.sample_prompt:
            return self.config.sample_prompt
        source = self.config.eval_data or self.config.data
        record = records.first_record(source)
        fmt = records.detect_format(record)
        if fmt in (None, "text"):
            return None
        messages = records.to_messages(record, fmt)
        return next(m["content"] for m in messages if m["role"] == "user")

    def sample_answer(self, prompt: str | None) -> str | None:
        """Rank 0's greedy answer to ``prompt`` (none when the model is sharded)."""
        if prompt is None or not self.world.is_main or self.sharded:
            return None
        return answer(self.model, self.tokenizer, prompt)

    def save(self) -> Path:
        state: dict = {}
        for part in self.registry.hook.resume_state(run=self):
            if part:
                state.update(part)
        model_path = Path(self.config.model)
        meta = {
            "base_model": str(model_path.resolve()) if model_path.exists() else self.config.model,
            "model_config": self.model.config.to_dict(),
            "lora": lora_settings(self.model),
            "config": self.config.to_dict(),
            "tokens_seen": self.tokens_seen,
            "data_sha256": self.data_sha256,
        }
        folder = Path(self.out) / "checkpoints" / f"step-{self.step}"
        # ``state`` holds every rank's part already: the hooks gathered it
        if self.sharded:  # each rank writes its own shards; rank 0 the small files, once all are written
            if self.world.is_main:
                checkpoint.begin(self.out, self.step)
            distributed.barrier(self.world)
            staging = checkpoint.staging(self.out, self.step)
            distributed.save_shards(self.model, self.optimizer, staging / checkpoint.SHARDS)
            distributed.barrier(self.world)
            if self.world.is_main:
                torch.save(state, staging / STATE_FILE)
                checkpoint.commit(self.out, self.step, meta)
        elif self.world.is_main:
            writers = {STATE_FILE: lambda path: torch.save(state, path)}
            checkpoint.write_checkpoint(self.out, self.step, trainable_state_dict(self.model), meta, writers)
        if self.world.is_main:
            checkpoint.prune(self.out, self.config.keep_last)
        distributed.barrier(self.world)
        return folder

    def log(self, record: dict) -> None:
        if not self.world.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")


class _Timer:
    """Wall-clock sections of an update; synchronises the GPU only when profiling."""

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


def _silent(*args, **kwargs) -> None:
    pass


def train(config: TrainConfig, registry, echo=print) -> dict:
    """Run a whole training job; returns the summary."""
    run = Run(config, registry, echo)
    try:
        return _train(run)
    finally:
        distributed.close(run.world)


def _train(run: Run) -> dict:
    config, echo = run.config, run.echo
    if config.resume:
        resume_run(run, config.resume)
    # Generating with FSDP would need every rank in each forward; tried, it left gloo work
    # pending at exit (an abort in 1 run of 2), so sharded runs skip the sample answers.
    prompt = run.sample_prompt() if not run.sharded else None
    before_loss = run.eval_loss()
    before_answer = run.sample_answer(prompt)
    if before_loss is not None:
        echo(f"held-out loss before: {before_loss:.4f}")
    started, first_step = time.perf_counter(), run.step
    compile_seconds = None
    interrupted = False
    with _StopOnSignal(echo) as stop:
        while run.step < config.steps:
            # all ranks stop together, even if the signal reached them at different updates
            if distributed.sum_int(run.world, int(stop.requested), run.device):
                interrupted = True
                break
            record = run.update()
            if config.torch_compile and compile_seconds is None:
                compile_seconds = record["s_per_update"]  # the first update compiles every block
                record["includes_compile"] = True
                echo(f"torch.compile: first update took {compile_seconds:.1f}s (compilation included)")
                started, first_step, run.tokens_at_start = time.perf_counter(), run.step, run.tokens_seen
            if config.eval_every and run.step % config.eval_every == 0:
                record["eval_loss"] = run.eval_loss()
            run.log(record)
            _report(run, record, started, first_step, echo)
            if config.save_every and run.step % config.save_every == 0 and run.step < config.steps:
                run.save()
    seconds = time.perf_counter() - started
    run.batches.close()
    folder = run.save()
    if interrupted:
        echo(f"interrupted: saved {folder} at step {run.step}; resume with the same command plus --resume auto")
    after_loss = run.eval_loss()
    summary = {
        "steps": run.step,
        "interrupted": interrupted,
        "seconds": seconds,
        "compile_seconds": compile_seconds,
        "tokens_per_second": (run.tokens_seen - run.tokens_at_start) / max(seconds, 1e-9),
        "eval_loss_before": before_loss,
        "eval_loss_after": after_loss,
        "checkpoint": str(folder),
        "sample_prompt": prompt,
        "answer_before": before_answer,
        "answer_after": run.sample_answer(prompt),
        "data": {k: run.data_stats.get(k, 0) for k in ("records", "skipped_bad", "truncated", "dropped")},
    }
    if run.device.type == "cuda":
        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if run.world.is_main:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _report(run: Run, record: dict, started: float, first_step: int, echo) -> None:
    c = run.config
    if c.profile:
        echo(
            f"[profile] forward {record['fwd_ms']:.0f} ms  backward {record['bwd_ms']:.0f} ms  "
            f"optimizer {record['opt_ms']:.0f} ms | {record['tps']:,.0f} tok/s | {record['s_per_update']:.2f} s/upd"
        )
    if run.step % c.log_every == 0 or run.step == c.steps:
        done = run.step - first_step
        eta = (time.perf_counter() - started) / done * (c.steps - run.step) if done else 0.0
        skipped = "  (skipped: inf/NaN grads)" if record.get("skipped") else ""
        echo(
            f"step {run.step:>{len(str(c.steps))}}/{c.steps}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.2e}  grad {record['grad_norm']:.2f}  | {record['tps']:,.0f} tok/s  "
            f"eta {eta:.0f}s{skipped}"
        )


class _StopOnSignal:
    """First SIGINT/SIGTERM: finish the update, save, exit 0. Second: exit at once."""

    def __init__(self, echo):
        self.echo, self.requested, self._previous = echo, False, {}

    def _handle(self, signum, frame):
        if self.requested:
            self.echo("second signal: exiting now without saving")
            os._exit(130)
        self.requested = True
        self.echo(f"{signal.Signals(signum).name}: finishing this update, then saving (signal again to quit now)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


