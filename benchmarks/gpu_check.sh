#!/usr/bin/env bash
# The prepared device run (H100/H200; the device image has torch, triton, transformers, peft,
# pluggy, click, safetensors, tokenizers): about 8 minutes. Results land in $OUT.
#   run: bash benchmarks/gpu_check.sh        (timeout_s 600 leaves room for nothing else)
set -uo pipefail
OUT=${OUT:-/tmp/sftplug-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SFTPLUG_NO_ENTRYPOINTS=1
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
python3 -m sftplug doctor | tee "$OUT/doctor.txt"
timeout 150 python3 -m sftplug bench attention --json > "$OUT/attention.json"
python3 -c "import json, sys; from sftplug.diagnostics.attention_bench import format_table; print(format_table(json.load(open(sys.argv[1]))))" "$OUT/attention.json" | tee "$OUT/attention.txt"
timeout 100 python3 -m pytest -q -x tests/kernels/test_attention_gpu.py tests/plugins/test_sdpa.py tests/attention/test_choice.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
# W1 LoRA against HF+PEFT, with --torch-compile and --workers 2 as sides of their own
timeout 280 python3 -m sftplug bench step --workload W1 --rounds 1 --steps 5 --variant compile --variant workers2 | tee "$OUT/w1.txt"
