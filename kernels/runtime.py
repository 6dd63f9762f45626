"""What every Triton kernel module asks of the machine: Triton itself, the interpreter or a GPU.

Importing this module never fails: the trainer probes the kernels on any machine, so
``triton`` and ``tl`` are None where Triton does not import, and :data:`IMPORT_ERROR` says
why. Kernel modules take ``triton`` and ``tl`` from here and define their kernels only
when ``triton is not None``.

@triton.jit picks interpreter or compiler when it decorates: for a module's kernels when
that module is imported, for Triton's own library functions (tl.cdiv, tl.sigmoid ...) when
triton is first imported. Both must match the mode the kernels run in, so each kernel
module keeps :func:`interpreted` of one of its kernels and passes it to the checks here.

Public API: ``triton``, ``tl``, :data:`IMPORT_ERROR`, :func:`interpreting`,
:func:`interpreted`, :func:`library_interpreted`, :func:`triton_available`,
:func:`check_runnable`, :func:`check_cuda`, :func:`on_device`, :func:`sm_count`.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["IMPORT_ERROR", "check_cuda", "check_runnable", "interpreted", "interpreting", "library_interpreted",
           "on_device", "sm_count", "tl", "triton", "triton_available"]


def interpreting() -> bool:
    """Whether TRITON_INTERPRET=1 is set now."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreted(kernel) -> bool:
    """Whether @triton.jit made ``kernel`` for the interpreter (an interpreter object, not a JITFunction)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def library_interpreted() -> bool:
    """Whether Triton's own library functions run in the interpreter (decided when triton was first imported)."""
    return interpreted(tl.cdiv)


def triton_available(module: str | None = None, kernels_interpreted: bool | None = None) -> tuple[bool, str]:
    """Whether the kernels of ``module`` can run here, and why (or why not).

    ``kernels_interpreted``: :func:`interpreted` of the module's kernels. Without a module,
    the answer is for kernels a module imported now would define.
    """
    if triton is None:
        return False, f"triton is not importable ({IMPORT_ERROR})"
    if kernels_interpreted is None:
        kernels_interpreted = interpreting()
    if interpreting():
        if not (kernels_interpreted and library_interpreted()):
            imported = f"triton or {module}" if module else "triton"
            return False, f"TRITON_INTERPRET=1 was set after {imported} was imported; set it before the first import"
        return True, f"Triton {triton.__version__} interpreter on the CPU (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernel on the CPU for tests)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"GPU compute capability {major}.{minor} < 8.0 (needs Ampere or newer)"
    try:
        backend = triton.runtime.driver.active.get_current_target().backend
    except Exception as exc:  # pragma: no cover - needs a broken GPU setup
        return False, f"Triton has no usable GPU driver ({type(exc).__name__}: {exc})"
    if backend != "cuda":
        return False, f"Triton's active driver is {backend!r}, not 'cuda'"
    if kernels_interpreted or library_interpreted():
        return False, "triton was imported with TRITON_INTERPRET=1: its kernels run only in the interpreter"
    name = torch.cuda.get_device_name()
    return True, f"Triton {triton.__version__} on {name} (sm_{major}{minor})"


def check_runnable(what: str, module: str, kernels_interpreted: bool, x: torch.Tensor) -> None:
    """Raise unless ``what`` (the kernels of ``module``) can launch on ``x``: Triton imported, its
    library in the kernels' mode, and ``x`` on a CUDA GPU unless they run in the interpreter."""
    if triton is None:
        raise RuntimeError(f"{what} needs triton ({IMPORT_ERROR})")
    if kernels_interpreted != library_interpreted():
        raise RuntimeError(f"TRITON_INTERPRET=1 was set after triton or {module} was imported; "
                           "set it before the first import")
    check_cuda(what, kernels_interpreted, x)


def check_cuda(what: str, kernels_interpreted: bool, x: torch.Tensor) -> None:
    """Compiled kernels launch on CUDA tensors only; the interpreter runs them on the CPU."""
    if not kernels_interpreted and not x.is_cuda:
        raise ValueError(f"{what} needs CUDA tensors (got {x.device}); TRITON_INTERPRET=1 runs it on the CPU")


def on_device(x: torch.Tensor):
    """Launch on the tensor's GPU, not the current one."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the GPU (the current one for a device without an index)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]
