"""Compile the Triton scan and causal-conv kernels for sm_90 without a GPU and report registers, spills and, with
``--sass``, the instruction mix of the machine code (cuobjdump -sass).

    python benchmarks/triton_registers.py [--sass] [--d-state 32]

Triton compiles for a GPU target it is given (no device needed); ptxas and cuobjdump ship with Triton. Used to
check a rewrite of the kernels before spending device time (TRITON_NOTES.md): the scan kernels are bound by the
instructions they issue, and warp shuffles (SHFL, a quarter of the FMA rate) and MUFU (exp2, an eighth) cost most.
The scan kernels compile with the tiling the scan uses at ``--d-state`` (``TILINGS``, default 16;
``$NNUNETV2_MAMBA_TRITON_TILING`` forces another): spills are a hint, not the verdict (DECISIONS.md: the spill-free
tilings at d_state 32 / 64 were slower on the GPU)."""
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nnunetv2_mamba.ssm.backends import triton_conv as tc
from nnunetv2_mamba.ssm.backends import triton_scan as ts

D_STATE = int(sys.argv[sys.argv.index("--d-state") + 1]) if "--d-state" in sys.argv else 16
CHUNK, BLOCK_D, SCAN_WARPS, GRAD_WARPS = ts.tiling_for(D_STATE)
common = dict(N=D_STATE, N_PAD=triton.next_power_of_2(D_STATE), T=CHUNK, BLOCK_D=BLOCK_D)
SASS_CLASSES = ("FFMA", "FMUL", "FADD", "MUFU", "SHFL", "LDG", "STG", "LDS", "STS", "BAR")


def signature(fn, consts):
    """Pointers (``*_ptr``) as fp32, constexprs as given, every other argument an i32."""
    return {name: "constexpr" if name in consts else "*fp32" if name.endswith("_ptr") else "i32"
            for name in fn.arg_names}


def instruction_mix(cubin: bytes, tools: str) -> collections.Counter:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    mix = collections.Counter()
    for line in sass.splitlines():
        match = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if match:
            mix[match.group(2)] += 1
    return mix


kernels = {
 "end_state": (ts._segment_end_state_kernel, dict(B_VARIABLE=True, HAS_BIAS=True, SOFTPLUS=True, WRITE_LOCAL=False, **common)),
 "end_local": (ts._segment_end_state_kernel, dict(B_VARIABLE=True, HAS_BIAS=True, SOFTPLUS=True, WRITE_LOCAL=True, **common)),
 "output": (ts._segment_output_kernel, dict(B_VARIABLE=True, C_VARIABLE=True, HAS_BIAS=True, SOFTPLUS=True, HAS_D=True, HAS_Z=True, **common)),
 "adjoint": (ts._segment_adjoint_kernel, dict(C_VARIABLE=True, HAS_BIAS=True, SOFTPLUS=True, HAS_Z=True, **common)),
 "grad": (ts._chunk_grad_kernel, dict(B_VARIABLE=True, C_VARIABLE=True, HAS_BIAS=True, SOFTPLUS=True, HAS_D=True, HAS_Z=True, BC_ATOMIC=False, **common)),
}
kernels["conv_fwd"] = (tc._causal_conv_forward_kernel, dict(WIDTH=4, HAS_BIAS=True, BLOCK_L=tc.BLOCK_L,
                                                            BLOCK_D=tc.BLOCK_D))
kernels["conv_bwd"] = (tc._causal_conv_backward_kernel, dict(WIDTH=4, WIDTH_PAD=4, HAS_BIAS=True, BLOCK_D=tc.BLOCK_D,
                                                             BLOCK_L=tc.BACKWARD_BLOCK_L, TILES=tc.BACKWARD_TILES))
from nnunetv2_mamba.layers import triton_norm as tnorm  # noqa: E402

kernels["norm_stats"] = (tnorm._instance_norm_stats_kernel, dict(BLOCK=tnorm.BLOCK))
kernels["norm_apply"] = (tnorm._instance_norm_apply_kernel, dict(SPLITS_PAD=64, BLOCK=tnorm.BLOCK, AFFINE=True))
kernels["norm_gsums"] = (tnorm._instance_norm_grad_sums_kernel, dict(BLOCK=tnorm.BLOCK))
kernels["norm_gin"] = (tnorm._instance_norm_grad_input_kernel, dict(SPLITS_PAD=64, BLOCK=tnorm.BLOCK, AFFINE=True))
from nnunetv2_mamba.layers import triton_token_norm as ttn  # noqa: E402

kernels["token_norm_fwd"] = (ttn._token_norm_forward_kernel, dict(BLOCK_L=128, C_PAD=32, AFFINE=True))
kernels["token_norm_bwd"] = (ttn._token_norm_backward_kernel, dict(BLOCK_L=128, C_PAD=32, AFFINE=True))
from nnunetv2_mamba.layers import triton_norm_channels_last as tncl  # noqa: E402

kernels["norm_cl_stats"] = (tncl._norm_cl_stats_kernel, dict(BLOCK_M=64, C_PAD=32))
kernels["norm_cl_apply"] = (tncl._norm_cl_apply_kernel, dict(SPLITS_PAD=256, BLOCK_M=64, C_PAD=32, AFFINE=True))
kernels["norm_cl_gsums"] = (tncl._norm_cl_grad_sums_kernel, dict(BLOCK_M=64, C_PAD=32))
kernels["norm_cl_gin"] = (tncl._norm_cl_grad_input_kernel, dict(SPLITS_PAD=256, BLOCK_M=64, C_PAD=32, AFFINE=True))
# triton_conv launches with Triton's default; the norm with its WARPS; the scan kernels with the tiling's
warps = {"end_state": SCAN_WARPS, "end_local": SCAN_WARPS, "output": SCAN_WARPS, "adjoint": SCAN_WARPS,
         "grad": GRAD_WARPS,
         "conv_fwd": 4, "conv_bwd": 4, "token_norm_fwd": 4, "token_norm_bwd": 4, **{name: tnorm.WARPS for name in kernels if name.startswith("norm_")}}
warps.update({name: tncl.WARPS for name in kernels if name.startswith("norm_cl_")})
tools = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
print(f"triton {triton.__version__}, sm_90; scan kernels at d_state {D_STATE}: {CHUNK} tokens per chunk, "
      f"{BLOCK_D} channels per tile, {SCAN_WARPS} warp(s), gradient kernel {GRAD_WARPS}")
for name, (fn, consts) in kernels.items():
    src = ASTSource(fn=fn, signature=signature(fn, consts), constexprs=dict(consts))
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps.get(name, 1)})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    out = subprocess.run([os.path.join(tools, "ptxas"), "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"],
                         capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", out.stderr); spill = re.search(r"(\d+) bytes spill stores", out.stderr)
    line = (f"{name:<10} registers {regs.group(1) if regs else '?':>4}  spill stores {spill.group(1) if spill else '?':>4} B  "
            f"ptx lines {compiled.asm['ptx'].count(chr(10))}")
    if "--sass" in sys.argv:
        mix = instruction_mix(compiled.asm["cubin"], tools)
        line += f"  sass {sum(mix.values())}: " + " ".join(f"{op} {mix[op]}" for op in SASS_CLASSES)
    print(line, flush=True)
