#!/usr/bin/env bash
# The next GPU session's measurements, one mode per device call (each well inside 10 minutes):
#   source .gpu/use.sh && bash benchmarks/gpu_next.sh tests|policy|triton|memory
# tests:  every GPU test that is not e2e, the Triton file included (its fused-layer and recompute tests are new).
# policy: network benchmark, mamba_ssm backend, mixers in fp32 (the published policy) vs the default bf16 policy.
# triton: the same networks on the Triton backend, unfused vs the fused layer Function (NNUNETV2_MAMBA_TRITON_FUSED).
# memory: memory calibration of the families not yet measured under the bf16 policy, then issue 15's 24/40 GB test.
set -uo pipefail
what="${1:?tests|policy|triton|memory}"
out="${OUT:-/tmp/gpu_out}"; mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --use-pep517 -e . > "$out/install.log" 2>&1 \
  || { tail -20 "$out/install.log"; exit 1; }
nets="UMambaEnc UMambaBot LoGVMamba SegMamba MultiSegMamba"
bench() {  # label, then env assignments
  local label="$1"; shift
  env "$@" timeout 280 python3 benchmarks/benchmark_networks.py --networks $nets --steps 5 --warmup 2 \
    --json "$out/bench_$label.json" > "$out/bench_$label.log" 2>&1
  tail -n 12 "$out/bench_$label.log"
}
case "$what" in
  tests)
    timeout 560 python3 -m pytest tests -m "gpu and not e2e" -q -rs 2>&1 | tee "$out/gpu_tests.log" | tail -15 ;;
  policy)
    bench mamba_ssm_fp32_mixers NNUNETV2_MAMBA_BACKEND=mamba_ssm NNUNETV2_MAMBA_MIXER_DTYPE=fp32
    bench mamba_ssm_bf16_mixers NNUNETV2_MAMBA_BACKEND=mamba_ssm ;;
  triton)
    bench triton_unfused NNUNETV2_MAMBA_BACKEND=triton NNUNETV2_MAMBA_TRITON_FUSED=0
    bench triton_fused NNUNETV2_MAMBA_BACKEND=triton NNUNETV2_MAMBA_TRITON_FUSED=1 ;;
  memory)
    timeout 300 python3 benchmarks/calibrate_memory.py --networks SegMamba BiSegMamba SegMambaSkip Vivim VivimV3 \
      --patches 64 96 128 --steps 2 --warmup 1 > "$out/calibration_isotropic_rest.log" 2>&1 &
    timeout 540 python3 -m pytest tests/nnunetv2_mamba/planning/test_plan_gpu.py -q -rs -s -k "UMambaBot or LoGVMamba" \
      > "$out/plan_gpu.log" 2>&1
    wait; tail -n 8 "$out/calibration_isotropic_rest.log" "$out/plan_gpu.log" ;;
esac
