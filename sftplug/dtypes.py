"""Dtypes, one vocabulary: the name a user types, the torch dtype, HF's and safetensors' names.

``bf16``, ``fp16`` and ``fp32`` are the names sftplug speaks everywhere (``--dtype``, the
run header, ``sftplug doctor``, error messages). config.json files say ``bfloat16`` (or
``torch.bfloat16``); safetensors headers say ``BF16``. :func:`as_dtype` reads any of them.
"""

from __future__ import annotations

import torch

# What --dtype takes, in the order sftplug lists them.
TRAINING = ("bf16", "fp16", "fp32")
BY_NAME = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
NAMES = {dtype: name for name, dtype in BY_NAME.items()}
HF_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
# Other spellings config.json files and users write.
ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
# The dtype codes of a safetensors header.
SAFETENSORS = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def as_dtype(value) -> torch.dtype | None:
    """A torch dtype from a torch dtype, "bf16", "bfloat16", "torch.bfloat16" or None.

    Only the training dtypes are accepted by name; anything else raises SftplugError.
    """
    from sftplug.errors import SftplugError

    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    name = ALIASES.get(name, name)
    if name not in TRAINING:
        raise SftplugError(f"dtype {value!r} is not supported; use one of {', '.join(TRAINING)}")
    return BY_NAME[name]


def dtype_name(dtype: torch.dtype) -> str:
    """sftplug's name of a dtype: "bf16"; torch's own for dtypes sftplug has no name for."""
    return NAMES.get(dtype, str(dtype).removeprefix("torch."))


def hf_dtype_name(dtype: torch.dtype) -> str:
    """The name config.json uses: "bfloat16"."""
    return HF_NAMES[dtype]
