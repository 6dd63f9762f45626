"""MXFP4 experts (gpt-oss checkpoints) dequantised while they are read.

gpt-oss stores each stacked expert projection ``...experts.gate_up_proj`` as two uint8 tensors:
``..._blocks`` [experts, rows, groups, 16], two fp4 (e2m1) values a byte, low nibble first, and
``..._scales`` [experts, rows, groups], one e8m0 exponent (biased by 127) per group of 32 values.
Row r of expert e holds column r of the dense parameter: gate_up_proj [E, hidden, 2·inter] is
stored as rows of 2·inter, down_proj [E, inter, hidden] as rows of hidden.

The values are exactly transformers' (integrations/mxfp4.py, convert_moe_packed_tensors):
the same fp4 values in the target dtype, scaled by the same ``torch.ldexp``. The dense tensor is
computed a few rows at a time straight into its destination, so a load holds at most one chunk
of blocks and values beside the model.
"""

from __future__ import annotations

import torch

from sftplug.errors import SftplugError
from sftplug.hf.weights import TensorEntry, WeightFiles, read_into

BLOCKS, SCALES = "_blocks", "_scales"
VALUES_PER_BYTE, GROUP = 2, 32  # e2m1 values a byte; values sharing one e8m0 exponent
E8M0_BIAS = 127
# e2m1: the 3 low bits of a nibble pick the magnitude, its high bit is the sign
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
CHUNK_BYTES = 16 * 2**20  # dequantised values computed at a time
PAIR_AS_INTEGER = {2: torch.int32, 4: torch.int64}  # a float's itemsize -> the integer holding two of them
DENSE_DTYPE = torch.bfloat16  # what the checkpoint's dense tensors are (its biases): the entry's nominal dtype


def mxfp4_tensor_names(name: str) -> tuple[str, str]:
    """The stored (blocks, scales) names of the HF parameter ``name``, e.g. ``...experts.gate_up_proj``."""
    return name + BLOCKS, name + SCALES


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense [experts, groups·32, rows] tensor of MXFP4 ``blocks`` and ``scales``, on their device."""
    shape = dense_shape(tuple(blocks.shape), blocks.dtype, tuple(scales.shape), scales.dtype, "blocks", "scales")
    out = torch.empty(shape, dtype=dtype, device=blocks.device)

    def rows(e: int, start: int, end: int):
        return blocks[e, start:end], scales[e, start:end]

    _fill(out, rows)
    return out


def dense_shape(blocks_shape: tuple, blocks_dtype, scales_shape: tuple, scales_dtype, blocks_name: str,
                scales_name: str) -> tuple[int, int, int]:
    """[experts, groups·32, rows]; anything but uint8 blocks [E, R, G, 16] and scales [E, R, G] is refused."""
    bytes_per_group = GROUP // VALUES_PER_BYTE
    if (len(blocks_shape) != 4 or blocks_shape[-1] != bytes_per_group or scales_shape != blocks_shape[:3]
            or blocks_dtype != torch.uint8 or scales_dtype != torch.uint8):
        raise SftplugError(
            f"'{blocks_name}' {list(blocks_shape)} {blocks_dtype} and '{scales_name}' {list(scales_shape)} "
            f"{scales_dtype} are not MXFP4 blocks [experts, rows, groups, {bytes_per_group}] and scales "
            "[experts, rows, groups], both uint8"
        )
    experts, rows, groups, _ = blocks_shape
    return experts, groups * GROUP, rows


def dequantized_weights(weights: WeightFiles, quantization: dict | None) -> WeightFiles:
    """``weights`` as the loader reads them: with an MXFP4 ``quantization_config``, each blocks and
    scales pair becomes one entry under the plain name, dequantised into whatever it is read into.

    Any other quantization is refused: sftplug loads full-precision weights.
    """
    if not quantization:
        return weights
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method != "mxfp4":
        raise SftplugError(f"{weights.folder}: config.json's quantization_config (quant_method {method!r}) is not "
                           "supported; sftplug loads full-precision weights, and gpt-oss's mxfp4 experts")
    entries = {}
    for key, entry in weights.entries.items():
        name = key.removesuffix(BLOCKS).removesuffix(SCALES)
        if name == key:
            entries[key] = entry
            continue
        blocks_key, scales_key = mxfp4_tensor_names(name)
        if blocks_key not in weights.entries or scales_key not in weights.entries:
            raise SftplugError(f"{weights.folder}: '{key}' has no '{scales_key if key == blocks_key else blocks_key}' "
                               f"(not in {weights.where}); MXFP4 tensors come in pairs")
        if key == blocks_key:
            entries[name] = mxfp4_entry(name, weights.entries[blocks_key], weights.entries[scales_key])
    return WeightFiles(weights.folder, weights.files, weights.where, entries)


def mxfp4_entry(name: str, blocks: TensorEntry, scales: TensorEntry) -> TensorEntry:
    """The dense tensor ``name`` as an entry of blocks' file, filled by dequantising as it is read."""
    where = blocks.file.parent
    try:
        shape = dense_shape(blocks.shape, blocks.dtype, scales.shape, scales.dtype, blocks.key, scales.key)
    except SftplugError as exc:
        raise SftplugError(f"{where}: {exc}") from None

    def fill(dest: torch.Tensor, handle=None) -> None:
        def rows(e: int, start: int, end: int):
            return tuple(_read_rows(part, e, start, end, handle if part.file == blocks.file else None)
                         for part in (blocks, scales))

        _fill(dest.view(shape), rows)

    return TensorEntry(name, blocks.file, DENSE_DTYPE, shape, offset=blocks.offset, fill=fill)


