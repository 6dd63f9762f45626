"""A whole training job: resume, held-out loss and sample answers before and after, the
update loop with its progress lines, checkpoints, and a clean stop on Ctrl-C or SIGTERM
(saved, without the end-of-run evaluation and answers; exit code 128 + the signal's number)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch

from sftplug import distributed
from sftplug.checkpoint.run_state import resume, save_checkpoint
from sftplug.config import TrainConfig
from sftplug.data import records, sources
from sftplug.model.generate import answer
from sftplug.train import lock
from sftplug.train.loggers import close_loggers, open_loggers
from sftplug.train.progress import Progress
from sftplug.train.run import Run
from sftplug.train.setup import build_run


def train(config: TrainConfig, registry, echo=print) -> dict:
    """Run a whole training job; returns the summary (also written to OUT/summary.json).

    Bad choices (--log-to, --attention, ...) are refused before anything loads (build_run).
    """
    run = build_run(config, registry, echo)
    try:
        if run.world.is_main:  # loggers run on rank 0 only
            run.loggers = open_loggers(registry, config, run.out, run.echo)
        return _train(run)
    finally:
        close_loggers(run.loggers, run.echo)
        lock.release(run.out)
        distributed.close(run.world)


def _train(run: Run) -> dict:
    config, echo = run.config, run.echo
    if config.resume:
        resume(run, config.resume)
    # Generating with FSDP would need every rank in each forward; tried, it left gloo work
    # pending at exit (an abort in 1 run of 2), so sharded runs skip the sample answers.
    prompt = sample_prompt(config) if not run.sharded else None
    # The model before training, to compare with after it.
    before_loss = run.eval_loss()
    before_answer = sample_answer(run, prompt)
    if before_loss is not None:
        echo(f"held-out loss before: {before_loss:.4f}")
        if run.step == 0:  # step 0's record: the model before any update (the plot's first point)
            run.log({"step": 0, "eval_loss": before_loss})
    if run.device.type == "cuda":  # the peak of the training steps, not of loading or generation
        torch.cuda.reset_peak_memory_stats(run.device)
    ended = _update_loop(run)
    peak = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None
    run.batches.close()
    # The last checkpoint, then the model after training, unless the run was stopped before its end.
    folder = save_checkpoint(run)
    if ended.interrupted:  # the end-of-run evaluation and answers are skipped: the run is not over
        echo(f"interrupted: saved {folder} at step {run.step}; resume with the same command plus --resume auto")
    after_loss = ended.after_loss
    if after_loss is None and not ended.interrupted:  # no update ran here (resumed at the end)
        after_loss = run.eval_loss()
    summary = {
        "steps": run.step,
        "interrupted": ended.interrupted,
        "signal": ended.signal_name,
        "seconds": ended.seconds,
        "compile_seconds": ended.compile_seconds,
        "tokens_per_second": (run.tokens_seen - run.tokens_at_start) / max(ended.seconds, 1e-9),
        "eval_loss_before": before_loss,
        "eval_loss_after": after_loss,
        "out": str(run.out),
        "checkpoint": str(folder),
        "sample_prompt": prompt,
        "answer_before": before_answer,
        "answer_after": None if ended.interrupted else sample_answer(run, prompt),
        "data": {k: getattr(run.data.stats, k, 0) for k in ("records", "skipped_bad", "truncated", "dropped")},
    }
    if peak is not None:
        summary["peak_memory_gib"] = peak
    if run.world.is_main:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


@dataclass
class _LoopEnd:
    """How the update loop ended."""

    seconds: float  # of training: neither the first update where it compiles nor held-out passes
    compile_seconds: float | None
    interrupted: bool
    signal_name: str | None  # the signal that interrupted it; None also where another process was signalled
    after_loss: float | None  # measured with the last update, into its record


def _update_loop(run: Run) -> _LoopEnd:
    """Updates until --steps or a stop signal, each logged and shown, checkpoints every --save-every."""
    config = run.config
    started = time.perf_counter()
    compile_seconds, interrupted, after_loss = None, False, None
    eval_seconds = 0.0  # held-out passes inside the loop: not training time
    with Progress(run) as progress, _StopOnSignal(progress.echo) as stop:
        while run.step < config.steps:
            if stop.requested and not run.world.active:
                interrupted = True
                break
            # under torchrun the ranks agree on stopping in the update's own all-reduce
            record = run.update(stop_requested=stop.requested)
            interrupted = record.pop("stop")
            if config.torch_compile and compile_seconds is None:
                compile_seconds = record["s_per_update"]  # the first update compiles every block
                record["includes_compile"] = True
                progress.echo(f"torch.compile: first update took {compile_seconds:.1f}s (compilation included)")
                started, run.tokens_at_start = time.perf_counter(), run.tokens_seen
                progress.restart()
            at_end = run.step == config.steps and not interrupted
            if at_end or (config.eval_every and run.step % config.eval_every == 0):
                eval_started = time.perf_counter()
                loss = run.eval_loss()
                eval_seconds += time.perf_counter() - eval_started
                if loss is not None:
                    record["eval_loss"] = loss
                if at_end:
                    after_loss = loss
            run.log(record)
            progress.show(record)
            if interrupted:
                break
            if config.save_every and run.step % config.save_every == 0 and run.step < config.steps:
                save_checkpoint(run)
    seconds = time.perf_counter() - started - eval_seconds
    return _LoopEnd(seconds, compile_seconds, interrupted, stop.signal_name if interrupted else None, after_loss)


def sample_prompt(config: TrainConfig) -> str | None:
    """``--sample-prompt``, or the first user turn of the first eval (else training) record."""
    if config.sample_prompt:
        return config.sample_prompt
    record = sources.first_record(config.eval_data or config.data, config.field_map)
    fmt = records.detect_format(record)
    if fmt in (None, "text"):
        return None
    messages = records.to_messages(record, fmt)
    return next(m["content"] for m in messages if m["role"] == "user")


def sample_answer(run: Run, prompt: str | None) -> str | None:
    """Rank 0's greedy answer to ``prompt`` (none when the model is sharded)."""
    if prompt is None or not run.world.is_main or run.sharded:
        return None
    return answer(run.model, run.tokenizer, prompt)


def interrupted_exit_code(summary: dict) -> int:
    """The exit code of an interrupted run: 128 + the signal's number (130 after Ctrl-C, 143 after
    SIGTERM), as a shell reports a process the signal ended; 130 where another process was signalled."""
    return 128 + signal.Signals[summary.get("signal") or "SIGINT"].value


class _StopOnSignal:
    """First SIGINT/SIGTERM: finish the update, save, and end interrupted. Second: exit at once."""

    def __init__(self, echo):
        self.echo, self.requested, self.signal_name, self._previous = echo, False, None, {}

    def _handle(self, signum, frame):
        if self.requested:
            self.echo("second signal: exiting now without saving")
            os._exit(128 + signum)
        self.requested, self.signal_name = True, signal.Signals(signum).name
        self.echo(f"{signal.Signals(signum).name}: finishing this update, then saving (signal again to quit now)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
