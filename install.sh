#!/usr/bin/env bash
# Set up the project in ./.venv (idempotent): torch first, then the package with its dependencies.
#   ./install.sh            # runtime
#   ./install.sh --test     # runtime + test and bench tools
# torch: an existing torch in the venv is kept (HPC users bring their own CUDA build); otherwise
# TORCH_SPEC (default torch==2.13.0, the CPU wheel this kind of machine provides) is installed first so that
# pip does not pull a multi-GB CUDA build as a dependency.
set -euo pipefail
cd "$(dirname "$0")"
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test,bench]"
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".${extras}"
echo "installed into $(pwd)/.venv"
