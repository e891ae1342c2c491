#!/usr/bin/env bash
# The GPU check of lmcore (benchmarks/gpu_check.py): the CUDA-relevant tests, then training
# tokens/s and MFU at gpt2-124m in bf16 (lmcore and HF Llama, with and without torch.compile),
# generation tokens/s with the KV cache, peak memory; one JSON file. Under 8 minutes on one GPU.
#
#   benchmarks/gpu_check.sh                  # on a GPU machine; JSON to $OUT/gpu_check.json or runs/gpu_check.json
#   benchmarks/gpu_check.sh --dry-run        # anywhere: every step on the CPU at a tiny shape (~1 minute)
#   LMCORE_GPU_CHECK_DRY=1 benchmarks/gpu_check.sh
#   PYTHON=/path/to/python benchmarks/gpu_check.sh --out /tmp/gpu.json
#
# Installs nothing: it uses $PYTHON if set, else .venv/bin/python, else python3, and needs torch
# (a CUDA build for the real run), accelerate, pydantic, numpy, tokenizers and pyyaml there;
# transformers (the Llama comparison) and pytest (the tests) are used when present.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=$(command -v python3 || command -v python || true)
fi
if [[ -z "$PY" ]]; then
    echo "gpu_check: no Python found (set PYTHON=...)" >&2
    exit 2
fi
echo "gpu_check: python $PY"

# what this Python has (nothing is installed: the machine may be offline)
if ! "$PY" - <<'PYCHECK'
import importlib.util, sys
need = ["torch", "accelerate", "pydantic", "numpy", "tokenizers", "yaml", "safetensors"]
nice = ["transformers", "pytest"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
absent = [m for m in nice if importlib.util.find_spec(m) is None]
if missing:
    print(f"gpu_check: this Python lacks {', '.join(missing)}: give one that has them with PYTHON=...")
    sys.exit(1)
import torch
print(f"gpu_check: torch {torch.__version__}, CUDA build {torch.version.cuda}, "
      f"CUDA available {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
if absent:
    print(f"gpu_check: without {', '.join(absent)}: the steps that need them are recorded as not run or failed")
PYCHECK
then
    exit 2
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

# a backstop past the script's own budget (it stops each step at its budget and writes the JSON
# after every step, so what was measured survives)
if command -v timeout >/dev/null; then
    exec timeout --signal=TERM --kill-after=10 470 "$PY" benchmarks/gpu_check.py "$@"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