def _read_rows(part: TensorEntry, expert: int, start: int, end: int, handle) -> torch.Tensor:
    """Rows [start, end) of one expert of a stored uint8 tensor, read alone."""
    if part.tensor is not None:  # an opt-in .bin file, already in memory
        return part.tensor[expert, start:end]
    row_bytes = 1
    for d in part.shape[2:]:
        row_bytes *= d
    first = expert * part.shape[1] + start
    piece = TensorEntry(part.key, part.file, torch.uint8, (end - start, *part.shape[2:]),
                        offset=part.offset + first * row_bytes)
    out = torch.empty(piece.shape, dtype=torch.uint8)
    read_into(piece, out, handle)
    return out


def _fill(out: torch.Tensor, rows) -> None:
    """Dequantise into ``out`` [E, groups·32, rows] chunk by chunk; ``rows(e, start, end)`` gives
    those rows' (blocks, scales)."""
    experts, width, n_rows = out.shape
    step = max(1, CHUNK_BYTES // (width * out.element_size()))
    table = _byte_values(out.dtype, out.device)
    with torch.no_grad():
        for e in range(experts):
            for start in range(0, n_rows, step):
                end = min(start + step, n_rows)
                blocks, scales = rows(e, start, end)
                values = _dequantize_rows(blocks.to(out.device), scales.to(out.device), table)
                out[e, :, start:end].copy_(values.T)  # row r of the file is column r of the parameter


def _byte_values(dtype: torch.dtype, device) -> torch.Tensor:
    """[256, 2]: each byte's two fp4 values, its low nibble's first (exact in every float dtype)."""
    nibble = torch.tensor(FP4_MAGNITUDES + tuple(-m for m in FP4_MAGNITUDES), dtype=dtype, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack((nibble[byte & 0x0F], nibble[byte >> 4]), dim=-1)


def _dequantize_rows(blocks: torch.Tensor, scales: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """blocks [r, G, 16] and scales [r, G] -> values [r, G·32]: fp4 value times 2^(scale - 127)."""
    r, groups, _ = blocks.shape
    pair = PAIR_AS_INTEGER.get(table.element_size())
    if pair is None:  # float64: gather the pairs as they are
        values = table[blocks.to(torch.int32)]
    else:  # each byte's pair as one integer: one 1-D gather, about 3x faster than the 2-D one
        values = table.view(pair).view(256).index_select(0, blocks.reshape(-1).to(torch.int32)).view(table.dtype)
    values = values.view(r * groups, GROUP)
    exponents = scales.to(torch.int32).view(r * groups, 1) - E8M0_BIAS
    torch.ldexp(values, exponents, out=values)  # as transformers scales them: the same rounding
    return values.view(r, groups * GROUP)
