import pytest
import torch

from sftplug import dtypes
from sftplug.errors import SftplugError


@pytest.mark.parametrize(
    "spelling, dtype",
    [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
     ("fp16", torch.float16), ("half", torch.float16), ("float16", torch.float16),
     ("fp32", torch.float32), ("float", torch.float32), ("torch.float32", torch.float32),
     (torch.float16, torch.float16), (None, None)],
)
def test_every_spelling_reads_as_one_dtype(spelling, dtype):
    assert dtypes.as_dtype(spelling) is dtype


def test_one_name_per_dtype_in_each_vocabulary():
    for name in dtypes.TRAINING:
        dtype = dtypes.as_dtype(name)
        assert dtypes.dtype_name(dtype) == name
        assert dtypes.as_dtype(dtypes.hf_dtype_name(dtype)) is dtype  # config.json's name reads back
    assert dtypes.dtype_name(torch.float64) == "fp64" and dtypes.dtype_name(torch.int8) == "int8"
    assert dtypes.SAFETENSORS["BF16"] is torch.bfloat16


def test_an_unsupported_dtype_names_the_choices():
    with pytest.raises(SftplugError, match=r"dtype 'fp8' is not supported; use one of bf16, fp16, fp32"):
        dtypes.as_dtype("fp8")
