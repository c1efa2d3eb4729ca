#!/usr/bin/env bash
# Builds everything the GPU check needs on this (GPU-less) machine and puts it in gpu-carry/ (ignored by
# git), for the device tool to carry to a GPU machine, which has no Rust toolchain:
#
#   scripts/gpu-prepare.sh            # then, on the GPU machine: scripts/gpu-check.sh
#
# gpu-carry/ holds the ddpm-cuda binary (kernels embedded), the GPU test binary, the criterion GPU bench
# binary (benches/gpu.rs), each gzipped, and COMMIT (the commit and whether the tree had uncommitted changes).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(scripts/install-nvcc.sh | tail -n 1)}
export NVCC DDPM_REQUIRE_NVCC=1
cargo build --release
tests=$(cargo test --release --test gpu --no-run --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*"' | sed 's/"executable":"\(.*\)"/\1/' | tail -n 1)
[ -n "$tests" ] || { echo "error: no GPU test binary was built" >&2; exit 1; }
benches=$(cargo bench --bench gpu --no-run --message-format=json 2>/dev/null \
  | grep -o '"executable":"[^"]*"' | sed 's/"executable":"\(.*\)"/\1/' | tail -n 1)
[ -n "$benches" ] || { echo "error: no GPU bench binary was built" >&2; exit 1; }
rm -rf gpu-carry && mkdir -p gpu-carry
cp target/release/ddpm-cuda gpu-carry/
cp "$tests" gpu-carry/gpu-tests
cp "$benches" gpu-carry/gpu-bench
# Each binary embeds the kernels' ~50 MB fatbin (machine code for sm_80 and sm_90a, PTX); gzipped, the three
# fit the device tool's 64 MiB carry with room to spare. gpu-check.sh unpacks them.
gzip -6 -f gpu-carry/ddpm-cuda gpu-carry/gpu-tests gpu-carry/gpu-bench
{
  git rev-parse HEAD 2>/dev/null || echo unknown
  git status --porcelain 2>/dev/null | grep -q . && echo "with uncommitted changes" || echo "clean tree"
} > gpu-carry/COMMIT
ls -la gpu-carry
du -sh gpu-carry
