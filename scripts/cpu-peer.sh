#!/usr/bin/env bash
# Our CPU backend beside PyTorch on the same cores: `ddpm-cuda bench --device cpu` and
# `benches/peer_pytorch.py --device cpu` (fp32 NCHW and channels_last; add compile with CONFIGS), for the
# paper's network at batch 8 and `tiny` at batch 32, then our ratio to the best peer configuration for the
# training step and the forward pass (a ratio above 1 means we are faster).
#
#   PYTHON=/path/to/venv/bin/python scripts/cpu-peer.sh [out.md]
#
# PYTHON must have torch (PyPI's wheel is enough; not part of the build or CI). STEPS (default 3) timed
# steps each; CASES (default "ddpm-cifar10:8 tiny:32") preset:batch pairs; CONFIGS the peer's list.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
steps=${STEPS:-3}
cases=${CASES:-"ddpm-cifar10:8 tiny:32"}
configs=${CONFIGS:-fp32,channels_last}
out=${1:-}
bin=target/release/ddpm-cuda
[ -x "$bin" ] || cargo build --release
# The widest vector extension the CPU has: the figures differ by about 2x between AVX2 and AVX-512 machines.
isa() { if grep -qw avx512f /proc/cpuinfo; then echo AVX-512; elif grep -qw avx2 /proc/cpuinfo; then echo AVX2; else echo SSE; fi; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
{
    echo "# CPU backend against PyTorch on the same cores ($(date -u +%Y-%m-%d))"
    echo
    echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src kernels || echo ' with uncommitted changes'); $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) threads, $(isa)); $("$python" -c 'import torch; print("torch", torch.__version__)')"
    echo
} > "$log"
summary=()
for c in $cases; do
    preset=${c%%:*} batch=${c##*:}
    ours=$("$bin" bench --device cpu --preset "$preset" --batch "$batch" --steps "$steps" --no-kernels)
    peer=$("$python" benches/peer_pytorch.py --device cpu --preset "$preset" --batch "$batch" --steps "$steps" --configs "$configs")
    { echo "## $preset, batch $batch"; echo; echo '```'; echo "$ours"; echo; echo "$peer"; echo '```'; echo; } >> "$log"
    # The first line of each kind is the time; the number is the field before "ms" (the label's words vary).
    ms_of='index($0, what) == 1 { for (i = 1; i < NF; i++) if ($(i + 1) == "ms") { print $i; exit } }'
    our_train=$(awk -v what="train step, batch $batch " "$ms_of" <<< "$ours")
    our_fwd=$(awk -v what="sampling step, batch $batch " "$ms_of" <<< "$ours")
    [ -n "$our_train" ] && [ -n "$our_fwd" ] || { echo "cpu-peer: no times for $c in the bench's output:" >&2; echo "$ours" >&2; exit 1; }
    read -r best_train best_fwd <<< "$(awk -v b="$batch" '$2 == b && $3 ~ /^[0-9.]+$/ {
        if (t == "" || $3 < t) t = $3; if (f == "" || $5 < f) f = $5 } END {print t, f}' <<< "$peer")"
    summary+=("$(awk -v p="$preset" -v b="$batch" -v ot="$our_train" -v of="$our_fwd" -v pt="$best_train" -v pf="$best_fwd" 'BEGIN {
        printf "%-14s batch %3d: training step %9.1f ms vs %9.1f ms, ratio %.2f; forward %9.1f ms vs %9.1f ms, ratio %.2f",
            p, b, ot, pt, pt / ot, of, pf, pf / of }')")
done
{
    echo "## Ratios (PyTorch's best configuration's time over ours; above 1: we are faster)"
    echo
    echo '```'
    printf '%s\n' "${summary[@]}"
    echo '```'
} >> "$log"
if [ -n "$out" ]; then cp "$log" "$out"; fi
printf '%s\n' "${summary[@]}"
