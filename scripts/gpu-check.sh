#!/usr/bin/env bash
# The whole GPU check in one run, on a GPU machine, from the binaries scripts/gpu-prepare.sh put in
# gpu-carry/:
#   1. the GPU tests (every kernel against the CPU backend, the U-Net and its gradients, training steps,
#      the device samplers);
#   2. compute-sanitizer (memcheck, racecheck) over a short training run and a short sampling run;
#   3. ddpm-cuda train and sample on the paper's network (ddpm-cifar10);
#   4. ddpm-cuda bench in fp32 and in bf16 (training and sampling throughput at batch 128 and 256; the
#      dominant kernels, with the convolution in both precisions and on every rung of the ladder of
#      dev/conv/README.md, wgmma (v4) against mma.sync (v3) on sm_90a);
#   5. the criterion benches (benches/gpu.rs), and benches/peer_pytorch.py, the same network in PyTorch
#      (fp32, bf16 autocast, torch.compile);
# then a short table, with our images/s over the best PyTorch configuration's. The full log goes to stdout
# and to $OUT/gpu-check-<date>-<part>.log when $OUT is set (the device tool brings $OUT back); commit it
# under benches/results/.
#
#   scripts/gpu-check.sh [all|verify|perf]
# verify is 1-3, perf is 4-5 (torch.compile's autotuning takes minutes): each fits one 10-minute call.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
case $part in all|verify|perf) ;; *) echo "usage: $0 [all|verify|perf]" >&2; exit 2;; esac
run_verify() { [ "$part" != perf ]; }
run_perf() { [ "$part" != verify ]; }
carry=${GPU_CARRY:-gpu-carry}
bin=$carry/ddpm-cuda
log=${OUT:-/tmp}/gpu-check-$(date -u +%Y-%m-%d)-$part.log
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

if run_verify; then
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
for precision in fp32 bf16; do
  short_train=("$bin" train --preset tiny --steps 2 --batch 4 --grid 2 --every 2 --out "$work/san-$precision" --device cuda --precision $precision)
  short_sample=("$bin" sample --model "$work/san-$precision" --sampler ddim --steps 4 -n 3 --batch 3 --out "$work/san.png" --device cuda --precision $precision)
  sanitize memcheck "train tiny, 2 steps, $precision" "${short_train[@]}"
  rm -rf "$work/san-$precision"
  sanitize racecheck "train tiny, 2 steps, $precision" "${short_train[@]}"
  sanitize memcheck "sample tiny, DDIM 4 steps, $precision" "${short_sample[@]}"
  sanitize racecheck "sample tiny, DDIM 4 steps, $precision" "${short_sample[@]}"
done

stage "ddpm-cifar10 on the device (bf16)"
if "$bin" train --preset ddpm-cifar10 --steps 20 --batch 128 --grid 16 --every 20 --out "$work/cifar" --device cuda --precision bf16 \
   && "$bin" sample --model "$work/cifar" --sampler ddim --steps 50 -n 16 --out "$work/cifar.png" --device cuda --precision bf16; then
  record "train + sample ddpm-cifar10" PASS
  cp "$work/cifar/loss.csv" "${OUT:-/tmp}/cifar-loss.csv" 2>/dev/null || true
else
  record "train + sample ddpm-cifar10" FAIL
fi
fi

if run_perf; then
stage "benchmark"
for precision in fp32 bf16; do
  if "$bin" bench --device cuda --precision $precision | tee "$work/bench-$precision.txt"; then
    record "bench $precision" PASS
  else
    record "bench $precision" FAIL
  fi
done

stage "criterion benches (benches/gpu.rs: each kernel family and the U-Net, both precisions)"
if "$carry/gpu-bench" --bench 2>&1 | grep -Ev "^(Benchmarking|Found|  [0-9]+ \(|Gnuplot)" ; then
  record "criterion benches" PASS
else
  record "criterion benches" FAIL
fi

stage "PyTorch peer (same network, fp32 / bf16 / compiled)"
if python3 benches/peer_pytorch.py --batch 128,256 --steps 10 | tee "$work/peer.txt"; then
  record "peer benchmark" PASS
else
  record "peer benchmark" FAIL
fi
fi

stage "summary"
printf '%s\n' "${summary[@]}"
run_perf || { rm -rf "$work"; exit 0; }
grep -E "ceilings|images/s|TFLOP/s|GB/s|GiB" "$work/bench-fp32.txt" "$work/bench-bf16.txt" 2>/dev/null || true
# Ours (each precision) against the best PyTorch configuration at each batch size.
python3 - "$work/bench-fp32.txt" "$work/bench-bf16.txt" "$work/peer.txt" <<'PY' || true
import re, sys
ours, peer, ours_mem, peer_mem = {}, {}, {}, {}
for path, precision in ((sys.argv[1], "fp32"), (sys.argv[2], "bf16")):
    try:
        lines = open(path).readlines()
    except OSError:
        continue
    for line in lines:
        m = re.match(r"(train|sampling) step, batch (\d+)(?: \(1000-step images/s\))?\s+[\d.]+ ms\s+([\d.]+) images/s", line)
        if m:
            ours[(m.group(1), int(m.group(2)), precision)] = float(m.group(3))
        m = re.match(r"train memory, batch (\d+) \(tensors \+ scratch\)\s+-\s+([\d.]+) GiB", line)
        if m:
            ours_mem[(int(m.group(1)), precision)] = float(m.group(2))
for line in open(sys.argv[3]):
    f = line.split()
    if len(f) == 7 and f[1].isdigit():
        b = int(f[1])
        for kind, v in (("train", float(f[3])), ("sampling", float(f[5]))):
            if v > peer.get((kind, b), (0, ""))[0]:
                peer[(kind, b)] = (v, f[0])
        # The least training memory of any configuration.
        if float(f[6]) < peer_mem.get(b, (float("inf"), ""))[0]:
            peer_mem[b] = (float(f[6]), f[0])
print(f"{'':<27}{'ours img/s':>12}{'best peer':>12}{'config':>9}{'ratio':>8}")
for key in sorted(ours):
    if key[:2] in peer:
        v, cfg = peer[key[:2]]
        print(f"{key[0] + ' batch ' + str(key[1]) + ' ' + key[2]:<27}{ours[key]:>12.2f}{v:>12.2f}{cfg:>9}{ours[key] / v:>8.2f}")
print(f"{'':<27}{'ours GiB':>12}{'least peer':>12}{'config':>9}{'ratio':>8}")
for (b, precision), gib in sorted(ours_mem.items()):
    if b in peer_mem:
        v, cfg = peer_mem[b]
        print(f"{'train memory batch ' + str(b) + ' ' + precision:<27}{gib:>12.2f}{v:>12.2f}{cfg:>9}{gib / v:>8.2f}")
PY
rm -rf "$work"
