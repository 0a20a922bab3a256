#!/usr/bin/env bash
# One device call that runs every GPU check of the project and its benchmarks, writing logs to $OUT:
#   source .gpu/use.sh (the GPU kit) must have been run first, e.g.
#   source .gpu/use.sh && bash benchmarks/gpu_session.sh [tests|bench|all]
# Keep each part well inside the 10-minute limit of one device command.
set -uo pipefail
what="${1:-all}"
out="${OUT:-/tmp/gpu_out}"
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --use-pep517 -e . > "$out/install.log" 2>&1 \
  || { tail -20 "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest tests -m gpu -q -rs 2>&1 | tee "$out/gpu_tests.log" | tail -25
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 benchmarks/benchmark_scan.py --steps 5 --warmup 2 2>&1 | tee "$out/bench_scan.log"
  python3 benchmarks/benchmark_networks.py --steps 10 --warmup 3 --json "$out/bench_networks.json" 2>&1 \
    | tee "$out/bench_networks.log"
  python3 benchmarks/benchmark_vivim.py --json "$out/bench_vivim.json" 2>&1 | tee "$out/bench_vivim.log"
  python3 benchmarks/benchmark_vivim.py --no-amp --json "$out/bench_vivim_fp32.json" 2>&1 \
    | tee "$out/bench_vivim_fp32.log"
fi
