#!/usr/bin/env bash
# Everything citer checks on a GPU, in one run: the GPU tests (CUDA graphs against the reference in
# float32, an LLM spread over GPU and CPU) and the decoding benchmark on both GPU pairs in bfloat16.
# Logs and figures go to OUT (default gpu-out/): tests.log, decode.log, decode-gpu.json.
#   bash benchmarks/gpu.sh [OUT]
# Needs the demo world (.citer/demo-world) and a torch with CUDA; the rest of the stack as installed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$out/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/tests.log"
timeout 400 python3 benchmarks/decode.py --device cuda --dtype bfloat16 --pairs smol wide --repeats 3 \
  --json "$out/decode-gpu.json" 2>&1 | tee "$out/decode.log"
