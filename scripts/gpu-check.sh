#!/usr/bin/env bash
# The GPU check, on a GPU machine, from the binaries scripts/gpu-prepare.sh put in gpu-carry/. Stages:
#   tests       the GPU tests (every kernel against the CPU backend, the U-Net and its gradients, training
#               steps on every rung of the convolution ladder, the device samplers, the weights' bf16
#               copy), each in a process of its own, with a summary line each;
#   memcheck    compute-sanitizer memcheck over a short bf16 training run;
#   sanitizers  memcheck and racecheck over short training and sampling runs, fp32 and bf16;
#   cifar       ddpm-cuda train and sample on the paper's network (ddpm-cifar10), bf16;
#   bench-*     ddpm-cuda bench in bf16 / fp32 (training and sampling throughput at batch 128 and 256; the
#               dominant kernels, the convolution in both precisions and on every rung of the ladder of
#               dev/conv/README.md: wgmma (v4), wgmma + TMA (v5) and wgmma + swizzled TMA (v6)
#               against mma.sync (v3) on sm_90a);
#   peer-eager  benches/peer_pytorch.py, the same network in PyTorch, fp32 and bf16 autocast (eager);
#   criterion   the criterion benches (benches/gpu.rs);
#   peer-all    the peer with torch.compile too (its autotuning takes minutes).
# then a short table, with our images/s over the best PyTorch configuration's.
#
#   scripts/gpu-check.sh [quick|verify|perf|all]
#
# quick (the default) is sized for one call of a session with 15 minutes of device time: tests,
# bench-bf16, peer-eager, bench-fp32, memcheck, in that order of value. verify is tests, sanitizers,
# cifar; perf is bench-bf16, peer-all, bench-fp32, criterion; all is everything. Each stage runs under a
# timeout and the whole under a deadline (DEADLINE seconds, default 540; all: none), so the summary
# always prints and the log always comes back: a stage that would start with too little time left is
# skipped and says so, and the later stages are the ones that give way. Exit status 1 when a stage
# failed or timed out.
# The full log goes to stdout and to $OUT/gpu-check-<date>-<part>.log when $OUT is set (the device tool
# brings $OUT back); commit it under benches/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-quick}
case $part in
  quick) stages="tests bench-bf16 peer-eager bench-fp32 memcheck"; default_deadline=540 ;;
  verify) stages="tests sanitizers cifar"; default_deadline=540 ;;
  perf) stages="bench-bf16 peer-all bench-fp32 criterion"; default_deadline=540 ;;
  all) stages="tests sanitizers cifar bench-bf16 bench-fp32 criterion peer-all"; default_deadline=100000 ;;
  *) echo "usage: $0 [quick|verify|perf|all]" >&2; exit 2 ;;
