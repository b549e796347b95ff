"""Triton adaln_modulate kernels on a GPU, launch parameter by launch parameter (no autotuner):
  python3 -P benchmarks/gpu/modulate_sweep.py
bf16 [32, N, C] with per-sample shift/scale (the DiT case): the forward kernel at every warp count
(C = 384, 1152, 3072: DiT-S, DiT-XL, Flux widths), the per-sample backward at C = 1152 at every
(warps, rows per chunk), each against the copy bandwidth and Liger-Kernel's LayerNorm (when
importable) measured in the same run. Imports kernels/modulate.py
directly (no build needed). On CPU (TRITON_INTERPRET=1) it only checks that it runs."""
import os
import sys

import torch
import triton

sys.path.insert(0, os.getcwd())
from kernels import modulate as km  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.bfloat16


def _time(fn):
    if DEV != "cuda":
        fn()
        return float("nan")
    import triton.testing as tt
    return tt.do_bench(fn, warmup=10, rep=60, return_mode="median")


def main():
    cases = [(256, 1152), (1024, 1152), (1024, 384), (1024, 3072)] if DEV == "cuda" else [(3, 1152), (3, 40)]
    for n, c in cases:
        b = 32 if DEV == "cuda" else 2
        x = torch.randn(b, n, c, device=DEV, dtype=DT)
        shift, scale = (torch.randn(b, c, device=DEV, dtype=DT) * 0.1 for _ in range(2))
        out = torch.empty_like(x)
        mean = torch.empty(b * n, device=DEV, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        strides = (out.stride(0), out.stride(1), x.stride(0), x.stride(1), shift.stride(0), 0, scale.stride(0), 0)
        block = triton.next_power_of_2(c)
        nbytes = 2 * x.numel() * x.element_size()
        copy_ms = _time(lambda: out.copy_(x))
        ref = torch.nn.functional.layer_norm(x.float(), (c,), eps=1e-6) * (1 + scale[:, None].float()) + shift[:, None].float()
        print(f"[{b}, {n}, {c}] bf16: copy {copy_ms:.4f} ms ({nbytes / copy_ms / 1e6:.0f} GB/s)", flush=True)
        try:
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
            w, bias = torch.ones(c, device=DEV, dtype=DT), torch.zeros(c, device=DEV, dtype=DT)
            ms = _time(lambda: LigerLayerNormFunction.apply(x, w, bias, 1e-6))
            print(f"  liger LayerNorm fwd      {ms:.4f} ms  {100 * copy_ms / ms:5.1f} % of copy", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"  liger: {type(e).__name__}: {e}", flush=True)
        for warps in (1, 2, 4, 8, 16):
            if block // (32 * warps) > 128:  # over 128 fp32 values a thread: spills for sure
                continue
            def fwd():
                km.modulate_fwd_kernel[(b * n,)](out, x, shift, scale, mean, rstd, n, c, *strides, 1e-6,
                                                 HAS_SHIFT=True, RMS=False, STATS=True, BLOCK_C=block, BF16_RTNE=False,
                                                 num_warps=warps)
            ms = _time(fwd)
            err = (out.float() - ref).abs().max().item()
            print(f"  triton fwd warps={warps:2d}      {ms:.4f} ms  {100 * copy_ms / ms:5.1f} % of copy  err {err:.3g}",
                  flush=True)
        if c != 1152:
            continue
        g = torch.randn_like(x)
        dx = torch.empty_like(x)
        dshift, dscale = torch.empty_like(shift), torch.empty_like(scale)
        bstr = (dx.stride(0), dx.stride(1), g.stride(0), g.stride(1), x.stride(0), x.stride(1), scale.stride(0), 0)
        bwd_bytes = 3 * x.numel() * x.element_size()
        for warps in (4, 8, 16):
            for rows in (4, 8, 16, 32):
                nchunks = triton.cdiv(n, rows)
                partial = torch.empty(b, nchunks, 2, c, device=DEV, dtype=torch.float32)

                def bwd():
                    km.modulate_bwd_kernel[(nchunks, b)](dx, x, x, partial, g, x, scale, mean, rstd, n, c, *bstr, rows,
                                                         HAS_DX=True, HAS_DSHIFT=True, HAS_DSCALE=True, PER_SAMPLE=True,
                                                         RMS=False, BLOCK_C=block, BF16_RTNE=False, num_warps=warps)
                    km._reduce(dscale, partial, b, nchunks, 2 * c, c)
                    km._reduce(dshift, partial[:, :, 1], b, nchunks, 2 * c, c)
                ms = _time(bwd)
                print(f"  triton bwd warps={warps:2d} rows={rows:2d} {ms:.4f} ms  {100 * copy_ms * bwd_bytes / nbytes / ms:5.1f} % of "
                      f"copy (3 streams)", flush=True)


if __name__ == "__main__":
    main()
