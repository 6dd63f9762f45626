"""What preparing the data found: counts, the options that decided it, where it came from.

A :class:`DataStats` is stored in the cache entry's ``meta.json`` (its fields in their
order are the keys there) and read back on a cache hit; it gives the run header's data
line (:meth:`DataStats.describe`), ``sftplug data preview`` and the run summary their
numbers. A field named ``eval_...`` counts the held-out part; the others the training part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(kw_only=True)
class DataStats:
    # the sources
    data: str
    eval_data: str | None
    format: str  # the training file's record format
    formats: dict[str, str]  # each file's
    chat_template: str | None = None  # its file, or which built-in (entries of an older sftplug have none)
    chat_template_warning: str | None = None  # for a model that has none
    # records and what became of them
    records: int
    eval_records: int
    examples: int  # one per record, or one per assistant turn where the template rewrites earlier turns
    eval_examples: int
    skipped_bad: int
    skipped_bad_lines: list[str]  # the first few, file:line
    rows: int
    eval_rows: int
    tokens: int  # input positions holding a token, training rows
    target_tokens: int
    eval_target_tokens: int
    fill: float  # tokens / (rows * seq_len)
    assistant_turns_without_eos: int
    seconds: float  # reading, tokenizing and placing
    records_per_s: float
    # the options that decide the entry (prepare_data's, as checked by TrainConfig)
    seq_len: int
    pack: bool
    fmt: str
    train_on_prompt: bool
    train_turns: str
    overlong: str
    eval_split: float
    seed: int
    skip_bad_records: bool
    field_map: dict[str, str] | None
    # documents cut to seq_len, dropped, or without a target: both parts, and the first few file:line
    truncated: int
    truncated_lines: list[str]
    dropped: int
    dropped_lines: list[str]
    untrainable: int
    untrainable_lines: list[str]
    # where the rows come from
    data_sha256: str | None = None
    cache: str | None = None  # "hit", "miss" or "not written (why)"; None without a cache folder
    cache_file: str | None = None
    load_seconds: float | None = None  # mapping a cache hit; measured each time, never stored

    def saved(self) -> dict:
        """The fields meta.json stores, in its key order."""
        fields = asdict(self)
        del fields["load_seconds"]
        return fields

    def describe(self, batch_fill: float | None = None) -> str:
        """One line for the run header; ``batch_fill``: the fill of micro-batches cut to their
        longest row (``--no-pack``, :meth:`MicroBatches.fill`), where training cuts them."""
        length, how, counted = self.seq_len, f"packed, {self.fill:.0%} filled", ""
        if not self.pack:
            how, counted = f"one per row, {self.fill:.0%} filled", "; tok/s counts tokens, not padding"
        if batch_fill is not None:
            length = f"up to {length}"
            how = f"one per row, each micro-batch cut to its longest row: {batch_fill:.0%} filled"
        parts = [
            f"data: {self.records:,} {self.format} records{_examples(self.examples, self.records)} -> "
            f"{self.rows:,} rows of {length} ({how}, {self.target_tokens:,} target tokens{counted})"
        ]
        if self.eval_records:
            how = f"{self.eval_split:.0%} split" if self.eval_split else "held out"
            parts.append(f"eval: {self.eval_records:,} records ({how}) -> {self.eval_rows:,} rows")
        if self.skipped_bad:
            n = self.skipped_bad
            parts.append(f"skipped {n:,} bad record{'s' if n != 1 else ''} ({', '.join(self.skipped_bad_lines)})")
        for name in ("truncated", "dropped", "untrainable"):
            if getattr(self, name):
                parts.append(f"{getattr(self, name):,} {name} ({', '.join(getattr(self, name + '_lines'))})")
        if self.chat_template and self.format != "text":  # which file, or which built-in
            parts.append(f"chat template: {self.chat_template}")
            if self.chat_template_warning:
                parts.append(f"warning: {self.chat_template_warning}")
        if self.assistant_turns_without_eos:
            parts.append(f"warning: {self.assistant_turns_without_eos:,} assistant turns do not end with EOS")
        if self.cache == "hit":
            parts.append(f"cache hit, mapped in {self.load_seconds:.2f}s")
        else:
            cache = {"miss": " (cache miss, saved)", None: ""}.get(self.cache, f" (cache {self.cache})")
            parts.append(f"tokenized at {self.records_per_s:,.0f} records/s{cache}")
        return "; ".join(parts)


def _examples(examples: int | None, records: int) -> str:
    """", as 7 examples" where records gave more examples than themselves (turns in their own contexts)."""
    return f" as {examples:,} examples" if examples and examples != records else ""
