#!/usr/bin/env bash
# Installs a pinned nvcc from PyPI into an ignored venv (no system CUDA needed) and prints its path.
#
#   scripts/install-nvcc.sh            # installs into .venv-nvcc/ beside the repo's Cargo.toml
#   NVCC=$(scripts/install-nvcc.sh | tail -n 1) cargo build --release
#
# The versions are pinned together: a newer nvidia-nvvm emits PTX that ptxas 13.0 rejects.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${DDPM_NVCC_VENV:-$root/.venv-nvcc}
python=${PYTHON:-python3}

# nvidia-cuda-nvcc-cu12 carries CUDA 12.9's ptxas (and no nvcc): build.rs assembles the machine code with it,
# so the kernels load on every driver from R535 (CUDA 12.2) on, where CUDA 13's machine code needs R580.
wheels=(
  nvidia-cuda-nvcc-cu12==12.9.86
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)

find_nvcc() {
  { find "$venv" -path '*/nvidia/cu13/bin/nvcc' -type f 2>/dev/null || true; } | head -n 1
}

nvcc=$(find_nvcc)
ptxas12=$({ find "$venv" -path '*/nvidia/cuda_nvcc/bin/ptxas' -type f 2>/dev/null || true; } | head -n 1)
if [ -z "$nvcc" ] || [ -z "$ptxas12" ]; then
  echo "installing ${wheels[*]} into $venv" >&2
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${wheels[@]}" >&2
  nvcc=$(find_nvcc)
fi
if [ -z "$nvcc" ] || [ ! -x "$nvcc" ]; then
  echo "error: nvcc not found under $venv after installing ${wheels[*]}" >&2
  exit 1
fi
# nvcc finds its headers relative to its real location: print the canonical path.
nvcc=$(readlink -f "$nvcc")
"$nvcc" --version | tail -n 2 >&2
echo "$nvcc"
