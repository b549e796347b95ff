"""The ahead-of-time compile list of kernels/attention.py (its AOT_CONFIGS, for
genfast/devtools/gpu_compile.py; format of kernels/flow_step.py): the default (first surviving)
config of each kernel at head dims 64, 80 (split 64 + 32) and 128 in bf16, plus fp32 (IEEE dots)
at 64, with causal and the key mask on (the heaviest variant)."""
from . import attention as ka  # imported from the end of kernels/attention.py: everything it names exists

_STRIDES = ("sqb", "sqh", "sqm", "sqd", "skb", "skh", "skn", "skd", "svb", "svh", "svn", "svd", "msk_b", "msk_n")
_SIZES = ("BH", "H", "nq", "nk")


def _aot(kind, dtype, d, causal=True, masked=True):
    kernel, ptrs, scalars, cfg = {
        "fwd": (ka.attn_fwd_kernel, ("q_ptr", "k_ptr", "v_ptr", "mask_ptr", "out_ptr", "lse_ptr"), ("qk_scale",), ka.FWD_CONFIGS),
        "dkdv": (ka.attn_bwd_dkdv_kernel, ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "mask_ptr", "lse_ptr", "delta_ptr", "dk_ptr", "dv_ptr"),
                 ("qk_scale", "scale"), ka.BWD_CONFIGS),
        "dq": (ka.attn_bwd_dq_kernel, ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "mask_ptr", "lse_ptr", "delta_ptr", "dq_ptr"),
               ("qk_scale", "scale"), ka.BWD_CONFIGS),
    }[kind]
    sig = {p: ("*u8" if p == "mask_ptr" else "*fp32" if p in ("lse_ptr", "delta_ptr") else f"*{dtype}") for p in ptrs}
    # The head-dim and mask strides are 1 in every real launch, where Triton specialises a 1 into a
    # constant (contiguous, vectorised loads): the same here, or the figures describe per-element
    # 64-bit address math no launch does.
    unit = ("sqd", "skd", "svd", "msk_n")
    sig.update({n: "i32" for n in _STRIDES + _SIZES + (("sob", "soh", "som") if kind == "fwd" else ()) if n not in unit})
    sig.update({n: "fp32" for n in scalars})
    block_d, block_d2 = ka.head_dim_blocks(d)
    block_m, block_n, num_warps, num_stages = ka._survivors(cfg, block_d + block_d2, dtype == "fp32")[0]
    return {
        "name": f"attention_{kind}[{dtype},D={d},{'causal,' if causal else ''}{'mask' if masked else 'nomask'}]",
        "kernel": kernel,
        "signature": sig,
        "constexprs": {**{n: 1 for n in unit}, "CAUSAL": causal, "HAS_MASK": masked, "BLOCK_M": block_m, "BLOCK_N": block_n,
                       "D": d, "BLOCK_D": block_d, "BLOCK_D2": block_d2, "DOT_F32": False,
                       "PREC": "ieee" if dtype == "fp32" else "tf32", "BF16_RTNE": False},
        "divisible_by_16": [p for p in ptrs if p != "mask_ptr"] + ["sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn"]
        + (["sob", "som"] if kind == "fwd" else []),
        "num_warps": num_warps,
        "num_stages": num_stages,
        **({"allow_spills": _ALLOW_SPILLS[(kind, dtype, d)]} if (kind, dtype, d) in _ALLOW_SPILLS else {}),
    }


# Spills measured by genfast/devtools/gpu_compile.py (Triton 3.6 and 3.9) and accepted, with why.
# sm_90 is spill-free for every 16-bit entry but the 64 + 32 dk/dv; sm_80 (mma v2 needs more
# registers) spills a few bytes at 255 registers. To revisit with an A100 lent (autotune picks
# among the other configs anyway).
_ALLOW_SPILLS = {
    ("dkdv", "fp32", 64): "fp32 (IEEE) dk/dv: fp32 operand tiles of four dots on FMA units; a correctness "
                          "path, bf16/fp16 are the fast GPU paths",
    ("fwd", "bf16", 128): "sm_80 under Triton 3.6 only: 32 B at 255 registers (3.9 and sm_90: none); "
                          "to tune on an A100",
    **{("fwd", dt, 80): "sm_80 under Triton 3.6 only: 4 B at 255 registers (3.9 and sm_90: none); to tune on "
                        "an A100" for dt in ("bf16", "fp16")},
    ("dkdv", "bf16", 80): "64 + 32 split at the default (64, 32, 8, 2) tile with causal + mask, Triton 3.9: "
                          "sm_80 8 B, sm_90 224 B at 255 registers (3.6: 64 B, 92 B); the autotuner picks among faster tiles",
    ("dkdv", "bf16", 128): "sm_80 under Triton 3.9 only: 24 B at the default (64, 32, 8, 2) tile; to tune on an A100",
}


# fp16 compiles to the same registers as bf16 (checked): one fp16 entry keeps it covered, and
# the list small enough for CI's 2-core compile budget.
# Head dim 80 stands for the 64 + 32 split in 16 bits (72 compiles the same tiles with another column
# mask; the aligned-row copies give it 16-divisible strides, as here).
def aot_configs():
    return (
        [_aot(kind, "bf16", d) for kind in ("fwd", "dkdv", "dq") for d in (64, 80, 128)]
        + [_aot("fwd", "fp16", 80), _aot("fwd", "bf16", 96)]
        + [_aot(kind, "fp32", 64) for kind in ("fwd", "dkdv", "dq")]
        + [_aot("fwd", "bf16", 80, causal=False, masked=False)]
    )
