#!/usr/bin/env bash
# Install em-interp and its tested dependency versions into ./.venv.
#   bash scripts/install.sh            # CPU host: torch 2.13.0 first, never a CUDA build
#   TORCH_INDEX=<url> bash scripts/install.sh   # take torch from another index (e.g. a CPU-only one)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  # Installed on its own, first: a bare `torch` requirement would pull a multi-GB CUDA build.
  "$VPY" -m pip install "torch==2.13.0" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
fi
"$VPY" -m pip install -c constraints.txt -e ".[dev]"
# A Jupyter kernel spec inside the venv, so notebooks run on this interpreter.
"$VPY" -m ipykernel install --sys-prefix --name python3 --display-name "em-interp (.venv)" >/dev/null
"$VPY" -m pip check
echo "installed: $("$VPY" -c 'import em_interp, torch, transformer_lens; print("em_interp", em_interp.__version__, "| torch", torch.__version__)')"
