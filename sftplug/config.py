"""TrainConfig: every setting of a run, declared once, validated once, saved with each checkpoint.

Each field carries its command-line help, group, choices and lower bound as metadata;
``sftplug train``'s options are generated from them (:mod:`sftplug.cli.options`), and
:meth:`TrainConfig.__post_init__` is the one place a value is checked, whether it came
from the command line, a test or the Python API.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from sftplug import dtypes
from sftplug.data.records import FORMATS
from sftplug.errors import SftplugError
from sftplug.fused.choice import parse_fused
from sftplug.model.lora_targets import DEFAULT_LORA_TARGETS, LORA_VARIANTS, hf_targets

ASSETS = Path(__file__).parent / "assets"
DEFAULT_DATA = ASSETS / "default_train.jsonl"
DEFAULT_EVAL = ASSETS / "default_eval.jsonl"
SCHEDULES = ("cosine", "linear", "constant")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
OVERLONG = ("truncate", "drop")
STRATEGIES = ("ddp", "fsdp")
QUANT_TYPES = ("none", "nf4", "fp4")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
ON_NONFINITE = ("stop", "skip")
# Option groups and their titles, in the order `sftplug train -h` shows them.
GROUPS = {"model": "Model", "data": "Data", "optimizer": "Optimizer", "lora": "LoRA", "runtime": "Runtime",
          "run": "Run"}


def option(default, help: str, group: str, *, choices=None, minimum=None, shown_default=None):
    """A TrainConfig field with its command-line option's help, group, choices and lower bound."""
    assert group in GROUPS, group
    meta = {"help": help, "group": group, "choices": choices, "minimum": minimum, "shown_default": shown_default}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # -- model
    model: str = option("tiny", "Preset name (tiny, w0, w1), HF folder or sftplug checkpoint.", "model")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.", "model")
    # -- data
    data: str = option(str(DEFAULT_DATA), "Training records: JSONL or JSON (optionally .gz), parquet, or a "
                       "datasets save_to_disk folder.", "data",
                       shown_default="the bundled demo data")
    eval_data: str | None = option("auto", "Held-out records for eval loss (auto: the bundled held-out "
                                   "file with the bundled data, else none).", "data")
    seq_len: int = option(256, "Tokens per packed row.", "data", minimum=1)
    pack: bool = option(True, "Pack several documents per row.", "data")
    eval_split: float = option(0.0, "Fraction of --data held out.", "data")
    format: str = option("auto", "Record format (auto: detected per file).", "data", choices=("auto",) + FORMATS)
    chat_template: str | None = option(None, "One of the model's named templates, a built-in (sftplug, chatml), "
                                       "a Jinja or JSON file, or a model folder; default the model's own "
                                       "(chat_template.jinja, else tokenizer_config.json's).", "data")
    overlong: str = option("truncate", "What happens to documents longer than --seq-len.", "data",
                           choices=OVERLONG)
    skip_bad_records: bool = option(False, "Skip and count bad records instead of stopping.", "data")
    train_on_prompt: bool = option(False, "Also train on prompt tokens.", "data")
    train_turns: str = option("all", "Assistant turns trained: all (each in the context the template renders "
                              "when it is generated) or last (only the final one).", "data",
                              choices=("all", "last"))
    field_map: dict[str, str] | None = option(None, "Rename record fields before the format is detected: "
                                              "question=prompt,answer=completion.", "data")
    # -- optimizer
    steps: int = option(200, "Optimizer updates.", "optimizer", minimum=1)
    micro_bsz: int = option(8, "Rows per micro-batch.", "optimizer", minimum=1)
    accum: int = option(1, "Micro-batches per update.", "optimizer", minimum=1)
    lr: float = option(3e-3, "Peak learning rate.", "optimizer")
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of --lr (cosine, linear).", "optimizer")
    warmup: int = option(10, "Warmup updates.", "optimizer", minimum=0)
    schedule: str = option("cosine", "Learning-rate schedule.", "optimizer", choices=SCHEDULES)
    weight_decay: float = option(0.0, "AdamW weight decay.", "optimizer")
    optimizer: str = option("adamw", "torch's AdamW, or bitsandbytes' 8-bit (adamw8bit) and paged (paged_adamw, "
                            "paged_adamw8bit: GPU only) AdamW.", "optimizer", choices=OPTIMIZERS)
    max_grad_norm: float = option(1.0, "Gradient clipping norm; 0 disables clipping.", "optimizer")
    seed: int = option(0, "Seed of the data order, eval split and LoRA init.", "optimizer")
    router_aux_loss_coef: float | None = option(None, "Mixtures of experts: the load-balancing loss's coefficient "
                                                "(0 turns it off).", "optimizer",
                                                shown_default="the model's router_aux_loss_coef")
    # -- LoRA
    full: bool = option(False, "Full fine-tuning instead of LoRA.", "lora")
    lora_r: int = option(16, "LoRA rank.", "lora", minimum=1)
    lora_alpha: float = option(32.0, "LoRA alpha (scale alpha / r).", "lora")
    lora_dropout: float = option(0.0, "LoRA dropout.", "lora")
    lora_targets: tuple[str, ...] = option(DEFAULT_LORA_TARGETS, "Comma-separated HF projections (q_proj, k_proj, "
                                           "v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head; a Gated DeltaNet "
                                           "layer's in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, in_proj_qkvz, "
                                           "in_proj_ba, out_proj), trained as PEFT trains them; the fused layers' "
                                           "names qkv, o, gate_up, down work too. A mixture's experts: "
                                           "experts.gate_up_proj, experts.down_proj (PEFT's target_parameters). The "
                                           "default takes every block projection the model has.", "lora")
    train_router: bool = option(False, "Mixtures of experts under LoRA: train every router in full too (its "
                                "weight and bias, in fp32); they stay frozen otherwise.", "lora")
    lora_variant: str = option("lora", "lora, or dora (PEFT's use_dora).", "lora", choices=LORA_VARIANTS)
    rslora: bool = option(False, "Rank-stabilized scale alpha / sqrt(r) (PEFT's use_rslora).", "lora")
    quantize: str = option("none", "QLoRA: keep the frozen base's block weights in 4-bit through bitsandbytes "
                           "(nf4 or fp4), computing in --dtype; embeddings and the LM head stay unquantized.",
                           "lora", choices=QUANT_TYPES)
    double_quant: bool = option(True, "With --quantize, quantize the 4-bit blocks' scales too (QLoRA's double "
                                "quantization).", "lora")
    adapter: str | None = option(None, "A PEFT LoRA adapter folder (adapter_config.json + "
                                 "adapter_model.safetensors) to continue training on --model, its base; its r, "
                                 "alpha, dropout, targets and variant replace --lora-*.", "lora")
    # -- runtime
    dtype: str = option("auto", "Training precision; auto: bf16 on a GPU that runs it, else fp32.", "runtime",
                        choices=("auto",) + dtypes.TRAINING)
    tf32: bool = option(False, "TF32 matmuls for fp32 on Ampere+ GPUs.", "runtime")
    attention: str = option("auto", "Attention backend (see `sftplug plugins`).", "runtime")
    linear_attention: str = option("auto", "Backend of the gated delta rule in a hybrid model's linear-attention "
                                   "layers (Qwen3.5, Qwen3-Next; see `sftplug plugins`).", "runtime")
    fused: str = option("auto", "Fused forms of RMSNorm, the gated MLP, RoPE and the loss: auto (where faster "
                        "here), none, all, or ops to fuse: rmsnorm,glu,rope,cross_entropy (OP=FORM names a form).",
                        "runtime")
    grad_ckpt: bool = option(False, "Activation checkpointing per block.", "runtime")
    offload_activations: bool = option(False, "Keep each block's saved activations in pinned CPU memory between "
                                       "forward and backward (with --grad-ckpt: the blocks' inputs).", "runtime")
    torch_compile: bool = option(False, "Compile each transformer block (time reported apart).", "runtime")
    compile_mode: str = option("default", "torch.compile mode.", "runtime", choices=COMPILE_MODES)
    strategy: str = option("ddp", "Under torchrun: replicate the model (ddp) or shard it with FSDP2 per block "
                           "(fsdp; LoRA shards the frozen base and the adapters).", "runtime", choices=STRATEGIES)
    workers: int = option(0, "DataLoader workers prefetching batches.", "runtime", minimum=0)
    profile: bool = option(False, "Print forward/backward/optimizer ms per update.", "runtime")
    # -- the run
    out: str = option("runs/default", "Run folder.", "run")
    log_every: int = option(10, "Print a line every N updates.", "run", minimum=1)
    eval_every: int = option(0, "Eval loss every N updates; 0: before and after only.", "run", minimum=0)
    save_every: int = option(0, "Checkpoint every N updates; 0: at the end only.", "run", minimum=0)
    keep_last: int = option(0, "Checkpoints kept; 0 keeps every one.", "run", minimum=0)
    log_to: tuple[str, ...] = option((), "Loggers besides OUT/metrics.jsonl, comma-separated: tensorboard, "
                                     "wandb, or a logger plugin's name.", "run")
    resume: str | None = option(None, "auto (newest complete checkpoint of --out), or a checkpoint folder.", "run")
    overwrite: bool = option(False, "Start over in an --out that holds another run: its files move to "
                             "OUT/previous-<time>/ first (nothing is deleted).", "run")
    on_nonfinite: str = option("stop", "A NaN/inf loss stops the run (keeping the last checkpoint) or skips "
                               "the update.", "run", choices=ON_NONFINITE)
    sample_prompt: str | None = option(None, "Prompt answered before and after training (default: the first "
                                       "eval record's).", "run")

    def __post_init__(self):
        self.lora_targets = hf_targets(self.lora_targets)  # the fused names (qkv) as the HF projections
        self.log_to = tuple(dict.fromkeys(self.log_to))  # a logger named twice opens once
        self.field_map = parse_field_map(self.field_map)
        if self.eval_data == "auto":
            bundled = Path(self.data) == DEFAULT_DATA and not self.eval_split
            self.eval_data = str(DEFAULT_EVAL) if bundled else None
        for f in fields(self):
            _check_field(f, getattr(self, f.name))
        if not self.lr > 0:
            raise SftplugError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SftplugError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise SftplugError(f"--router-aux-loss-coef must be 0 or more, got {self.router_aux_loss_coef}")
        if not 0 <= self.lora_dropout < 1:
            raise SftplugError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.eval_split < 1:
            raise SftplugError(f"--eval-split must be a fraction in [0, 1), got {self.eval_split}")
        if self.eval_split and self.eval_data:
            raise SftplugError("use --eval-split or --eval-data, not both")
        parse_fused(self.fused)
        if self.adapter and self.full:
            raise SftplugError("--adapter continues a LoRA adapter; it cannot be combined with --full")
        if self.train_router and self.full:
            raise SftplugError("--train-router trains the routers beside LoRA adapters; --full trains them already")
        if self.quantize != "none" and self.full:
            raise SftplugError(f"--quantize {self.quantize} keeps the frozen base quantized under LoRA adapters "
                               "(QLoRA); it cannot be combined with --full")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        d["log_to"] = list(self.log_to)
        return d


