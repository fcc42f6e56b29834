#!/usr/bin/env bash
# Install torch into a Python environment, picking the build that fits this machine.
#
#   ops/install-torch.sh [PYTHON]      # PYTHON defaults to python3; pip runs as "PYTHON -m pip"
#
# A GPU machine gets the default (CUDA) wheel. A CPU machine gets the much smaller +cpu wheel:
# first from pip's configured indexes and find-links, then from the PyTorch CPU index.
set -euo pipefail

TORCH_VERSION="2.13.0"
PYTHON="${1:-python3}"
PIP=("$PYTHON" -m pip install --disable-pip-version-check)

installed_version() {
  "$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true
}

if [[ "$(installed_version)" == "$TORCH_VERSION" ]]; then
  echo "torch $TORCH_VERSION is already installed"
  exit 0
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  echo "nvidia-smi found: installing torch $TORCH_VERSION with CUDA"
  "${PIP[@]}" "torch==$TORCH_VERSION"
elif "${PIP[@]}" "torch==$TORCH_VERSION+cpu"; then
  echo "installed torch $TORCH_VERSION+cpu from the configured package sources"
else
  echo "no +cpu wheel in the configured package sources: trying the PyTorch CPU index"
  "${PIP[@]}" "torch==$TORCH_VERSION" \
    --index-url https://download.pytorch.org/whl/cpu \
    --extra-index-url https://pypi.org/simple
fi

"$PYTHON" -c 'import torch; print(f"torch {torch.__version__} imports")'
