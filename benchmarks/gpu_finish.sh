#!/usr/bin/env bash
# One device call, everything concurrent (memory and NaN checks, no timings): the AMP runs of the trainers named
# by the -k selections in $AMP_SELECTIONS (";"-separated), and the memory calibration on both topologies.
set -uo pipefail
out="${OUT:-/tmp/gpu_out}"; mkdir -p "$out"
if [ "${SKIP_INSTALL:-0}" != 1 ]; then  # gpu_session.sh amp has installed already and runs tests beside this
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --use-pep517 -e . > "$out/install.log" 2>&1 \
    || { tail -20 "$out/install.log"; exit 1; }
fi
limit="${LIMIT:-520}"
amp_test=tests/trainers/test_base_reliability.py::test_default_precision_gpu_training_has_no_nonfinite_step
i=0
IFS=';' read -ra selections <<< "${AMP_SELECTIONS:-}"
for selection in "${selections[@]}"; do
  i=$((i + 1))
  timeout "$limit" python3 -m pytest "$amp_test" -k "$selection" -m "gpu and e2e" -q -rs -s --basetemp="/tmp/amp$i" \
    > "$out/amp_$i.log" 2>&1 &
done
if [ "${CALIBRATE:-1}" = 1 ]; then
timeout "$limit" python3 benchmarks/calibrate_memory.py --topology isotropic --patches 64 96 128 --steps 2 --warmup 1 \
  --json "$out/calibration_isotropic.json" > "$out/calibration_isotropic.log" 2>&1 &
timeout "$limit" python3 benchmarks/calibrate_memory.py --topology anisotropic --patch-sizes 16x128x128 24x192x192 32x256x256 \
  --steps 2 --warmup 1 --json "$out/calibration_anisotropic.json" > "$out/calibration_anisotropic.log" 2>&1 &
fi
wait
grep -h "steps at default precision\|passed\|failed\|error" "$out"/amp_*.log | tail -n 12
tail -n 4 "$out"/calibration_*.log 2>/dev/null || true
