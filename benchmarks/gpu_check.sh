#!/usr/bin/env bash
# The prepared device run, for a bare GPU machine with its own torch (nothing is installed:
# sftplug runs from this checkout). Every step is independent, with its own time budget and
# its full log in $OUT; a failing step does not stop the others. About 6 minutes on an H200,
# cold compiles included; 10 minutes at the very most for the steps up to bench-step (their
# budgets' sum, 600 s), and 7 more for linear-attention's (120 s) and W1-MoE's (300 s): a device
# call limited to 10 minutes runs those two in a second call
# (GPU_CHECK_ONLY="linear-attention bench-step-moe"), or leaves them out of the first
# (GPU_CHECK_SKIP="linear-attention bench-step-moe").
# Without a GPU it runs the preflight and skips each GPU step with one line.
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sftplug-gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
rm -f "$OUT/skip"

# sftplug from this checkout (sftplug/plugins and sftplug/kernels link to plugins/ and kernels/)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SFTPLUG_NO_ENTRYPOINTS=1
export TRITON_DEFAULT_FP_FUSION=1

step() {  # step NAME BUDGET_S COMMAND...: the full log in $OUT/NAME.log, one line of verdict here
    local name=$1 budget=$2 start=$SECONDS
    shift 2
    if [[ -n "${GPU_CHECK_ONLY:-}" && $name != preflight && " $GPU_CHECK_ONLY " != *" $name "* ]] \
        || [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
        echo "[$name] not asked for (GPU_CHECK_ONLY / GPU_CHECK_SKIP)" | tee -a "$OUT/steps.txt"
        return
    fi
    if [[ $name != preflight && -e "$OUT/skip" ]]; then
        echo "[$name] skipped: $(cat "$OUT/skip")" | tee -a "$OUT/steps.txt"
        return
    fi
    timeout "$budget" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local verdict="ok"
    [[ $rc -eq 124 ]] && verdict="timed out after ${budget}s"
    [[ $rc -ne 0 && $rc -ne 124 ]] && verdict="failed (exit $rc): $(tail -n 1 "$OUT/$name.log")"
    echo "[$name] $verdict in $((SECONDS - start))s; log $OUT/$name.log" | tee -a "$OUT/steps.txt"
    [[ $name == preflight && $rc -ne 0 ]] && echo "the preflight failed" > "$OUT/skip"
}

: > "$OUT/steps.txt"
step preflight 30 "$PY" benchmarks/gpu_steps.py preflight "$OUT"
step doctor 30 "$PY" -m sftplug doctor --head-dim 128 --heads 32 --kv-heads 8
# Triton (attention and fused ops) against the reference in bf16/fp16 at real shapes; one config each (no tuning)
step kernels 100 env SFTPLUG_TRITON_TUNE=0 "$PY" -m pytest -q -p no:cacheprovider \
    tests/kernels/test_attention_gpu.py tests/kernels/test_fused_gpu.py tests/plugins/test_sdpa.py
# every backend's fwd/bwd ms and TFLOP/s, one JSON line per row as it finishes
step attention 80 "$PY" -m sftplug bench attention --budget 60 --jsonl "$OUT/attention.jsonl"
# each fused op's forms against PyTorch's at W1's sizes
step ops 60 "$PY" -m sftplug bench ops --json
step compare 110 "$PY" benchmarks/gpu_steps.py compare "$OUT"
step syncs 50 "$PY" benchmarks/gpu_steps.py syncs "$OUT"
# sftplug (fused ops auto) and sftplug --fused none against HF + PEFT
step bench-step 140 "$PY" -m sftplug bench step --workload W1 --rounds 1 --steps 5 --variant unfused --json
# the gated delta rule of Qwen3.5's linear-attention layers (2 x 4096 tokens, 16/32 heads of 128, bf16, plain and
# packed): sftplug's Triton kernel against the PyTorch form, and flash-linear-attention where it imports
step linear-attention 120 "$PY" -m sftplug bench linear-attention --budget 90 --jsonl "$OUT/linear_attention.jsonl"
# W1-MoE (Qwen3-30B-A3B's layer, 16 layers, bf16) against Qwen3-MoE + PEFT target_parameters; beyond the 600 s above
step bench-step-moe 300 "$PY" -m sftplug bench step --workload W1-MoE --rounds 1 --steps 3 --warmup 1 --json
echo "done; results in $OUT"