def flag(name: str) -> str:
    """The command-line spelling of a field: ``micro_bsz`` -> ``--micro-bsz``."""
    return "--" + name.replace("_", "-")


def parse_field_map(value) -> dict[str, str] | None:
    """``--field-map``: "question=prompt,answer=completion" or a mapping -> {field in the file: field sftplug reads}."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        pairs = [p.strip() for p in value.split(",") if p.strip()]
        if not all(p.count("=") == 1 for p in pairs):
            raise SftplugError(f"--field-map {value}: expected FIELD=NAME pairs separated by commas, "
                               "e.g. question=prompt,answer=completion")
        value = dict(tuple(x.strip() for x in p.split("=")) for p in pairs)
    if not isinstance(value, dict):
        raise SftplugError(f"--field-map must map fields of the file to names sftplug reads, got {value!r}")
    for source, target in value.items():
        if not (isinstance(source, str) and isinstance(target, str) and source and target):
            raise SftplugError(f"--field-map {source}={target}: both names must be non-empty strings")
    targets = list(value.values())
    if len(set(targets)) != len(targets):
        raise SftplugError(f"--field-map maps two fields to the same name: {value}")
    return dict(value)


def _check_field(f, value) -> None:
    choices, minimum = f.metadata["choices"], f.metadata["minimum"]
    if choices and value not in choices:
        allowed = f"{choices[0]} or {choices[1]}" if len(choices) == 2 else f"one of {', '.join(choices)}"
        raise SftplugError(f"{flag(f.name)} must be {allowed}, got {value!r}")
    if minimum == 0 and value < 0:
        raise SftplugError(f"{flag(f.name)} must not be negative")
    if minimum is not None and value < minimum:
        raise SftplugError(f"{flag(f.name)} must be at least {minimum}, got {value}")


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
