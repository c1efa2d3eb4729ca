#!/usr/bin/env bash
# The whole GPU check in one run, on a GPU machine, from the binaries scripts/gpu-prepare.sh put in
# gpu-carry/:
#   1. the GPU tests (every kernel against the CPU backend, the U-Net and its gradients, training steps,
#      the device samplers);
#   2. compute-sanitizer (memcheck, racecheck) over a short training run and a short sampling run;
#   3. ddpm-cuda train and sample on the paper's network (ddpm-cifar10);
#   4. ddpm-cuda bench (training and sampling throughput at batch 128 and 256, the dominant kernels);
#   5. benches/peer_pytorch.py, the same network in PyTorch (fp32, bf16 autocast, torch.compile);
# then a short table, with our images/s over the best PyTorch configuration's. The full log goes to stdout and to $OUT/gpu-check-<date>.log when $OUT is set
# (the device tool brings $OUT back); commit it under benches/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
carry=${GPU_CARRY:-gpu-carry}
bin=$carry/ddpm-cuda
log=${OUT:-/tmp}/gpu-check-$(date -u +%Y-%m-%d).log
work=$(mktemp -d)
exec > >(tee "$log") 2>&1

declare -a summary
record() { summary+=("$(printf '%-48s %s' "$1" "$2")"); }
stage() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }

stage "machine"
date -u
echo "commit: $(tr '\n' ' ' < "$carry/COMMIT")"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
command -v compute-sanitizer || echo "compute-sanitizer not on PATH"

stage "GPU tests"
if "$carry/gpu-tests" --ignored --test-threads=1 --nocapture 2>&1; then
  record "GPU tests" PASS
else
  record "GPU tests" FAIL
fi

sanitize() {  # tool, label, command...
  local tool=$1 label=$2; shift 2
  if ! command -v compute-sanitizer >/dev/null; then record "sanitizer $tool: $label" "SKIPPED (no compute-sanitizer)"; return; fi
  if compute-sanitizer --tool "$tool" --error-exitcode 1 --print-limit 20 "$@" 2>&1 | tail -n 40; then
    record "sanitizer $tool: $label" PASS
  else
    record "sanitizer $tool: $label" FAIL
  fi
}
stage "compute-sanitizer"
short_train=("$bin" train --preset tiny --steps 2 --batch 4 --grid 2 --every 2 --out "$work/san" --device cuda)
short_sample=("$bin" sample --model "$work/san" --sampler ddim --steps 4 -n 3 --batch 3 --out "$work/san.png" --device cuda)
sanitize memcheck "train tiny, 2 steps" "${short_train[@]}"
sanitize memcheck "sample tiny, DDIM 4 steps" "${short_sample[@]}"
sanitize racecheck "train tiny, 2 steps" "${short_train[@]}"
sanitize racecheck "sample tiny, DDIM 4 steps" "${short_sample[@]}"

stage "ddpm-cifar10 on the device"
if "$bin" train --preset ddpm-cifar10 --steps 20 --batch 128 --grid 16 --every 20 --out "$work/cifar" --device cuda \
   && "$bin" sample --model "$work/cifar" --sampler ddim --steps 50 -n 16 --out "$work/cifar.png" --device cuda; then
  record "train + sample ddpm-cifar10" PASS
  cp "$work/cifar/loss.csv" "${OUT:-/tmp}/cifar-loss.csv" 2>/dev/null || true
else
  record "train + sample ddpm-cifar10" FAIL
fi

stage "benchmark"
if "$bin" bench --device cuda | tee "$work/bench.txt"; then
  record "bench" PASS
else
  record "bench" FAIL
fi

stage "PyTorch peer (same network, fp32 / bf16 / compiled)"
if python3 benches/peer_pytorch.py --batch 128,256 --steps 10 | tee "$work/peer.txt"; then
  record "peer benchmark" PASS
else
  record "peer benchmark" FAIL
fi

stage "summary"
printf '%s\n' "${summary[@]}"
grep -E "images/s|TFLOP/s|GB/s" "$work/bench.txt" 2>/dev/null || true
# Ours against the best PyTorch configuration at each batch size.
python3 - "$work/bench.txt" "$work/peer.txt" <<'PY' || true
import re, sys
ours, peer = {}, {}
for line in open(sys.argv[1]):
    m = re.match(r"(train|sampling) step, batch (\d+)(?: \(1000-step images/s\))?\s+[\d.]+ ms\s+([\d.]+) images/s", line)
    if m:
        ours[(m.group(1), int(m.group(2)))] = float(m.group(3))
for line in open(sys.argv[2]):
    f = line.split()
    if len(f) == 7 and f[1].isdigit():
        b = int(f[1])
        for kind, v in (("train", float(f[3])), ("sampling", float(f[5]))):
            if v > peer.get((kind, b), (0, ""))[0]:
                peer[(kind, b)] = (v, f[0])
print(f"{'':<22}{'ours img/s':>12}{'best peer':>12}{'config':>9}{'ratio':>8}")
for key in sorted(ours):
    if key in peer:
        v, cfg = peer[key]
        print(f"{key[0] + ' batch ' + str(key[1]):<22}{ours[key]:>12.2f}{v:>12.2f}{cfg:>9}{ours[key] / v:>8.2f}")
PY
rm -rf "$work"
