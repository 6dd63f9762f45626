"""Tokenisation speed: 100,000 short chat records through prepare_data (the acceptance
target is under 60 s on 2 CPU cores), then the same call again from the cache.

    python benchmarks/tokenize_speed.py [--records N] [--seq-len S] [--profile]

Uses the bundled tokenizer (sftplug/assets) and its chat template; the records are
generated into a temporary JSONL file with a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from sftplug.config import ASSETS
from sftplug.data.prepare import prepare_data
from sftplug.data.tokenizer import Tokenizer

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--profile", action="store_true", help="cProfile the uncached run")
    args = parser.parse_args()
    tokenizer = Tokenizer(ASSETS)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.jsonl"
        make_records(path, args.records)
        kwargs = dict(data=path, seq_len=args.seq_len, cache_dir=Path(tmp) / "cache")
        started, cpu = time.perf_counter(), time.process_time()
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            prepared = profiler.runcall(prepare_data, tokenizer, **kwargs)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        else:
            prepared = prepare_data(tokenizer, **kwargs)
        cold, cold_cpu = time.perf_counter() - started, time.process_time() - cpu
        started = time.perf_counter()
        again = prepare_data(tokenizer, **kwargs)
        warm = time.perf_counter() - started
    s = prepared.stats
    print(prepared.describe())
    print(
        f"tokenise {args.records:,} chat records: {cold:.1f} s wall, {cold_cpu:.1f} s CPU "
        f"({s['records_per_s']:,.0f} records/s, "
        f"{s['tokens']:,} tokens, {s['rows']:,} rows of {args.seq_len}); target < 60 s: "
        f"{'PASS' if cold < 60 else 'FAIL'}"
    )
    print(f"second run from the cache ({again.stats['cache']}): {warm:.2f} s")


if __name__ == "__main__":
    main()
