"""Several nodes: processes find out which of them share OUT; two torchrun launchers on this machine
(``--nnodes 2``, one process each, a c10d rendezvous on 127.0.0.1) train as two nodes would.

Over two nodes with one shared OUT, LoRA under FSDP2 trains as one process with the same global
batch, and its adapter-only checkpoint resumes and exports; with an OUT of its own on each node,
a DDP run keeps a data cache in each and its checkpoints in rank 0's alone.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import torch

from sftplug import distributed
from sftplug.checkpoint import folders
from sftplug.config import DEFAULT_DATA, TrainConfig
from sftplug.errors import SftplugError
from sftplug.train.setup import check_shared_out

COMMON = ["--steps", "4", "--seq-len", "64", "--log-every", "1", "--sample-prompt", "Hi", "--accum", "2",
          "--save-every", "2"]


def free_port():
    """A free port below the kernel's ephemeral range: the ports other tests' torchrun and gloo
    sockets get from the kernel are all in that range, so none of them can take this one between
    this check and the rendezvous binding it (a launcher on a taken port would join that store)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:
        low = 32768
    for port in random.Random(uuid.uuid4().int).sample(range(10000, low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return str(port)
    raise RuntimeError(f"no free port in 10000-{low}")


def sftplug_train(out, model, data, *extra) -> list[str]:
    return ["-m", "sftplug", "train", "--out", str(out), "--model", str(model), "--data", str(data), *COMMON, *extra]


def finish(procs, timeout=240) -> str:
    """Wait for every launcher; the output of the one whose rank 0 printed the summary."""
    outputs = []
    try:
        for proc, log in procs:
            proc.wait(timeout=timeout)
            outputs.append(log.read_text())
            assert proc.returncode == 0, outputs[-1][-6000:]
    finally:
        for proc, _ in procs:
            proc.kill()
    return next(out for out in outputs if "done:" in out)


def launch(args, log):
    """A torchrun launcher writing to the file ``log``: a pipe nobody reads while the test waits
    for another launcher could fill and stall this one's processes, and with them the other's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on shared cores
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], stdout=handle,
                                stderr=subprocess.STDOUT, text=True, env=env)
    return proc, log


def two_nodes(outs, model, data, *extra) -> str:
    """Two torchrun launchers, one process each, as two nodes would start them (c10d rendezvous; an
    id of their own, so launchers of another test can never join them)."""
    port, run_id = free_port(), uuid.uuid4().hex
    return finish([launch(["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend",
                           "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
                           *sftplug_train(out, model, data, *extra)], Path(str(out) + f".node{node}.log"))
                   for node, out in enumerate(outs)])


def metrics(out, key="loss"):
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def hf_and_data(tmp_path, make_hf_folder):
    hf, data = tmp_path / "hf", tmp_path / "data.jsonl"
    make_hf_folder(hf)
    data.write_text("".join(DEFAULT_DATA.read_text().splitlines(keepends=True)[:200]))
    return hf, data


@pytest.mark.slow
def test_fsdp_lora_over_two_nodes_equals_one_process_resumes_and_exports(tmp_path, hf_and_data, registry, quiet):
    from transformers import AutoModelForCausalLM

    from sftplug.checkpoint.export import export_checkpoint
    from sftplug.loading import load_model
    from sftplug.train.loop import train

    hf, data = hf_and_data
    one, two = tmp_path / "one", tmp_path / "two"
    options = dict(steps=4, seq_len=64, log_every=1, sample_prompt="Hi", accum=2, save_every=2)
    train(TrainConfig(out=str(one), model=str(hf), data=str(data), micro_bsz=4, **options), registry,
          echo=quiet)
    output = two_nodes([two, two], hf, data, "--micro-bsz", "2", "--strategy", "fsdp")
    assert output.count("precision:") == 1 and "out:" not in output  # rank 0 speaks; both nodes see one OUT

    # Each update's loss and gradient norm as one process's: fp32 rounding of the same sums in
    # another order (see test_distributed). The adapter after Adam: Adam divides by sqrt(v), which
    # turns rounding-level differences of near-zero gradient entries into larger steps in a few
    # entries, so each tensor is compared as a whole (a rank's tokens missing moves it by 10% or more).
    assert metrics(two) == pytest.approx(metrics(one), rel=1e-6)
    assert metrics(two, "grad_norm") == pytest.approx(metrics(one, "grad_norm"), rel=1e-5)
    step4 = two / "checkpoints" / "step-4"
    expected, adapter = folders.load_weights(one / "checkpoints" / "step-4"), folders.load_weights(step4)
    assert adapter.keys() == expected.keys()
    for name, weight in expected.items():
        assert float((adapter[name] - weight).norm() / weight.norm()) < 1e-3, name

    # The checkpoint: each rank's shards of the adapter and its optimizer state, nothing of the base.
    assert sorted(p.name for p in (step4 / folders.SHARDS).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    loaded = load_model(str(step4)).model.eval()
    assert adapter.keys() == {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert all(torch.equal(p, adapter[n]) for n, p in loaded.named_parameters() if p.requires_grad)
    # as a PEFT adapter, which it is only if B's entries outside the diagonal blocks stayed exactly zero
    export_checkpoint(step4, tmp_path / "adapter", merge=False)
    exported = export_checkpoint(step4, tmp_path / "export")["model"]
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()(ids).logits
        torch.testing.assert_close(logits, loaded(ids), rtol=1e-4, atol=1e-4)

    # Resumed from step 2 in one launcher's two processes: the same updates, bitwise.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(two / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    finish([launch(["--nproc-per-node", "2", "--master-port", free_port(),
                    *sftplug_train(resumed, hf, data, "--micro-bsz", "2", "--strategy", "fsdp", "--resume", "auto")],
                   tmp_path / "resumed.log")])
    assert metrics(resumed) == metrics(two)[2:]
    final = folders.load_weights(resumed / "checkpoints" / "step-4")
    assert all(torch.equal(final[n], adapter[n]) for n in adapter)


@pytest.mark.slow
def test_a_node_with_its_own_out_keeps_its_data_cache_there_and_checkpoints_stay_rank_0s(tmp_path, hf_and_data):
    hf, data = hf_and_data
    outs = [tmp_path / "node-a", tmp_path / "node-b"]
    output = two_nodes(outs, hf, data, "--micro-bsz", "2")  # DDP LoRA
    assert output.count("out: some nodes do not see rank 0's --out") == 1
    main, other = sorted(outs, key=lambda out: not (out / "metrics.jsonl").exists())
    assert len(metrics(main)) == 4
    assert [p.name for p in folders.complete_checkpoints(main)] == ["step-4", "step-2"]
    assert [p.name for p in other.iterdir()] == ["cache"]  # no checkpoint, log or marker: only its data cache
    entries = [list((out / "cache").iterdir()) for out in outs]
    assert [len(e) for e in entries] == [1, 1] and entries[0][0].name == entries[1][0].name
    assert (entries[0][0] / "ids.bin").read_bytes() == (entries[1][0] / "ids.bin").read_bytes()


class ThreadedCollectives:
    """gather and barrier across threads, each thread one rank."""

    def __init__(self, size: int):
        self.wait, self.slots = threading.Barrier(size, timeout=30).wait, [None] * size

    def gather(self, world, obj):
        self.slots[world.rank] = obj
        self.wait()
        out = list(self.slots)
        self.wait()
        return out

    def barrier(self, world):
        self.wait()


def share_out(monkeypatch, folders_by_rank, local_size=2):
    """Each rank's World after share_out (or its SftplugError), its ranks run as threads."""
    size = len(folders_by_rank)
    collectives = ThreadedCollectives(size)
    monkeypatch.setattr(distributed, "gather", collectives.gather)
    monkeypatch.setattr(distributed, "barrier", collectives.barrier)
    results = [None] * size

    def rank(r):
        world = distributed.World(r, size, r % local_size, local_size, r // local_size)
        try:
            results[r] = distributed.share_out(world, folders_by_rank[r])
        except SftplugError as exc:
            results[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_processes_find_which_nodes_share_out(tmp_path, monkeypatch):
    shared, own = tmp_path / "shared", tmp_path / "own"
    for folder in (shared, own):
        folder.mkdir()
    # three nodes of two processes: the second sees rank 0's folder, the third has its own
    worlds = share_out(monkeypatch, [shared] * 4 + [own] * 2)
    assert [w.out_node for w in worlds] == [0, 0, 0, 0, 2, 2]
    assert not any(w.shared_out for w in worlds)
    assert [w.writes_cache for w in worlds] == [True, False, False, False, True, False]
    assert not list(shared.iterdir()) and not list(own.iterdir())  # the markers are gone

    worlds = share_out(monkeypatch, [shared] * 4)
    assert all(w.shared_out for w in worlds) and [w.writes_cache for w in worlds] == [True, False, False, False]

    (tmp_path / "elsewhere").mkdir()
    errors = share_out(monkeypatch, [shared, tmp_path / "elsewhere"])  # one node, two folders
    assert all(isinstance(e, SftplugError) and "process 1 does not see the folder its node's first process "
               "writes" in str(e) for e in errors)


def test_what_needs_one_shared_out_is_refused_without_it(small_config):
    apart = distributed.World(1, 2, 0, 1, 1, out_node=1, shared_out=False)
    with pytest.raises(SftplugError, match=r"^--strategy fsdp: every process writes its checkpoint shards"):
        check_shared_out(small_config(strategy="fsdp"), apart, print)
    with pytest.raises(SftplugError, match=r"^--resume: every process reads the checkpoint"):
        check_shared_out(small_config(resume="auto"), apart, print)
    lines = []
    check_shared_out(small_config(), apart, lines.append)  # DDP: checkpoints are rank 0's alone
    assert lines and lines[0].startswith("out: some nodes do not see rank 0's --out")
    check_shared_out(small_config(strategy="fsdp", resume="auto"), distributed.World(), lines.append)
    assert len(lines) == 1


def test_torchruns_environment_gives_the_node_and_the_gpu_of_the_local_rank(monkeypatch):
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)  # no process group joined here
    world = distributed.init_world("cuda")
    assert (world.rank, world.size, world.local_rank, world.local_size, world.node) == (3, 4, 1, 2, 1)
    assert chosen == [1] and not world.is_main
