"""What this torch wheel, CUDA and GPU can do: every capability check lives here.

Plugins ask these before they register, so a plugin that cannot run is listed with
why it is unavailable instead of failing at import or, worse, silently falling back.

The SDPA probes ask PyTorch itself: :func:`sdpa_why_unavailable` runs a tiny forward *and*
backward with only one kernel enabled (``sdpa_kernel([backend])``), so the answer is
what really runs, not what a table says; when PyTorch refuses, it says why in its own
words (the ``can_use_*_attention(SDPAParams, debug=True)`` warnings on CUDA).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import warnings

import torch

from sftplug.dtypes import dtype_name

# -- versions and devices ------------------------------------------------------------


def cuda_available() -> bool:
    return torch.cuda.is_available()


def cuda_version() -> str | None:
    """The CUDA version this wheel was built for (None for a CPU or ROCm wheel)."""
    return torch.version.cuda


def hip_version() -> str | None:
    return getattr(torch.version, "hip", None)


def gpu_capability() -> tuple[int, int] | None:
    if not cuda_available():
        return None
    return torch.cuda.get_device_capability()


def gpu_name() -> str | None:
    return torch.cuda.get_device_name() if cuda_available() else None


def cudnn_version() -> int | None:
    return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None


def cudnn_version_text() -> str | None:
    """cuDNN's version as 'major.minor.patch' (9.10.2 for 91002), or None."""
    v = cudnn_version()
    if v is None:
        return None
    major, rest = divmod(v, 10000) if v >= 90000 else divmod(v, 1000)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


def cpu_capability() -> str:
    """The SIMD level PyTorch's CPU kernels use here (AVX512, AVX2, DEFAULT...)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        return "unknown"


@functools.cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


BITSANDBYTES_INSTALL = "pip install 'sftplug[quantize]' (bitsandbytes)"


def bitsandbytes_version() -> str | None:
    """The installed bitsandbytes' version, read from its metadata (importing it costs memory)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None


def import_bitsandbytes(what: str):
    """bitsandbytes, or an SftplugError saying that ``what`` (an option) needs it and how to install it."""
    from sftplug.errors import SftplugError

    try:
        import bitsandbytes
    except ImportError:
        raise SftplugError(f"{what} needs bitsandbytes: {BITSANDBYTES_INSTALL}") from None
    return bitsandbytes


@functools.cache
def triton_version() -> str | None:
    if not module_available("triton"):
        return None
    try:
        import triton
    except Exception:  # a broken triton install must not break the probes
        return None
    return triton.__version__


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


def resolve_device(name: str) -> torch.device:
    """``--device``: auto (the GPU if there is one), cpu, cuda or cuda:N; one line when it cannot be."""
    from sftplug.errors import SftplugError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SftplugError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SftplugError(f"--device {name}: no CUDA GPU is visible to this torch build; use --device cpu")
    return device


def why_no_gpu() -> str:
    """Why there is no CUDA GPU to run on, in the words a user can act on."""
    if cuda_version() is None and hip_version() is None:
        return f"this torch build is CPU-only (torch {torch.__version__})"
    return f"no CUDA GPU is visible (torch {torch.__version__}; torch.cuda.is_available() is False)"


# -- SDPA kernels ----------------------------------------------------------------------


def sdpa_backends() -> dict:
    """sftplug's names for PyTorch's SDPA kernels."""
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }


def flash_built() -> bool:
    """Whether this torch build has the CUDA flash-attention kernel compiled in."""
    return bool(getattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)())


def flash_impl() -> str:
    """Which flash implementation SDPA's flash kernel dispatches to (FA3/FA4 if activated)."""
    try:
        from torch.nn.attention import current_flash_attention_impl

        return current_flash_attention_impl() or "built-in"
    except ImportError:  # torch < 2.10
        return "built-in"


def sdpa_global_flags() -> dict[str, bool]:
    """PyTorch's process-wide SDPA switches (``torch.backends.cuda.enable_*_sdp``).

    Code may turn these off behind a trainer's back; sftplug's SDPA backends run inside
    ``sdpa_kernel([one])``, which overrides them for the duration of each call.
    """
    c = torch.backends.cuda
    flags = {
        "flash": c.flash_sdp_enabled(),
        "efficient": c.mem_efficient_sdp_enabled(),
        "math": c.math_sdp_enabled(),
    }
    if hasattr(c, "cudnn_sdp_enabled"):
        flags["cudnn"] = c.cudnn_sdp_enabled()
    return flags


@functools.cache
def sdpa_why_unavailable(
    backend: str, device_type: str, dtype: torch.dtype, head_dim: int, gqa: bool = False, causal: bool = True
) -> str | None:
    """Run a tiny forward+backward in one SDPA kernel alone: None if it ran, else why not.

    Why not is said in PyTorch's own words (the ``... not used because`` warnings it emits,
    or the error). Safe to call anywhere: it uses its own random generator (the run's RNG stream
    is untouched) and runs with autograd on and autocast off, whatever the caller's mode.
    """
    from torch.nn.attention import sdpa_kernel

    kernel = sdpa_backends()[backend]
    if device_type == "cuda" and not cuda_available():
        return why_no_gpu()
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
        return _run_probe(kernel, device_type, dtype, head_dim, gqa, causal, sdpa_kernel)


