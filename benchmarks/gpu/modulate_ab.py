"""A/B of adaln_modulate (and gated_residual) on the GPU: genfast's CUDA kernels vs its Triton
kernels vs eager PyTorch, bf16, DiT-XL/2 width, per-sample shift/scale/gate as in a DiT block.

    python -P benchmarks/gpu/modulate_ab.py          # GPU: ~10-20 s; CPU: tiny shapes, a smoke run

Prints ms per call (triton.testing.do_bench, median) and the share of the copy bandwidth measured
in the same run (device-to-device copy of a buffer the size of x: read + write). Bytes counted:
forward reads x, writes out (2 tensors); forward + backward adds reading x and grad and writing
dx (5 tensors; the [B, C] modulation and [B, N] statistics are noise). Gated residual forward +
backward: x, y read, out written, grad and y read, dy written (6). Every backend's output and
gradients are checked against eager first (loose bf16 tolerance: a wrong kernel fails loudly).
On the CPU the same script runs tiny shapes through the C++ and emulated-CUDA kernels and its
timings mean nothing.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

import genfast

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
DT = torch.bfloat16
EPS = 1e-6
SHAPES = [(32, 1024, 1152), (32, 256, 1152)] if GPU else [(2, 70, 1152), (2, 9, 96)]
BACKENDS = ["cuda", "triton"] if GPU else ["cpu", "cuda_emu"]


def bench(fn):
    """Median ms of fn."""
    if GPU:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    t = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return sorted(t)[1] * 1e3


def with_backend(name, fn):
    def run():
        old = os.environ.get("GENFAST_BACKEND")
        if name is not None:
            os.environ["GENFAST_BACKEND"] = name
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("GENFAST_BACKEND", None)
            else:
                os.environ["GENFAST_BACKEND"] = old
    return run


def modulate_eager(x, shift, scale):
    return F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale[:, None]) + shift[:, None]


def gated_eager(x, gate, y):
    return x + gate[:, None] * y


def modulate_genfast(x, shift, scale):
    return genfast.adaln_modulate(x, shift, scale, eps=EPS)


def fwd_bwd(fn, *inputs, g):
    def run():
        out = fn(*inputs)
        return (out, *torch.autograd.grad(out, inputs, g))
    return run


def check(name, got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=6e-2, msg=lambda m: f"{name}: {m}")


def main():
    torch.manual_seed(0)
    rows = []
    for shape in SHAPES:
        b, n, c = shape
        x = torch.randn(shape, device=DEV, dtype=DT).requires_grad_()
        y = torch.randn(shape, device=DEV, dtype=DT).requires_grad_()
        shift, scale, gate = (torch.randn(b, c, device=DEV, dtype=DT).mul_(0.5).requires_grad_() for _ in range(3))
        g = torch.randn(shape, device=DEV, dtype=DT)
        nbytes = x.numel() * x.element_size()
        src, dst = torch.empty_like(x).detach(), torch.empty_like(x).detach()
        copy_ms = bench(lambda: dst.copy_(src))
        copy_bw = 2 * nbytes / copy_ms  # bytes per ms
        tag = "x".join(map(str, shape))
        rows.append((f"copy {tag}", "", copy_ms, 100.0))
        cases = [
            ("modulate fwd", 2, lambda fn: (lambda: fn(x.detach(), shift.detach(), scale.detach())),
             modulate_eager, modulate_genfast),
            ("modulate fwd+bwd", 5, lambda fn: fwd_bwd(fn, x, shift, scale, g=g), modulate_eager, modulate_genfast),
            ("gated fwd+bwd", 6, lambda fn: fwd_bwd(fn, x, gate, y, g=g), gated_eager, genfast.gated_residual),
        ]
        for what, tensors, make, eager, ours in cases:
            want = make(eager)()
            want = want if isinstance(want, tuple) else (want,)
            impls = {"eager": make(eager)}
            for be in BACKENDS:
                impls[f"genfast:{be}"] = with_backend(be, make(ours))
            for name, fn in impls.items():
                try:
                    got = fn()
                    check(f"{what} {tag} {name}", got if isinstance(got, tuple) else (got,), want)
                    ms = bench(fn)
                except Exception as e:  # reported, never dropped
                    rows.append((f"{what} {tag}", name, float("nan"), float("nan")))
                    print(f"{what} {tag} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
                    continue
                rows.append((f"{what} {tag}", name, ms, 100.0 * tensors * nbytes / ms / copy_bw))
    dev = torch.cuda.get_device_name() if GPU else "CPU (smoke run: timings mean nothing)"
    print(f"device: {dev}; torch {torch.__version__}; bf16")
    print(f"{'case':34s} {'impl':16s} {'ms':>9s} {'% copy':>7s}")
    for case, name, ms, pct in rows:
        print(f"{case:34s} {name:16s} {ms:9.4f} {pct:7.1f}")
    return 0 if all(r[2] == r[2] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
