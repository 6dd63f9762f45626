"""`sftplug train --nproc N`: N local processes through torchrun's own launcher.

The same as ``torchrun --standalone --nproc-per-node N -m sftplug train ...``, except that a
failed process ends the run with one line naming it, not the launcher's traceback.
"""

from __future__ import annotations

import os
import sys
import uuid

from sftplug.errors import SftplugError


def train_args(argv: list[str]) -> list[str]:
    """The arguments after ``train`` in ``argv``, without ``--nproc``."""
    args = argv[argv.index("train") + 1 :]
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def launch(nproc: int, args: list[str]) -> None:
    """Run ``sftplug train args`` in ``nproc`` processes; SystemExit with the failed one's code."""
    if "WORLD_SIZE" in os.environ:
        raise SftplugError("--nproc starts torchrun itself; under torchrun leave --nproc out")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))  # no oversubscribed cores
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
    )  # fmt: skip
    try:
        elastic_launch(config, sys.executable)("-m", "sftplug", "train", *args)
    except SignalException as exc:  # Ctrl-C or SIGTERM: the launcher passed it on and each process saved
        raise SystemExit(128 + exc.sigval) from None
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        how = f"exit code {code}" if code >= 0 else f"killed by {failure.signal_name()}"
        print(f"Error: process {rank} of {nproc} failed ({how}); the other processes were stopped", file=sys.stderr)
        raise SystemExit(code if code > 0 else 1) from None
