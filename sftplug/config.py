"""TrainConfig: every setting of a run, validated once, saved with each checkpoint."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from sftplug import dtypes
from sftplug.errors import SftplugError

SCHEDULES = ("cosine", "linear", "constant")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
DEFAULT_LORA_TARGETS = ("qkv", "o", "gate_up", "down")
ASSETS = Path(__file__).parent / "assets"
DEFAULT_DATA = ASSETS / "default_train.jsonl"
DEFAULT_EVAL = ASSETS / "default_eval.jsonl"


@dataclass
class TrainConfig:
    model: str = "tiny"
    data: str = str(DEFAULT_DATA)
    eval_data: str | None = "auto"  # auto: the bundled held-out file with the bundled data, else none
    out: str = "runs/default"
    steps: int = 200
    micro_bsz: int = 8
    accum: int = 1
    seq_len: int = 256
    pack: bool = True
    format: str = "auto"  # auto | chat | prompt | alpaca | text
    chat_template: str | None = None  # built-in name or file; None: the model's own
    overlong: str = "truncate"  # truncate | drop
    skip_bad_records: bool = False
    eval_split: float = 0.0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 10
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    full: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    dtype: str = "fp32"
    tf32: bool = False
    attention: str = "auto"
    device: str = "auto"
    seed: int = 0
    grad_ckpt: bool = False
    torch_compile: bool = False
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune
    workers: int = 0
    strategy: str = "ddp"  # under torchrun: ddp (replicated) | fsdp (FSDP2-sharded, full fine-tuning)
    profile: bool = False
    log_every: int = 10
    eval_every: int = 0  # 0: only before and after training
    save_every: int = 0  # 0: only at the end
    keep_last: int = 0  # 0: keep all
    resume: str | None = None
    on_nonfinite: str = "stop"  # stop | skip: what a non-finite loss does (bf16/fp32)
    train_on_prompt: bool = False
    sample_prompt: str | None = None  # None: the first eval record's prompt
    extra: dict = field(default_factory=dict)  # options added by plugins

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)
        if self.eval_data == "auto":
            bundled = Path(self.data) == DEFAULT_DATA and not self.eval_split
            self.eval_data = str(DEFAULT_EVAL) if bundled else None
        positive = ("steps", "micro_bsz", "accum", "seq_len", "lora_r", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise SftplugError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.compile_mode not in COMPILE_MODES:
            raise SftplugError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        for name in ("warmup", "eval_every", "save_every", "keep_last", "workers"):
            if getattr(self, name) < 0:
                raise SftplugError(f"--{name.replace('_', '-')} must not be negative")
        if self.dtype not in dtypes.TRAINING:
            raise SftplugError(f"--dtype must be one of {', '.join(dtypes.TRAINING)}, got {self.dtype!r}")
        if self.schedule not in SCHEDULES:
            raise SftplugError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise SftplugError(f"--strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.strategy == "fsdp" and not self.full:
            raise SftplugError("--strategy fsdp shards full fine-tuning; add --full, or use --strategy ddp for LoRA")
        if self.on_nonfinite not in ("stop", "skip"):
            raise SftplugError(f"--on-nonfinite must be stop or skip, got {self.on_nonfinite!r}")
        if not self.lr > 0:
            raise SftplugError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.lora_dropout < 1:
            raise SftplugError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")

    @property
    def tokens_per_update(self) -> int:
        return self.micro_bsz * self.accum * self.seq_len

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def check_output_dir(out: str) -> Path:
    """Create the run folder, or say in one line why it cannot be written."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SftplugError(f"--out {out}: cannot create the folder ({exc.strerror}); choose a writable path") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise SftplugError(f"--out {out}: the folder is not writable; choose a writable path")
    return path