def _run_probe(kernel, device_type, dtype, head_dim, gqa, causal, sdpa_kernel) -> str | None:
    h_kv = 1 if gqa else 2
    shape_q, shape_kv = (1, 2, 64, head_dim), (1, h_kv, 64, head_dim)
    try:
        gen = torch.Generator(device=device_type).manual_seed(0)
        q, k, v = (
            torch.randn(shape, device=device_type, generator=gen).to(dtype).requires_grad_()
            for shape in (shape_q, shape_kv, shape_kv)
        )
    except (RuntimeError, TypeError) as exc:
        return f"cannot make {dtype_name(dtype)} tensors on {device_type}: {_first_line(exc)}"
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel([kernel]):
        warnings.simplefilter("always")
        try:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
            out.sum().backward()
            if device_type == "cuda":
                torch.cuda.synchronize()
        except (RuntimeError, NotImplementedError) as exc:
            return "; ".join(_why_unavailable_lines(caught)) or _first_line(exc)
    return None


# Lengths at which cuDNN's SM90 backward was reported to give NaNs or wrong gradients.
PARITY_LENGTHS = (704, 1000, 2048)


@functools.cache
def sdpa_parity(backend: str, reference: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when ``backend`` gives ``reference``'s output and gradients on this GPU, else where not.

    Causal GQA at :data:`PARITY_LENGTHS` and once with large logits (scores near +-60),
    each kernel run alone. Agreement: within 16 roundings of the dtype, relative to the
    largest value, and finite.
    """
    from torch.nn.attention import sdpa_kernel

    if not cuda_available():
        return why_no_gpu()
    kernels = sdpa_backends()
    tolerance = 16 * torch.finfo(dtype).eps
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = [(T, 1.0) for T in PARITY_LENGTHS] + [(1000, 8.0)]
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cuda", enabled=False):
        for T, spread in cases:
            q, k, v, do = (torch.randn(1, h, T, head_dim, device="cuda", generator=gen) for h in (8, 2, 2, 8))
            q, k = q * spread, k * spread
            results = []
            for name in (backend, reference):
                x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
                try:
                    with sdpa_kernel([kernels[name]]):
                        out = torch.nn.functional.scaled_dot_product_attention(*x, is_causal=True, enable_gqa=True)
                        results.append([out, *torch.autograd.grad(out, x, do.to(dtype))])
                except RuntimeError as exc:
                    return f"{name} cannot run the parity case T={T}: {_first_line(exc)}"
            for what, a, b in zip(("output", "dq", "dk", "dv"), *results):
                error = float((a.float() - b.float()).abs().max() / b.float().abs().max())
                if not error <= tolerance:  # NaN fails too
                    return f"{backend} differs from {reference} at T={T} (scale {spread:g}): {what} off by {error:.1e}"
    return None


def sdpa_can_use(backend: str, q, k, v, *, causal: bool = True, gqa: bool = False) -> tuple[bool, list[str]]:
    """PyTorch's ``can_use_*_attention(SDPAParams, debug=True)`` for CUDA tensors: (ok, why not, line by line).

    These are PyTorch's own dispatch checks (dtype, head dim, GPU architecture, strides,
    GQA...), answered without running a kernel. CPU tensors and the math kernel have no
    such check here: (True, []) means "ask by running it" (:func:`sdpa_why_unavailable`).
    """
    from torch.backends import cuda

    check = {
        "flash": getattr(cuda, "can_use_flash_attention", None),
        "efficient": getattr(cuda, "can_use_efficient_attention", None),
        "cudnn": getattr(cuda, "can_use_cudnn_attention", None),
    }.get(backend)
    params_type = getattr(cuda, "SDPAParams", None)
    if check is None or params_type is None or q.device.type != "cuda":
        return True, []
    try:
        params = params_type(q, k, v, None, 0.0, causal, gqa)
    except TypeError:  # torch < 2.5: no enable_gqa argument
        params = params_type(q, k, v, None, 0.0, causal)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = bool(check(params, True))
    return ok, _why_unavailable_lines(caught)


def _why_unavailable_lines(caught) -> list[str]:
    """PyTorch's lines saying why a kernel is unavailable, from caught warnings, without the
    'X not used because:' headers."""
    lines = []
    for w in caught:
        text = str(w.message).strip()
        line = text.split("\n")[0].strip()
        if not line or line.endswith("because:") or "not used because" in line:
            continue
        # C++ warnings carry a source location after the text: keep the text only.
        line = line.split(" (Triggered internally at")[0].strip()
        if line not in lines:
            lines.append(line)
    return lines


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().split("\n")[0]
