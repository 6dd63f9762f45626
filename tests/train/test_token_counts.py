"""What tok/s and the data line's fill count: packed rows whole, unpacked rows (--no-pack) without
the padding batching adds, against lengths known from the data itself."""

import numpy as np
import pytest
import torch

from sftplug.data.batches import MicroBatches
from sftplug.data.packing import IGNORE, Rows
from sftplug.train.setup import build_run

SEQ_LEN = 64
LENGTHS = [5, 60, 17, 33, 9, 64, 41, 2, 28, 50, 12, 37]  # each row's one document, in positions


def padded_rows(lengths=LENGTHS, seq_len=SEQ_LEN, vocab=200) -> Rows:
    """One document per row of the given lengths, then padding (its own document: doc id 1)."""
    n = len(lengths)
    tokens = torch.randint(3, vocab, (n, seq_len + 1), generator=torch.Generator().manual_seed(0))
    column = torch.arange(seq_len).expand(n, seq_len)
    real = column < torch.tensor(lengths)[:, None]
    input_ids = torch.where(real, tokens[:, :-1], 0)
    labels = torch.where(real, tokens[:, 1:], IGNORE)
    positions = torch.where(real, column, column - torch.tensor(lengths)[:, None])
    doc_ids = (~real).to(torch.int32)
    return Rows(input_ids, labels, positions, doc_ids, torch.ones(n, dtype=torch.long))


@pytest.mark.parametrize("compiled_shape", [False, True])
def test_unpacked_updates_count_the_documents_tokens_not_padding(small_config, registry, compiled_shape, quiet):
    config = small_config(pack=False, micro_bsz=3, accum=2, steps=3)
    run = build_run(config, registry, echo=quiet, rows=padded_rows())
    run.batches.dataset.trim = not compiled_shape  # torch.compile keeps whole rows: the count must not change
    for update in range(3):
        micro = range(update * config.accum, (update + 1) * config.accum)
        picked = [row for m in micro for row in run.batches.dataset.picks(m)]
        record = run.update()
        assert record["tokens"] == sum(LENGTHS[row] for row in picked)
        assert record["tps"] == record["tokens"] / record["s_per_update"]
    assert run.tokens_seen == sum(LENGTHS[row] for m in range(6) for row in run.batches.dataset.picks(m))


def test_packed_updates_count_whole_rows_as_before(small_config, registry, quiet):
    config = small_config(pack=True, micro_bsz=3, accum=2, steps=2)
    run = build_run(config, registry, echo=quiet, rows=padded_rows())
    for _ in range(2):
        assert run.update()["tokens"] == config.micro_bsz * config.accum * SEQ_LEN


@pytest.mark.parametrize("micro_bsz, world", [(3, 1), (5, 1), (2, 2), (4, 3)])
def test_fill_is_the_tokens_over_the_positions_of_one_epochs_micro_batches(micro_bsz, world):
    """Per micro-batch of every rank, as training builds it: rows x the batch's length (its longest
    row when cut, else the whole row); the last micro-batches of an epoch wrap around."""
    rows = padded_rows()
    fills = {}
    for trim in (True, False):
        tokens = positions = 0
        ranks = [MicroBatches(rows, micro_bsz, seed=3, trim=trim, rank=r, world=world) for r in range(world)]
        for m in range(ranks[0].per_epoch):
            for dataset in ranks:
                picked = dataset.picks(m)
                width = max(LENGTHS[row] for row in picked) if trim else SEQ_LEN
                tokens += sum(LENGTHS[row] for row in picked)
                positions += len(picked) * width
                batch = dataset[m]
                assert batch["input_ids"].shape == (micro_bsz, width)
                assert batch["tokens"] == sum(LENGTHS[row] for row in picked)
        fills[trim] = ranks[0].fill()
        assert fills[trim] == tokens / positions and 0 < fills[trim] <= 1
    assert fills[True] > fills[False]  # cutting to the longest row leaves less padding


def test_the_data_line_says_what_is_counted(small_config, registry, tmp_path):
    lines = []
    config = small_config(pack=False, micro_bsz=4, out=str(tmp_path / "unpacked"))
    run = build_run(config, registry, echo=lines.append)
    fill = MicroBatches(run.data.train, 4, config.seed, trim=True).fill()
    line = next(x for x in lines if x.startswith("data: "))
    assert (f"rows of up to 64 (one per row, each micro-batch cut to its longest row: {fill:.0%} filled, "
            f"{run.data.stats.target_tokens:,} target tokens; tok/s counts tokens, not padding)") in line
    assert fill > run.data.stats.fill  # the rows' own fill counts padding no batch computes
    whole_rows = run.data.describe()  # torch.compile keeps whole rows: their own fill is the one computed
    assert (f"rows of 64 (one per row, {run.data.stats.fill:.0%} filled, {run.data.stats.target_tokens:,} "
            "target tokens; tok/s counts tokens, not padding)") in whole_rows
    lines.clear()
    run = build_run(small_config(out=str(tmp_path / "packed")), registry, echo=lines.append)
    line = next(x for x in lines if x.startswith("data: "))
    assert f"rows of 64 (packed, {run.data.stats.fill:.0%} filled, " in line


def test_every_batch_counts_its_real_tokens(small_config, registry, quiet):
    """Bundled data, --no-pack: each micro-batch's count is its documents' positions (need), however cut."""
    run = build_run(small_config(pack=False, micro_bsz=4), registry, echo=quiet)
    rows = run.data.train
    need = rows.need[rows.row_ptr[:-1]]  # one document per row
    for m in range(5):
        picked = run.batches.dataset.picks(m)
        batch = run.batches.dataset[m]
        assert batch["tokens"] == int(np.sum(need[picked]))
        assert batch["input_ids"].shape == (4, int(np.max(need[picked])))
