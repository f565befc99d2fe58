#!/usr/bin/env bash
# Install em-interp and its tested dependency versions into ./.venv.
#
#   bash scripts/install.sh                       # picks the torch build for this host (below)
#   TORCH_INDEX=<url> bash scripts/install.sh     # take torch from this index instead
#
# torch 2.13.0 is installed on its own, first, and the rest is installed with -c constraints.txt
# so no dependency can swap it. Which build:
#   * TORCH_INDEX set           -> from that index;
#   * an NVIDIA driver present  -> from the default index (a CUDA build, several GB);
#   * no NVIDIA driver          -> the CPU wheel from https://download.pytorch.org/whl/cpu
#                                  (about 200 MB); if that index cannot be reached, from the
#                                  default index (on PyPI that is the CUDA build; machines with a
#                                  local CPU wheel configured in pip get that).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  torch_args=()
  if [ -n "${TORCH_INDEX:-}" ]; then
    echo "torch: from TORCH_INDEX=$TORCH_INDEX"
    torch_args=(--index-url "$TORCH_INDEX")
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "torch: NVIDIA driver found, CUDA build from the default index"
  elif "$VPY" -c "import urllib.request as u; u.urlopen('$CPU_INDEX/torch/', timeout=5)" \
      >/dev/null 2>&1; then
    echo "torch: no NVIDIA driver, CPU build from $CPU_INDEX"
    torch_args=(--index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple)
  else
    echo "torch: no NVIDIA driver and $CPU_INDEX unreachable; using the default index"
  fi
  "$VPY" -m pip install "torch==$TORCH_VERSION" ${torch_args[@]+"${torch_args[@]}"}
fi
"$VPY" -m pip install -c constraints.txt -e ".[dev,sweep,serve]"
# A Jupyter kernel spec inside the venv, so notebooks run on this interpreter.
"$VPY" -m ipykernel install --sys-prefix --name python3 --display-name "em-interp (.venv)" >/dev/null
"$VPY" -m pip check
echo "installed: $("$VPY" -c 'import em_interp, torch, transformer_lens; print("em_interp", em_interp.__version__, "| torch", torch.__version__, "| CUDA", torch.cuda.is_available())')"
