"""Tokenization speed and memory: N short chat records through prepare_data, then again from the cache.

    python benchmarks/tokenize_speed.py [--records N] [--seq-len S] [--workers W] [--profile]

Uses the bundled tokenizer (sftplug/assets) and its chat template; the records are
generated into a temporary JSONL file with a fixed seed. Each phase (tokenizing into an
empty cache, then reading that cache) runs in a fresh process, which reports its wall
time and its peak resident memory (ru_maxrss) over its base: the memory it held once the
imports and the tokenizer were loaded, just before prepare_data. Tokenizing worker
processes are reported apart (the largest one's peak and their CPU time). The targets:
peak memory at most 12 bytes per token over the base, and a cache hit that maps the tokens
instead of loading them.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the a cat dog truck whale count write word letter day after before opposite of is here times "
    "what which how many please give me first last number small big red blue green fast slow"
).split()


def make_records(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def sentence(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            messages = [{"role": "user", "content": sentence(4, 12)}, {"role": "assistant", "content": sentence(4, 16)}]
            if i % 10 == 0:  # some multi-turn conversations and system prompts
                messages += [
                    {"role": "user", "content": sentence(3, 8)},
                    {"role": "assistant", "content": sentence(3, 8)},
                ]
            record = {"messages": messages}
            if i % 7 == 0:
                record["system"] = "You are a helpful assistant."
            f.write(json.dumps(record) + "\n")


def _max_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def _cpu(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def phase(args) -> None:
    """One prepare_data call in this process; prints a JSON line of what it measured."""
    import numpy as np

    from sftplug.config import ASSETS
    from sftplug.data import prepare, tokenizing
    from sftplug.data.tokenizer import Tokenizer

    if args.workers:
        tokenizing.TOKENIZE_WORKERS = args.workers
    tokenizer = Tokenizer(ASSETS)
    tokenizer.render_spans([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}])
    base = _max_rss_mb()
    kwargs = dict(data=args.data, seq_len=args.seq_len, cache_dir=args.cache)
    started, cpu = time.perf_counter(), time.process_time()
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        prepared = profiler.runcall(prepare.prepare_data, tokenizer, **kwargs)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    else:
        prepared = prepare.prepare_data(tokenizer, **kwargs)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    peak = _max_rss_mb()
    batch_started = time.perf_counter()
    prepared.train.batch(list(range(0, len(prepared.train), max(1, len(prepared.train) // 8))))
    s = prepared.stats
    print(json.dumps({
        "wall": wall, "cpu": cpu, "base_mb": base, "peak_mb": peak,
        "workers_peak_mb": _max_rss_mb(resource.RUSAGE_CHILDREN), "workers_cpu": _cpu(resource.RUSAGE_CHILDREN),
        "tokens": s.tokens, "stored_tokens": len(prepared.train.ids), "rows": s.rows, "cache": s.cache,
        "mapped": isinstance(prepared.train.ids, np.memmap), "batch_ms": 1000 * (time.perf_counter() - batch_started),
        "describe": prepared.describe(),
    }))  # fmt: skip


def run_phase(args, data: Path, cache: Path, profile: bool) -> dict:
    command = [sys.executable, __file__, "--phase", "--data", str(data), "--cache", str(cache),
               "--seq-len", str(args.seq_len), "--workers", str(args.workers)] + (["--profile"] if profile else [])
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--workers", type=int, default=0, help="tokenizing processes (0: the default for the cores)")
    parser.add_argument("--profile", action="store_true", help="cProfile the uncached run (to stderr)")
    parser.add_argument("--phase", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return phase(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.jsonl"
        made = time.perf_counter()
        make_records(path, args.records)
        print(f"{args.records:,} records generated in {time.perf_counter() - made:.0f} s "
              f"({path.stat().st_size / 1e6:,.0f} MB of JSONL)")
        cold = run_phase(args, path, Path(tmp) / "cache", args.profile)
        warm = run_phase(args, path, Path(tmp) / "cache", False)
    print(cold["describe"])
    per_token = (cold["peak_mb"] - cold["base_mb"]) * 2**20 / cold["stored_tokens"]
    print(f"tokenize {args.records:,} chat records: {cold['wall']:.1f} s wall, {cold['cpu']:.1f} s CPU in the main "
          f"process ({cold['tokens']:,} tokens, {cold['rows']:,} rows of {args.seq_len})")
    print(f"  peak RSS {cold['peak_mb']:,.0f} MB = base {cold['base_mb']:,.0f} MB + "
          f"{cold['peak_mb'] - cold['base_mb']:,.0f} MB, {per_token:.2f} bytes per token over the base "
          f"(target <= 12: {'PASS' if per_token <= 12 else 'FAIL'}); largest worker process "
          f"{cold['workers_peak_mb']:,.0f} MB, CPU time of the workers {cold['workers_cpu']:.1f} s")
    print(f"second run from the cache ({warm['cache']}, tokens {'mapped' if warm['mapped'] else 'LOADED'}): "
          f"{warm['wall']:.2f} s, peak RSS {warm['peak_mb']:,.0f} MB = base {warm['base_mb']:,.0f} MB + "
          f"{warm['peak_mb'] - warm['base_mb']:,.0f} MB; a batch of 8 rows built in {warm['batch_ms']:.1f} ms")


if __name__ == "__main__":
    main()