esac
deadline=$(( $(date +%s) + ${DEADLINE:-$default_deadline} ))
carry=${GPU_CARRY:-gpu-carry}
# gpu-prepare.sh gzips the binaries (each embeds ~50 MB of machine code; the carry is limited to 64 MiB).
for f in "$carry"/*.gz; do
  [ -e "$f" ] || continue
  gunzip -f "$f" && chmod +x "${f%.gz}"
done
bin=$carry/ddpm-cuda
log=${OUT:-/tmp}/gpu-check-$(date -u +%Y-%m-%d)-$part.log
work=$(mktemp -d)
exec > >(tee "$log") 2>&1
tee_pid=$!

declare -a summary
failed=0
record() {
  summary+=("$(printf '%-48s %s' "$1" "$2")")
  case $2 in FAIL*|TIMEOUT*) failed=1 ;; esac
}
stage() { echo; echo "=== $1 ($(date -u +%H:%M:%S), $(( deadline - $(date +%s) )) s left)"; }
# timed LABEL SECONDS COMMAND...: runs COMMAND for at most SECONDS, or what is left before the deadline
# less 20 s for the summary; records PASS, FAIL, TIMEOUT or SKIPPED.
timed() {
  local label=$1 want_s=$2; shift 2
  local left=$(( deadline - $(date +%s) - 20 ))
  local limit=$(( want_s < left ? want_s : left ))
  if (( limit < 15 )); then record "$label" "SKIPPED (no time left)"; return 1; fi
  timeout -k 10 "$limit" "$@"
  local rc=$?
  case $rc in
    0) record "$label" PASS ;;
    124|137) record "$label" "TIMEOUT (${limit} s) or killed" ;;
    *) record "$label" "FAIL (exit $rc)" ;;
  esac
  return $rc
}

stage "machine"
date -u
echo "commit: $(tr '\n' ' ' < "$carry/COMMIT")"
echo "stages: $stages"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
command -v compute-sanitizer || echo "compute-sanitizer not on PATH"

sanitize() {  # tool, label, seconds, command...
  local tool=$1 label=$2 secs=$3; shift 3
  if ! command -v compute-sanitizer >/dev/null; then record "sanitizer $tool: $label" "SKIPPED (no compute-sanitizer)"; return; fi
  timed "sanitizer $tool: $label" "$secs" \
    bash -c 'set -o pipefail; compute-sanitizer --tool "$0" --error-exitcode 1 --print-limit 20 "$@" 2>&1 | tail -n 60' "$tool" "$@"
}
short_train() {  # precision, dir: sets the array `train_cmd`
  train_cmd=("$bin" train --preset tiny --steps 2 --batch 4 --grid 2 --every 2 --out "$2" --device cuda --precision "$1")
}

for s in $stages; do
  case $s in
  tests)
    stage "GPU tests"
    # One process per test: a kernel that faults the device (none had run on one before the first such
    # run) poisons its process's CUDA context, and would fail every later test of a shared process too.
    tests_end=$(( $(date +%s) + 240 ))
    for t in $("$carry/gpu-tests" --list --ignored 2>/dev/null | sed -n 's/: test$//p'); do
      left=$(( tests_end - $(date +%s) ))
      if (( left < 15 )); then record "GPU test $t" "SKIPPED (the tests' 240 s are spent)"; continue; fi
      timed "GPU test $t" "$left" "$carry/gpu-tests" --ignored --exact "$t" --test-threads=1 --nocapture
    done
    ;;
  memcheck)
    stage "compute-sanitizer memcheck, bf16 training"
    short_train bf16 "$work/san-bf16"
    sanitize memcheck "train tiny, 2 steps, bf16" 90 "${train_cmd[@]}"
    ;;
  sanitizers)
    stage "compute-sanitizer"
    for precision in fp32 bf16; do
      short_sample=("$bin" sample --model "$work/san-$precision" --sampler ddim --steps 4 -n 3 --batch 3 --out "$work/san.png" --device cuda --precision $precision)
      short_train $precision "$work/san-$precision"
      sanitize memcheck "train tiny, 2 steps, $precision" 90 "${train_cmd[@]}"
      sanitize memcheck "sample tiny, DDIM 4 steps, $precision" 60 "${short_sample[@]}"
      rm -rf "$work/san-$precision"
      sanitize racecheck "train tiny, 2 steps, $precision" 120 "${train_cmd[@]}"
      sanitize racecheck "sample tiny, DDIM 4 steps, $precision" 60 "${short_sample[@]}"
    done
    ;;
  cifar)
    stage "ddpm-cifar10 on the device (bf16)"
    if timed "train ddpm-cifar10, 20 steps" 150 "$bin" train --preset ddpm-cifar10 --steps 20 --batch 128 --grid 16 --every 20 \
         --out "$work/cifar" --device cuda --precision bf16; then
      cp "$work/cifar/loss.csv" "${OUT:-/tmp}/cifar-loss.csv" 2>/dev/null || true
      timed "sample ddpm-cifar10, DDIM 50 steps" 60 "$bin" sample --model "$work/cifar" --sampler ddim --steps 50 -n 16 \
        --out "$work/cifar.png" --device cuda --precision bf16
    else
      record "sample ddpm-cifar10, DDIM 50 steps" "SKIPPED (no trained model)"
    fi
    ;;
  bench-bf16|bench-fp32)
    precision=${s#bench-}
    stage "benchmark, $precision"
    timed "bench $precision" 180 bash -c 'set -o pipefail; "$0" bench --device cuda --precision "$1" | tee "$2"' "$bin" "$precision" "$work/bench-$precision.txt"
    ;;
  criterion)
    stage "criterion benches (benches/gpu.rs: each kernel family and the U-Net, both precisions)"
    timed "criterion benches" 300 bash -c 'set -o pipefail; "$0" --bench 2>&1 | grep -Ev "^(Benchmarking|Found|  [0-9]+ \(|Gnuplot)"' "$carry/gpu-bench"
    ;;
  peer-eager|peer-all)
    configs=fp32,bf16
    [ "$s" = peer-all ] && configs=fp32,bf16,compile
    stage "PyTorch peer (same network: $configs)"
    timed "peer benchmark ($configs)" 240 bash -c 'set -o pipefail; python3 -u benches/peer_pytorch.py --batch 128,256 --steps 10 --configs "$0" | tee -a "$1"' "$configs" "$work/peer.txt"
    ;;
  esac
done

finish() {
  rm -rf "$work"
  exec >&- 2>&-
  wait "$tee_pid" 2>/dev/null
  exit "$failed"
}
stage "summary"
printf '%s\n' "${summary[@]}"
[ -e "$work/bench-bf16.txt" ] || [ -e "$work/bench-fp32.txt" ] || finish
grep -E "ceilings|images/s|TFLOP/s|GB/s|GiB|failed" "$work/bench-fp32.txt" "$work/bench-bf16.txt" 2>/dev/null || true
# Where bf16's time goes: the kernels of a training step and of a sampling forward, op by op, at the
# last batch the bench ran.
last_batch=$(grep -oE "train step, batch [0-9]+" "$work/bench-bf16.txt" 2>/dev/null | tail -n 1 | grep -oE "[0-9]+$")
[ -z "$last_batch" ] || grep -E "^kernels of .*, batch $last_batch: .*% kernels" "$work/bench-bf16.txt" || true
# Ours (each precision) against the best PyTorch configuration at each batch size.
python3 - "$work/bench-fp32.txt" "$work/bench-bf16.txt" "$work/peer.txt" <<'PY' || true
import re, sys
ours, peer, ours_mem, peer_mem, ours_tflops = {}, {}, {}, {}, {}
ceiling = None
for path, precision in ((sys.argv[1], "fp32"), (sys.argv[2], "bf16")):
    try:
        lines = open(path).readlines()
    except OSError:
        continue
    for line in lines:
        m = re.match(r"(train|sampling) step, batch (\d+)(?: \(1000-step images/s\))?\s+[\d.]+ ms\s+([\d.]+) images/s", line)
        if m:
            ours[(m.group(1), int(m.group(2)), precision)] = float(m.group(3))
        m = re.match(r"(train|sampling) step, batch (\d+) \(model FLOPs[^)]*\)\s+[\d.]+ ms\s+([\d.]+) TFLOP/s", line)
        if m:
            ours_tflops[(m.group(1), int(m.group(2)), precision)] = float(m.group(3))
        m = re.match(r"train memory, batch (\d+) \(tensors \+ scratch\)\s+-\s+([\d.]+) GiB", line)
        if m:
            ours_mem[(int(m.group(1)), precision)] = float(m.group(2))
try:
    peer_lines = open(sys.argv[3]).readlines()
except OSError:
    peer_lines = []
    print("no PyTorch peer figures in this run")
for line in peer_lines:
    m = re.match(r"ceiling bf16 matmul ([\d.]+) TFLOP/s", line)
    if m:
        ceiling = float(m.group(1))
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
# Model FLOPs against the bf16 matmul the peer measured in this run (MFU; targets: 40% training, 50%
# sampling).
if ceiling is None:
    print("no bf16 matmul ceiling in this run: no MFU")
else:
    print(f"{'':<27}{'TFLOP/s':>12}{'bf16 matmul':>12}{'':>9}{'MFU':>8}")
    for key in sorted(ours_tflops):
        v = ours_tflops[key]
        print(f"{key[0] + ' batch ' + str(key[1]) + ' ' + key[2]:<27}{v:>12.1f}{ceiling:>12.1f}{'':>9}{v / ceiling:>8.1%}")
PY
finish
