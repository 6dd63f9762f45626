"""Built-in precision plugin: bf16 and fp16 autocast, GradScaler for fp16 only, TF32."""

from __future__ import annotations

import torch

from sftplug import hookimpl, probes
from sftplug.errors import SftplugError
from sftplug.train.precision import PrecisionPolicy


class Precision:
    @hookimpl(trylast=True)
    def configure_precision(self, dtype, device, tf32):
        if dtype == "bf16":
            if not probes.bf16_supported(device):
                raise SftplugError("--dtype bf16: this GPU has no bf16 support; use --dtype fp16")
            return PrecisionPolicy("bf16", torch.bfloat16, None)
        if dtype == "fp16":
            return PrecisionPolicy("fp16", torch.float16, torch.amp.GradScaler(device.type))
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.set_float32_matmul_precision("high")
        return PrecisionPolicy("fp32", None, None, tf32=tf32)

    @hookimpl
    def resume_state(self, run):
        if run.precision.scaler is not None:
            return {"precision.scaler": run.precision.scaler.state_dict()}
        return None

    @hookimpl
    def on_resume(self, run, state):
        saved = state.get("precision.scaler")
        if run.precision.scaler is not None and saved:
            run.precision.scaler.load_state_dict(saved)


precision = Precision()
