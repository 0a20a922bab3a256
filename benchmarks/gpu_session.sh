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
if [ "$what" = amp ]; then
  # Issue 13: $NNUNETV2_MAMBA_TEST_ITERATIONS (default 500) steps of every trainer at its default precision, in
  # three concurrent pytest processes (gpu_finish.sh; NaN checks, not timings), next to the GPU tests that are not e2e.
  # $NNUNETV2_MAMBA_AMP_DATASET may name a raw dataset folder (e.g. the demo's MNI152 dataset).
  AMP_SELECTIONS="UMamba or VMamba;SegMamba and not MultiSegMamba;MultiSegMamba or Vivim" CALIBRATE=0 SKIP_INSTALL=1 \
    LIMIT="${AMP_TIMEOUT:-520}" bash benchmarks/gpu_finish.sh > "$out/amp_streams.log" 2>&1 &
  timeout "${AMP_TIMEOUT:-520}" python3 -m pytest tests -m "gpu and not e2e" -q -rs \
    --ignore=tests/nnunetv2_mamba/ssm/test_triton_scan_gpu.py > "$out/gpu_tests.log" 2>&1
  wait
  cat "$out/amp_streams.log"; tail -n 3 "$out/gpu_tests.log"
  mkdir -p "$out/amp_logs"
  for f in /tmp/amp*/*/nnUNet_results/*/*/fold_0/training_log_*.txt; do
    [ -f "$f" ] && cp "$f" "$out/amp_logs/$(basename "$(dirname "$(dirname "$f")")")_$(basename "$f")"
  done
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 benchmarks/benchmark_scan.py --steps 5 --warmup 2 2>&1 | tee "$out/bench_scan.log"
  python3 benchmarks/benchmark_networks.py --steps 10 --warmup 3 --json "$out/bench_networks.json" 2>&1 \
    | tee "$out/bench_networks.log"
  python3 benchmarks/benchmark_vivim.py --json "$out/bench_vivim.json" 2>&1 | tee "$out/bench_vivim.log"
  python3 benchmarks/benchmark_vivim.py --no-amp --json "$out/bench_vivim_fp32.json" 2>&1 \
    | tee "$out/bench_vivim_fp32.log"
fi
