"""`sftplug doctor`: what this machine can run, and what is steering it.

:func:`doctor_report` gathers versions (torch, CUDA, cuDNN, Triton), the GPU and its
compute capability, which attention backends run bf16, fp16 and fp32 here (and why not,
in PyTorch's words, for each that does not), what ``auto`` would pick per dtype, which
linear-attention backends run Qwen3.5's Gated DeltaNet shape per dtype, and the
environment variables and global SDPA switches that try to steer attention kernels.
:func:`format_doctor` renders it for people; the dict itself is the ``--json`` output, whose
keys scripts read (its "reason" and "no_gpu_reason" say why something is unavailable).
"""

from __future__ import annotations

import platform

import torch

from sftplug import __version__, probes
from sftplug.attention import AttentionRequest
from sftplug.attention.choice import attention_skipped, choose_from, steering_env, survey
from sftplug.dtypes import BY_NAME, TRAINING
from sftplug.errors import SftplugError
from sftplug.linear_attention import choice as linear_choice
from sftplug.linear_attention.backend import LinearAttentionRequest


def doctor_report(registry, device: torch.device | str | None = None, head_dim: int = 64,
                  n_heads: int = 32, n_kv_heads: int = 4) -> dict:
    """Everything `sftplug doctor` shows, as plain JSON-ready data.

    :param registry: a built :class:`sftplug.registry.Registry` (built-ins + entry points).
    :param device: the device to judge attention for; default the GPU if any, else the CPU.
    :param head_dim, n_heads, n_kv_heads: the attention shape asked about (default: the
        TinyLlama / W1 shape, 32 query heads sharing 4 K/V heads, head dim 64).
    """
    device = torch.device(device) if device is not None else _default_device()
    gpu = None
    if probes.cuda_available():
        props = torch.cuda.get_device_properties(0)
        major, minor = probes.gpu_capability()
        gpu = {
            "name": props.name,
            "capability": f"{major}.{minor}",
            "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
    report = {
        "sftplug": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "cuda": probes.cuda_version(),
        "hip": probes.hip_version(),
        "cudnn": probes.cudnn_version_text(),
        "triton": probes.triton_version(),
        "triton_interpreter": probes.triton_interpreter(),
        "bitsandbytes": probes.bitsandbytes_version(),
        "device": str(device),
        "gpu": gpu,
        "no_gpu_reason": None if gpu else probes.why_no_gpu(),
        "cpu": {"name": probes.cpu_name(), "capability": probes.cpu_capability(), "threads": torch.get_num_threads()},
        "flash_compiled": probes.flash_built(),
        "flash_impl": probes.flash_impl(),
        "shape": {"head_dim": head_dim, "n_heads": n_heads, "n_kv_heads": n_kv_heads},
        "attention": _attention_rows(registry, device, head_dim, n_heads, n_kv_heads),
        "auto": _auto_picks(registry, device, head_dim, n_heads, n_kv_heads),
        "linear_attention": _linear_attention_rows(registry, device),
        "environment": steering_env(),
        "sdpa_global_flags": probes.sdpa_global_flags(),
    }
    return report


def _default_device() -> torch.device:
    return torch.device("cuda") if probes.cuda_available() else torch.device("cpu")


def _request(device, dtype_name, head_dim, n_heads, n_kv_heads, packed=False) -> AttentionRequest:
    return AttentionRequest("auto", device, BY_NAME[dtype_name], head_dim, n_heads, n_kv_heads, packed)


def _attention_rows(registry, device, head_dim, n_heads, n_kv_heads) -> list[dict]:
    answers = {d: {o.name: o for o in survey(registry.hook, _request(device, d, head_dim, n_heads, n_kv_heads))}
               for d in TRAINING}
    infos = {p.name: p for p in registry.plugins}
    rows = []
    for offer in answers["fp32"].values():  # in fp32's order of priority
        dtypes = {d: answers[d][offer.name].why_unavailable if offer.name in answers[d] else f"not offered for {d}"
                  for d in TRAINING}  # dtype -> None (runs) or why it is unavailable
        working = [BY_NAME[d] for d, why_unavailable in dtypes.items() if why_unavailable is None]
        gqa = None
        if working and hasattr(offer.backend, "gqa_mode"):
            gqa = offer.backend.gqa_mode(device, working[0], head_dim)
        info = infos.get(offer.name)
        rows.append({
            "name": offer.name,
            "source": info.source if info else "?",
            "available": True,
            "reason": "",
            "description": offer.backend.description,
            "priority": offer.priority,
            "dtypes": dtypes,
            "gqa": gqa,  # "native" (no K/V copies), "repeat", or None (unknown / nothing runs)
            "packed": bool(getattr(offer.backend, "packed_documents", True)),
        })
    for name, why_unavailable in attention_skipped(registry).items():
        info = infos.get(name)
        rows.append({
            "name": name,
            "source": info.source if info else "?",
            "available": False,
            "reason": why_unavailable,
            "description": "",
            "priority": None,
            "dtypes": {n: why_unavailable for n in TRAINING},
            "gqa": None,
            "packed": None,
        })
    return rows


def _auto_picks(registry, device, head_dim, n_heads, n_kv_heads) -> dict:
    picks = {}
    skipped = attention_skipped(registry)
    for name in TRAINING:
        for packed in (False, True):
            key = f"{name} packed" if packed else name
            request = _request(device, name, head_dim, n_heads, n_kv_heads, packed)
            offers = survey(registry.hook, request)
            order = [o.name for o in offers if o.why_unavailable is None]
            try:
                choice = choose_from(offers, request, skipped)
                picks[key] = {"backend": choice.backend.name, "order": order, "reason": choice.why_chosen}
            except SftplugError as exc:
                picks[key] = {"backend": None, "order": order, "reason": str(exc)}
    return picks


LINEAR_SHAPE = (16, 32, 128, 128)  # Qwen3.5's Gated DeltaNet: q/k heads, value heads, their dims


def _linear_attention_rows(registry, device) -> list[dict]:
    """Each linear-attention backend for Qwen3.5's shape per dtype (None: runs), or why its plugin is skipped."""
    answers = {d: {o.name: o.why_unavailable for o in linear_choice.survey(
        registry.hook, LinearAttentionRequest("auto", device, BY_NAME[d], *LINEAR_SHAPE))} for d in TRAINING}
    rows = [{"name": name, "available": True, "reason": "",
             "dtypes": {d: answers[d].get(name, f"not offered for {d}") for d in TRAINING}} for name in answers["fp32"]]
    for name, why_unavailable in linear_choice.linear_attention_skipped(registry).items():
        rows.append({"name": name, "available": False, "reason": why_unavailable,
                     "dtypes": {d: why_unavailable for d in TRAINING}})
    return rows


def format_doctor(report: dict) -> str:
    """The human-readable doctor report (what `sftplug doctor` prints without --json)."""
    # What this machine has, then what attention can run on it, then what tries to steer that.
    lines = _machine_lines(report)
    lines += ["", *_attention_lines(report)]
    lines += ["", *_linear_attention_lines(report)]
    lines += ["", *_steering_lines(report)]
    return "\n".join(lines)


def _machine_lines(r: dict) -> list[str]:
    """Versions, the GPU (or why there is none), bitsandbytes, the CPU and flash attention."""
    lines = [
        f"sftplug {r['sftplug']}  python {r['python']}  {r['platform']}",
        f"torch {r['torch']}  CUDA {r['cuda'] or '-'}"
        + (f"  ROCm {r['hip']}" if r.get("hip") else "")
        + f"  cuDNN {r['cudnn'] or '-'}  triton {r['triton'] or '-'}"
        + ("  (TRITON_INTERPRET=1: Triton kernels run in the CPU interpreter)" if r["triton_interpreter"] else ""),
    ]
    if r["gpu"]:
        g = r["gpu"]
        count = f" x{g['count']}" if g["count"] > 1 else ""
        lines.append(f"GPU: {g['name']}{count}, compute capability {g['capability']}, {g['memory_gib']} GiB")
    else:
        lines.append(f"GPU: none; {r['no_gpu_reason']}")
    bnb = r["bitsandbytes"]
    if bnb:
        lines.append(f"bitsandbytes {bnb}: for --quantize nf4|fp4 and --optimizer adamw8bit (paged ones on a GPU)")
    else:
        lines.append(f"bitsandbytes: not installed; --quantize and the 8-bit / paged optimizers need it "
                     f"({probes.BITSANDBYTES_INSTALL})")
    cpu = r["cpu"]
    lines.append(f"CPU: {cpu['name']} ({cpu['capability']}, {cpu['threads']} threads)")
    impl = "" if r["flash_impl"] == "built-in" else f", flash implementation: {r['flash_impl']}"
    lines.append(f"CUDA flash attention compiled into this torch: {'yes' if r['flash_compiled'] else 'no'}{impl}")
    return lines


def _attention_lines(r: dict) -> list[str]:
    """A row per backend (a cell per dtype), why each 'no' is one, and what auto picks."""
    s = r["shape"]
    lines = [f"attention on {r['device']} (head dim {s['head_dim']}, {s['n_heads']}/{s['n_kv_heads']} heads):"]
    width = max([len(a["name"]) for a in r["attention"]] + [7])
    lines.append(f"  {'backend':<{width}}  " + "  ".join(f"{d:<4}" for d in TRAINING) + "  gqa     packed  source")
    why_not_lines = []
    for a in r["attention"]:
        if not a["available"]:
            lines.append(f"  {a['name']:<{width}}  unavailable: {a['reason']}")
            continue
        cells = "  ".join(f"{'ok' if a['dtypes'][d] is None else 'no':<4}" for d in TRAINING)
        gqa = a["gqa"] or "-"
        packed = "yes" if a["packed"] else "no"
        lines.append(f"  {a['name']:<{width}}  {cells}  {gqa:<7} {packed:<7} {a['source']}")
        why_not_lines += [f"  {a['name']} {d}: {a['dtypes'][d]}" for d in TRAINING if a["dtypes"][d] is not None]
    if why_not_lines:
        lines += ["why not:"] + why_not_lines
    lines.append("auto picks:")
    for key, pick in r["auto"].items():
        if pick["backend"]:
            lines.append(f"  {key:<11} {pick['backend']:<10} (usable, fastest first: {' > '.join(pick['order'])})")
        else:
            lines.append(f"  {key:<11} nothing: {pick['reason']}")
    return lines


def _linear_attention_lines(r: dict) -> list[str]:
    """A row per linear-attention backend (a cell per dtype), and why each 'no' is one."""
    lines = [f"linear attention on {r['device']} (Gated DeltaNet, {LINEAR_SHAPE[0]}/{LINEAR_SHAPE[1]} heads of "
             f"{LINEAR_SHAPE[2]}/{LINEAR_SHAPE[3]}):"]
    width = max([len(a["name"]) for a in r["linear_attention"]] + [7])
    lines.append(f"  {'backend':<{width}}  " + "  ".join(f"{d:<4}" for d in TRAINING))
    why_not = []
    for a in r["linear_attention"]:
        if not a["available"]:
            lines.append(f"  {a['name']:<{width}}  unavailable: {a['reason']}")
            continue
        cells = "  ".join(f"{'ok' if a['dtypes'][d] is None else 'no':<4}" for d in TRAINING)
        lines.append(f"  {a['name']:<{width}}  {cells}")
        why_not += [f"  {a['name']} {d}: {a['dtypes'][d]}" for d in TRAINING if a["dtypes"][d] is not None]
    return lines + (["why not:"] + why_not if why_not else [])


def _steering_lines(r: dict) -> list[str]:
    """Environment variables and global SDPA switches that try to steer attention (every call overrides them)."""
    if r["environment"]:
        lines = ["environment overrides found (ignored: every call runs in sdpa_kernel([chosen backend])):"]
        lines += [f"  {k}={v}" for k, v in r["environment"].items()]
    else:
        lines = ["environment overrides: none found"]
    off = [name for name, on in r["sdpa_global_flags"].items() if not on]
    if off:
        lines.append(
            f"global SDPA switches turned off in this process: {', '.join(off)} "
            "(overridden per call by sdpa_kernel)"
        )
    return lines
