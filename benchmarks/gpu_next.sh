#!/usr/bin/env bash
# One device session's measurements, one mode per device call (each well inside the 10-minute limit):
#   source .gpu/use.sh && bash benchmarks/gpu_next.sh first|plans|calibrate|finish|finish24|last|kernels|networks_triton|tests|networks
# first:    (a) layer timings on an idle GPU: the triton layer with torch's conv, with the Triton conv
#           ($NNUNETV2_MAMBA_TRITON_CONV), the fused Function, mamba_ssm; bf16 and fp32; the per-kernel profile of
#           both triton layers and mamba_ssm's; (b) then, concurrently (no timings): the GPU tests of the scan
#           backends and layers, the memory calibration points still missing, and the preparation
#           of issue 15's 288^3 dataset in .gpu_work/ (kept for the next call while the machine stays warm).
# plans:    issue 15's 24 / 40 GB plans training under set_per_process_memory_fraction, runs sharing the GPU by budget
#           ($PLAN_SELECTION narrows the trainers; the dataset is re-made when .gpu_work/ is gone).
# calibrate: the memory calibration points still missing (BiSegMamba anisotropic, MultiSegMamba; all measured by
#           2026-12-02's fourth session, see BENCHMARKS.md).
# finish / finish24: what the fourth session ran: MultiSegMamba's 24 / 40 GB plans (finish24: the 24 GB one alone),
#           the layer timings, GPU tests and the last calibration points beside them.
# kernels:  the Triton scan's kernels per tiling, layout and dtype, beside an older copy of the code; the layer.
# networks_triton: the d_state-16 networks on mamba_ssm, triton, and the automatic choice (bf16 mixers).
# tests:    every GPU test that is not e2e.
# networks_norm: GPU tests of the Triton instance norm, then the networks with it (the default) and with torch's
#           ($NNUNETV2_MAMBA_FAST_NORM=0), automatic scan backend, bf16 mixers.
# session7: GPU tests + benchmark of the token LayerNorm, profiles (also channels-last), the U-Mamba / LoG networks.
# channels_last: GPU tests of the norms and U-Mamba trainers, profiles, networks with and without channels last.
# final:    non-e2e GPU tests (not the scan file), the networks with and without channels last, U-Mamba-Bot's profile.
# recalibrate: the memory calibration points of U-Mamba-Enc/Bot and LoG-VMamba (stale since 2026-12-03), both
#           mixer policies.
# profile:  where the training step goes: benchmarks/profile_network.py (kernel groups) for PlainConvUNet and the
#           d_state-16 networks with the automatic choice, then the GPU tests outside the Triton file.
# session8: (the SegMamba family's first profile) where SegMamba's and BiSegMamba's steps go, beside their mixer-free
#           U-Net (TamingResEnc) and PlainConvUNet (and SegMamba's on the code in .gpu/baseline, a full older checkout,
#           when it is there); the Taming networks, Vivim and VivimV3.
# session8b: the Taming networks on the code in .gpu/baseline; GPU tests of the token norm and the Taming trainers.
# session9: GPU tests of the d_state tilings (TILINGS) and of session 8's token norms; the Triton scan's kernels per
#           tiling at d_state 32 (SegMamba's 128^3 stage) and 64 (its 64^3 stage); the Mamba layer there, triton vs
#           mamba_ssm; SegMamba / BiSegMamba as shipped and with triton for every eligible stage.
# session9b: the Triton scan's kernels with per-kernel warps (the gradient kernel's own) at d_state 16 / 32 / 64; the
#           layer at SegMamba's stages; SegMamba / BiSegMamba as shipped; the GPU tests of the tilings and of session
#           8's token norms, then the rest of the Triton scan's GPU tests as time allows.
# session9c: the layer at SegMamba's d_state-64 stage with the final tiling; BiSegMamba / SegMambaSkip as shipped;
#           the Triton scan's GPU tests session9b left out, as time allows (430 s in all).
# networks: network benchmark: mamba_ssm with fp32 mixers (the published policy) vs the bf16 policy, and triton with
#           torch's and with the Triton conv (about 200 s per row group: may need two calls).
set -uo pipefail
what="${1:?first|plans|calibrate|finish|finish24|last|kernels|networks_triton|networks_norm|session7|channels_last|final|recalibrate|session8|session8b|session9|session9b|session9c|tests|profile|networks}"
out="${OUT:-/tmp/gpu_out}"; mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --use-pep517 -e . > "$out/install.log" 2>&1 \
  || { tail -20 "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$out/device.txt" 2>&1
plan_root="$PWD/.gpu_work/plan_gpu"
plan_test=tests/nnunetv2_mamba/planning/test_plan_gpu.py
nets="UMambaEnc UMambaBot LoGVMamba SegMamba MultiSegMamba"
bench() {  # label, then env assignments
  local label="$1"; shift
  env "$@" timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/benchmark_networks.py --networks $nets --steps 5 --warmup 2 \
    --json "$out/bench_$label.json" > "$out/bench_$label.log" 2>&1
  tail -n 9 "$out/bench_$label.log"
}
cal() {  # deadline (seconds since the script started), log, topology, calibrate_memory.py arguments...
  local deadline="$1" log="$2" topology="$3"; shift 3
  [ $((deadline - SECONDS)) -gt 20 ] || return 0
  timeout $((deadline - SECONDS)) python3 benchmarks/calibrate_memory.py --topology "$topology" --steps 2 --warmup 1 \
    "$@" >> "$out/$log" 2>&1
}
plan_report() {  # last lines to show of the plan test's log; each step's log tail goes to plan_steps.log
  [ -d "$plan_root/logs" ] && tail -n 4 "$plan_root"/logs/* > "$out/plan_steps.log" 2>&1
  grep -h "finished\|GB: patch\|passed\|failed\|Error" "$out/plan_gpu.log" | cut -c1-400 | tail -n "$1"
}
calibrate_missing() {  # deadline: the calibration points still missing after 2026-12-02 (BENCHMARKS.md), two streams
  local end="$1"
  (cal $end cal_biseg.log anisotropic --networks BiSegMamba --patch-sizes 16x128x128 24x192x192 32x256x256
   cal $end cal_multi.log anisotropic --networks MultiSegMamba --patch-sizes 16x128x128 24x192x192) &
  (cal $end cal_multi_iso.log isotropic --networks MultiSegMamba --patches 64 96) &
  wait
}
case "$what" in
  first)
    mkdir -p "$plan_root"
    # CPU only: the dataset of the next call, prepared through the test's own fixture (no trainer selected)
    NNUNETV2_MAMBA_TEST_PLAN_GPU_ROOT="$plan_root" timeout 560 python3 -m pytest "$plan_test" -q -m "gpu and e2e" \
      -k prepared > "$out/plan_prepare.log" 2>&1 &
    for dtype in bf16 fp32; do  # torch conv, Triton conv, fused Function (Triton conv)
      for mode in "CONV=0 FUSED=0" "CONV=1 FUSED=0" "CONV=1 FUSED=1"; do
        set -- $mode; echo "== triton $mode, $dtype" >> "$out/layers.log"  # one file: the device returns few
        env NNUNETV2_MAMBA_TRITON_$1 NNUNETV2_MAMBA_TRITON_$2 timeout 70 python3 benchmarks/benchmark_scan.py \
          --shapes 2x2097152x32 --dtype $dtype --steps 5 --warmup 2 --backends triton mamba_ssm >> "$out/layers.log" 2>&1
      done
    done
    for conv in 0 1; do
      NNUNETV2_MAMBA_TRITON_CONV=$conv timeout 50 python3 benchmarks/profile_layer.py --dtype bf16 --backends triton \
        mamba_ssm >> "$out/profiles.log" 2>&1
    done
    grep "^==\|2x2097152x32" "$out/layers.log"; grep "ms in all" "$out/profiles.log"
    left=$((540 - SECONDS))
    # the GPU tests of what changed since the last GPU run (conv kernel, backends, layers); calibration meanwhile
    timeout $left python3 -m pytest tests/nnunetv2_mamba/ssm tests/nnunetv2_mamba/layers -m "gpu and not e2e" -q -rs \
      > "$out/gpu_tests.log" 2>&1 &
    calibrate_missing 540
    wait
    tail -n 3 "$out/gpu_tests.log" "$out/plan_prepare.log"; grep -h "estimate" "$out"/cal_*.log ;;
  plans)  # $PLAN_SELECTION: a pytest -k expression (default: every family)
    NNUNETV2_MAMBA_TEST_PLAN_GPU_ROOT="$plan_root" NNUNETV2_MAMBA_TEST_CONCURRENT_GB=128 nnUNet_n_proc_DA=4 \
      timeout 560 python3 -m pytest "$plan_test" -q -rs -s -m "gpu and e2e" ${PLAN_SELECTION:+-k "$PLAN_SELECTION"} \
      > "$out/plan_gpu.log" 2>&1
    plan_report 40 ;;
  calibrate)
    calibrate_missing ${CAL_DEADLINE:-540}; grep -h "estimate" "$out"/cal_*.log ;;
  finish)  # MultiSegMamba's two plans alone on the CPUs (dataset first); meanwhile the GPU tests of the scan backends
    # and layers, then MultiSegMamba's isotropic calibration with few CPU threads (its CPU probe stalled beside the
    # dataset preparation on 2026-12-02, fourth session)
    NNUNETV2_MAMBA_TEST_PLAN_GPU_ROOT="$plan_root" NNUNETV2_MAMBA_TEST_CONCURRENT_GB=64 nnUNet_n_proc_DA=4 \
      timeout 540 python3 -m pytest "$plan_test" -q -rs -s -m "gpu and e2e" -k MultiSegMamba \
      > "$out/plan_gpu.log" 2>&1 &
    (for dtype in bf16 fp32; do  # the layer as it now is (Triton conv by default, no copies) vs mamba_ssm
       timeout 60 python3 benchmarks/benchmark_scan.py --shapes 2x2097152x32 --dtype $dtype --steps 5 --warmup 2 \
         --backends triton mamba_ssm >> "$out/layers.log" 2>&1
     done
     timeout 200 python3 -m pytest tests/nnunetv2_mamba/ssm tests/nnunetv2_mamba/layers -m "gpu and not e2e" -q -rs \
       > "$out/gpu_tests.log" 2>&1
     OMP_NUM_THREADS=4 cal 530 cal_multi_iso.log isotropic --networks MultiSegMamba --patches 64 96) &
    wait
    grep "2x2097152x32" "$out/layers.log"; tail -n 3 "$out/gpu_tests.log"; grep -h "estimate" "$out"/cal_*.log
    plan_report 10 ;;
  finish24)  # MultiSegMamba's 24 GB plan alone (its planner was killed beside the 40 GB run in `finish`), and its
    # anisotropic calibration at 32x256x256 on the GPU meanwhile
    NNUNETV2_MAMBA_TEST_PLAN_GPU_ROOT="$plan_root" NNUNETV2_MAMBA_TEST_PLAN_BUDGETS=24 nnUNet_n_proc_DA=4 \
      timeout 420 python3 -m pytest "$plan_test" -q -rs -s -m "gpu and e2e" -k MultiSegMamba \
      > "$out/plan_gpu.log" 2>&1 &
    (timeout 60 python3 benchmarks/profile_layer.py --dtype bf16 --backends triton mamba_ssm > "$out/profiles.log" 2>&1
     OMP_NUM_THREADS=4 cal 400 cal_multi.log anisotropic --networks MultiSegMamba --patch-sizes 32x256x256) &
    wait
    grep -h "estimate" "$out"/cal_*.log; grep "ms in all" "$out/profiles.log"
    plan_report 10 ;;
  last)  # MultiSegMamba's two plans (dataset made first) while the missing calibration runs
    NNUNETV2_MAMBA_TEST_PLAN_GPU_ROOT="$plan_root" NNUNETV2_MAMBA_TEST_CONCURRENT_GB=64 nnUNet_n_proc_DA=4 \
      timeout $((${CAL_DEADLINE:-430} + 60)) python3 -m pytest "$plan_test" -q -rs -s -m "gpu and e2e" -k MultiSegMamba \
      > "$out/plan_gpu.log" 2>&1 &
    calibrate_missing ${CAL_DEADLINE:-430}; wait
    plan_report 10
    grep -h "estimate\|Error" "$out"/cal_*.log | cut -c1-200 ;;
  kernels)  # GPU tests of the Triton scan; its kernels per tiling / layout / dtype (benchmarks/triton_kernels.py;
    # $KERNEL_CASES replaces the default cases); the same for the code in .gpu/baseline (an older nnunetv2_mamba, e.g.
    # `git archive COMMIT nnunetv2_mamba | tar -x -C .gpu/baseline`) when it is there; then the layer, both codes
    timeout 200 python3 -m pytest tests/nnunetv2_mamba/ssm/test_triton_scan_gpu.py -q -rs -x > "$out/gpu_tests.log" 2>&1
    tail -n 3 "$out/gpu_tests.log"
    timeout 240 python3 benchmarks/triton_kernels.py --cases ${KERNEL_CASES:-bf16:bld:4:1 bf16:bdl:4:1 \
      fp32:bld:4:1} > "$out/kernels.log" 2>&1
    grep "FAIL\|^|" "$out/kernels.log"
    baseline=$PWD/.gpu/baseline; [ -d "$baseline/nnunetv2_mamba" ] || baseline=
    if [ -n "$baseline" ]; then
      PYTHONPATH=$baseline:${PYTHONPATH:-} timeout 60 python3 benchmarks/triton_kernels.py --cases bf16:bld:4:1 fp32:bld:4:1 \
        > "$out/kernels_baseline.log" 2>&1
      grep "FAIL\|^| [bf]" "$out/kernels_baseline.log" | sed 's/^/baseline /'
    fi
    for code in $baseline "$PWD"; do
      for dtype in bf16 fp32; do
        echo "== $code $dtype" >> "$out/layers.log"
        PYTHONPATH=$code:${PYTHONPATH:-} timeout 60 python3 benchmarks/benchmark_scan.py --shapes 2x2097152x32 --dtype $dtype --steps 5 \
          --warmup 2 --backends triton mamba_ssm >> "$out/layers.log" 2>&1
      done
    done
    grep "^==\|2x2097152x32" "$out/layers.log"
    # the automatic choice's evidence: shorter sequences, more channels (bf16, current code); $SKIP_SHAPES=1 skips
    [ -n "${SKIP_SHAPES:-}" ] && exit 0
    timeout 150 python3 benchmarks/benchmark_scan.py --shapes 2x262144x64 2x32768x128 2x4096x256 2x4096x512 \
      --dtype bf16 --steps 5 --warmup 2 --backends triton mamba_ssm > "$out/shapes.log" 2>&1
    grep "^| 2x" "$out/shapes.log" ;;
  networks_triton)  # the d_state-16 networks (the SegMamba family has 128: no triton) on mamba_ssm vs triton, bf16
    # mixers (the default policy); $NETS narrows them
    nets="${NETS:-UMambaEnc UMambaBot LoGVMamba}"
    bench mamba_ssm_bf16_mixers NNUNETV2_MAMBA_BACKEND=mamba_ssm
    bench triton NNUNETV2_MAMBA_BACKEND=triton
    bench auto ;;
  networks_norm)
    timeout 100 python3 -m pytest tests/nnunetv2_mamba/layers/test_instance_norm.py -q -rs -m gpu \
      > "$out/gpu_tests_norm.log" 2>&1
    tail -n 3 "$out/gpu_tests_norm.log"
    nets="${NETS:-UMambaEnc UMambaBot LoGVMamba SegMamba}" BENCH_TIMEOUT=250 bench fast_norm
    nets="${NETS_TORCH_NORM:-UMambaEnc UMambaBot LoGVMamba}" BENCH_TIMEOUT=200 bench torch_norm NNUNETV2_MAMBA_FAST_NORM=0 ;;
  profile)
    timeout 200 python3 benchmarks/profile_network.py --networks ${NETS:-PlainConvUNet UMambaEnc UMambaBot LoGVMamba} \
      > "$out/profile_networks.log" 2>&1
    grep "ms of kernels" "$out/profile_networks.log"
    timeout $((560 - SECONDS)) python3 -m pytest tests -m "gpu and not e2e" -q -rs \
      --deselect tests/nnunetv2_mamba/ssm/test_triton_scan_gpu.py > "$out/gpu_tests_rest.log" 2>&1
    tail -n 5 "$out/gpu_tests_rest.log" ;;
  session7)  # GPU tests of the token LayerNorm and the Mamba layer; its benchmark; the profile (fixed groups) of the
    # U-Mamba networks with it; the channels-last experiment (cuDNN's layout conversions); the network benchmark
    timeout 150 python3 -m pytest tests/nnunetv2_mamba/layers/test_token_layer_norm.py \
      tests/nnunetv2_mamba/layers/test_mamba_gpu.py tests/nnunetv2_mamba/layers/test_precision.py \
      tests/trainers/test_umamba_gpu.py -m "gpu and not e2e" -q -rs > "$out/gpu_tests_token_norm.log" 2>&1
    tail -n 3 "$out/gpu_tests_token_norm.log"
    timeout 60 python3 benchmarks/benchmark_token_norm.py > "$out/token_norm.log" 2>&1; grep "^|" "$out/token_norm.log"
    timeout 120 python3 benchmarks/profile_network.py --networks PlainConvUNet UMambaEnc UMambaBot \
      > "$out/profile_networks.log" 2>&1
    timeout 90 python3 benchmarks/profile_network.py --channels-last --networks PlainConvUNet UMambaBot \
      > "$out/profile_channels_last.log" 2>&1
    grep -h "ms of kernels" "$out/profile_networks.log" "$out/profile_channels_last.log"
    nets="${NETS:-UMambaEnc UMambaBot LoGVMamba}" BENCH_TIMEOUT=$((570 - SECONDS)) bench token_norm ;;
  channels_last)  # GPU tests of both instance norms, the token LayerNorm and the U-Mamba trainers (channels last by
    # default now); profiles; the networks with channels last (the default) and without ($NNUNETV2_MAMBA_CHANNELS_LAST=0)
    timeout 150 python3 -m pytest tests/nnunetv2_mamba/layers/test_instance_norm.py \
      tests/nnunetv2_mamba/layers/test_token_layer_norm.py tests/trainers/test_umamba_gpu.py -m "gpu and not e2e" -q \
      -rs > "$out/gpu_tests_channels_last.log" 2>&1
    tail -n 3 "$out/gpu_tests_channels_last.log"
    timeout 100 python3 benchmarks/profile_network.py --networks PlainConvUNet UMambaBot UMambaEnc \
      > "$out/profile_networks.log" 2>&1
    grep -h "ms of kernels" "$out/profile_networks.log"
    nets="${NETS:-UMambaEnc UMambaBot LoGVMamba SegMamba}" BENCH_TIMEOUT=220 bench channels_last
    nets="UMambaEnc UMambaBot" BENCH_TIMEOUT=$((575 - SECONDS)) bench contiguous NNUNETV2_MAMBA_CHANNELS_LAST=0 ;;
  final)  # the session's last call: every non-e2e GPU test outside the (unchanged) Triton scan file; the networks with
    # channels last (the default now for U-Mamba, LoG-VMamba and the SegMamba family) and without; U-Mamba-Bot's
    # profile if time is left
    timeout 130 python3 -m pytest tests -m "gpu and not e2e" -q -rs \
      --deselect tests/nnunetv2_mamba/ssm/test_triton_scan_gpu.py > "$out/gpu_tests_rest.log" 2>&1
    tail -n 4 "$out/gpu_tests_rest.log"
    nets="${NETS:-UMambaEnc UMambaBot LoGVMamba SegMamba}" BENCH_TIMEOUT=230 bench channels_last
    nets="${NETS_CONTIGUOUS:-UMambaEnc LoGVMamba SegMamba}" BENCH_TIMEOUT=$((520 - SECONDS)) \
      bench contiguous NNUNETV2_MAMBA_CHANNELS_LAST=0
    [ $((575 - SECONDS)) -gt 40 ] && timeout $((575 - SECONDS)) python3 benchmarks/profile_network.py \
      --networks UMambaBot > "$out/profile_networks.log" 2>&1 && grep -h "ms of kernels" "$out/profile_networks.log"
    true ;;
  recalibrate)  # for the next session: the memory points the 2026-12-03 decoder / channels-last changes made stale
    # (DECISIONS.md, "Stale points"): U-Mamba-Enc/Bot and LoG-VMamba at three patches of both topologies (bf16
    # mixers), two streams; then their 128^3 peaks with fp32 mixers (what FP32_MIXER_FACTORS is fitted to)
    (cal 400 cal_recal_iso.log isotropic --networks UMambaEnc UMambaBot LoGVMamba --patches 64 96 128) &
    (cal 400 cal_recal_aniso.log anisotropic --networks UMambaEnc UMambaBot LoGVMamba \
       --patch-sizes 16x128x128 24x192x192 32x256x256) &
    wait
    grep -h "estimate" "$out"/cal_recal_*.log
    nets="UMambaEnc UMambaBot LoGVMamba" BENCH_TIMEOUT=$((570 - SECONDS)) bench fp32_mixers \
      NNUNETV2_MAMBA_MIXER_DTYPE=fp32 ;;
  session8)
    timeout 200 python3 benchmarks/profile_network.py --top 40 --networks ${PROFILE_NETS:-PlainConvUNet TamingResEnc \
      SegMamba BiSegMamba} > "$out/profile_networks.log" 2>&1
    grep -h "ms of kernels" "$out/profile_networks.log"
    if [ -d ../baseline/nnunetv2_mamba ]; then
      PYTHONPATH=$PWD/../baseline:${PYTHONPATH:-} timeout 80 python3 benchmarks/profile_network.py --top 40 \
        --networks SegMamba > "$out/profile_networks_baseline.log" 2>&1
      grep -h "ms of kernels" "$out/profile_networks_baseline.log" | sed 's/^/baseline /'
    fi
    # SegMamba's first two stages (d_state = C): is the automatic choice's length threshold right for d_state 32 / 64?
    timeout 90 python3 benchmarks/benchmark_scan.py --shapes 2x2097152x32x32 2x262144x64x64 2x262144x64x16 --dtype bf16 \
      --steps 5 --warmup 2 --backends triton mamba_ssm > "$out/scan_segmamba_stages.log" 2>&1
    grep "^| 2x" "$out/scan_segmamba_stages.log"
    nets="${NETS:-TamingResEnc SegMamba BiSegMamba SegMambaSkip MultiSegMamba Vivim VivimV3}" \
      BENCH_TIMEOUT=$((570 - SECONDS)) bench session8 ;;
  session8b)  # the Taming and Vivim networks on the code in .gpu/baseline (the before of session8's rows), after the GPU
    # tests of what changed (not beside them: the timings would share the GPU)
    timeout 150 python3 -m pytest tests/nnunetv2_mamba/layers/test_token_layer_norm.py tests/trainers/test_taming_gpu.py \
      tests/network_architectures/test_vivim_gpu.py -m "gpu and not e2e" -q -rs > "$out/gpu_tests_taming.log" 2>&1
    tail -n 3 "$out/gpu_tests_taming.log"
    PYTHONPATH=$PWD/../baseline:${PYTHONPATH:-} python3 -c "import nnunetv2_mamba.network_architectures.taming as t; \
      print('baseline code:', t.__file__)"
    nets="${NETS:-SegMamba BiSegMamba SegMambaSkip MultiSegMamba Vivim VivimV3}" BENCH_TIMEOUT=$((570 - SECONDS)) \
      bench baseline PYTHONPATH=$PWD/../baseline:${PYTHONPATH:-} ;;
  session9)
    timeout 200 python3 -m pytest tests/nnunetv2_mamba/ssm/test_triton_scan_gpu.py \
      tests/nnunetv2_mamba/layers/test_token_layer_norm.py tests/trainers/test_taming_gpu.py \
      tests/network_architectures/test_vivim_gpu.py -m "gpu and not e2e" -q -rs > "$out/gpu_tests.log" 2>&1
    tail -n 3 "$out/gpu_tests.log"
    timeout 150 python3 benchmarks/triton_kernels.py --length 2097152 --channels 64 --d-state 32 --cases \
      ${CASES_32:-bf16:bld:4:1:16 bf16:bld:8:4:16 bf16:bld:4:2:16 bf16:bld:4:8:16 bf16:bld:4:2:8 bf16:bld:4:4:16} \
      > "$out/kernels_32.log" 2>&1
    grep "FAIL\|^|" "$out/kernels_32.log"
    timeout 120 python3 benchmarks/triton_kernels.py --length 262144 --channels 128 --d-state 64 --cases \
      ${CASES_64:-bf16:bld:4:1:16 bf16:bld:4:8:8 bf16:bld:4:8:16 bf16:bld:4:4:8 bf16:bld:4:2:4 bf16:bld:2:1:4 \
      bf16:bld:8:8:16} > "$out/kernels_64.log" 2>&1
    grep "FAIL\|^|" "$out/kernels_64.log"
    timeout 90 python3 benchmarks/benchmark_scan.py --shapes 2x2097152x32x32 2x262144x64x64 2x32768x128x64 \
      --dtype bf16 --steps 5 --warmup 2 --backends triton mamba_ssm > "$out/scan_segmamba_stages.log" 2>&1
    grep "^| 2x" "$out/scan_segmamba_stages.log"
    nets="${NETS:-SegMamba BiSegMamba}" BENCH_TIMEOUT=$(( (570 - SECONDS) / 2 )) bench auto
    nets="${NETS:-SegMamba BiSegMamba}" BENCH_TIMEOUT=$((570 - SECONDS)) bench triton_all \
      NNUNETV2_MAMBA_TRITON_MIN_LENGTH=0 ;;
  session9b)
    timeout 80 python3 benchmarks/triton_kernels.py --length 2097152 --channels 64 --d-state 16 --cases \
      bf16:bld:4:1:16 bf16:bld:4:1/2:16 > "$out/kernels_16.log" 2>&1
    grep "FAIL\|^|" "$out/kernels_16.log"
    timeout 100 python3 benchmarks/triton_kernels.py --length 2097152 --channels 64 --d-state 32 --cases \
      bf16:bld:4:1:16 bf16:bld:4:1/2:16 bf16:bld:4:1/4:16 bf16:bld:8:1/4:16 > "$out/kernels_32.log" 2>&1
    grep "FAIL\|^|" "$out/kernels_32.log"
    timeout 100 python3 benchmarks/triton_kernels.py --length 262144 --channels 128 --d-state 64 --cases \
      bf16:bld:4:1:16 bf16:bld:4:1/8:16 bf16:bld:4:1/4:16 bf16:bld:8:1/8:16 > "$out/kernels_64.log" 2>&1
    grep "FAIL\|^|" "$out/kernels_64.log"
    timeout 60 python3 benchmarks/benchmark_scan.py --shapes 2x2097152x32x32 2x262144x64x64 --dtype bf16 --steps 5 \
      --warmup 2 --backends triton mamba_ssm > "$out/scan_segmamba_stages.log" 2>&1
    grep "^| 2x" "$out/scan_segmamba_stages.log" | grep -v upstream
    nets="${NETS:-SegMamba BiSegMamba}" BENCH_TIMEOUT=150 bench auto
    timeout $((575 - SECONDS)) python3 -m pytest tests/nnunetv2_mamba/ssm/test_triton_scan_gpu.py \
      tests/nnunetv2_mamba/layers/test_token_layer_norm.py tests/trainers/test_taming_gpu.py \
      tests/network_architectures/test_vivim_gpu.py -m "gpu and not e2e" -q -rs \
      -k "larger_states or layer or norm or taming or vivim or Taming or Vivim" > "$out/gpu_tests.log" 2>&1
    tail -n 3 "$out/gpu_tests.log" ;;
  session9c)
    timeout 40 python3 benchmarks/benchmark_scan.py --shapes 2x262144x64x64 --dtype bf16 --steps 5 --warmup 2 \
      --backends triton mamba_ssm > "$out/scan_segmamba_stage1.log" 2>&1
    grep "^| 2x" "$out/scan_segmamba_stage1.log" | grep -v upstream
    nets="${NETS:-BiSegMamba SegMambaSkip}" BENCH_TIMEOUT=190 bench auto
    timeout $((${DEADLINE:-430} - SECONDS)) python3 -m pytest tests/nnunetv2_mamba/ssm/test_triton_scan_gpu.py -m "gpu and not e2e" \
      -q -rs -k "not (larger_states or layer or norm)" > "$out/gpu_tests.log" 2>&1
    tail -n 3 "$out/gpu_tests.log" ;;
  tests)  # every GPU test that is not e2e
    timeout 550 python3 -m pytest tests -m "gpu and not e2e" -q -rs > "$out/gpu_tests_all.log" 2>&1
    tail -n 5 "$out/gpu_tests_all.log" ;;
  networks)
    bench mamba_ssm_fp32_mixers NNUNETV2_MAMBA_BACKEND=mamba_ssm NNUNETV2_MAMBA_MIXER_DTYPE=fp32
    bench mamba_ssm_bf16_mixers NNUNETV2_MAMBA_BACKEND=mamba_ssm
    bench triton NNUNETV2_MAMBA_BACKEND=triton
    bench triton_conv NNUNETV2_MAMBA_BACKEND=triton NNUNETV2_MAMBA_TRITON_CONV=1 ;;
esac
