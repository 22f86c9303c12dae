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
if [[ "${1:-}" == "--test" ]]; then
  extras="[test,bench]"
  # System packages the tests use where they can be installed (root + apt): Debian's chromium for the MLflow
  # UI test, rsync for per-study code snapshots, postgresql for the tracking-server tests (the tests run their
  # own private instance: a policy-rc.d keeps the package from starting the system's). Without them those
  # tests skip and say why.
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    packages="chromium fonts-dejavu-core rsync postgresql"
    missing=$(for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
    if [[ -n "$missing" ]]; then
      made_policy=""
      if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
      fi
      rc=0
      { apt-get update -q >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null; } || rc=$?
      [[ -n $made_policy ]] && rm -f /usr/sbin/policy-rc.d
      [[ $rc -eq 0 ]] || { echo "install.sh: apt-get install $missing failed" >&2; exit $rc; }
    fi
  fi
fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".${extras}"
echo "installed into $(pwd)/.venv"
