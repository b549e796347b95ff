"""Where the host time of a custom op's forward+backward goes on a GPU: tiny tensors (the GPU idles),
back-to-back calls, one sync at the end, microseconds per call. Each line isolates one piece:
  python3 -P benchmarks/gpu/host_overhead.py
The pieces: autograd's device thread (a plain aten op's fwd+bwd), a Python autograd.Function node
(forward and backward in Python around one aten op), the same with autograd multithreading off
(backward on the calling thread), genfast's modulate / gated residual against eager, and the small
calls the launch path makes (stream query, allocation, a bare compiled-module launch)."""
import time

import torch

import genfast

DEV = "cuda"


def per_call(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


class Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def main():
    dt = torch.bfloat16
    x = torch.randn(2, 8, 64, device=DEV, dtype=dt, requires_grad=True)
    shift, scale, gate = (torch.randn(2, 64, device=DEV, dtype=dt, requires_grad=True) for _ in range(3))
    g = torch.ones_like(x)

    def eager_mod():
        return torch.nn.functional.layer_norm(x, (64,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def grad(out, leaves):
        return torch.autograd.grad(out, leaves, g)
    from genfast.ops import modulate as m
    cases = {
        "aten x*2 fwd": lambda: x * 2,
        "aten x*2 fwd+bwd": lambda: grad(x * 2, (x,)),
        "py Function x*2 fwd": lambda: Twice.apply(x),
        "py Function x*2 fwd+bwd": lambda: grad(Twice.apply(x), (x,)),
        "eager modulate fwd": eager_mod,
        "genfast modulate fwd": lambda: genfast.adaln_modulate(x, shift, scale),
        "eager modulate fwd+bwd": lambda: grad(eager_mod(), (x, shift, scale)),
        "genfast modulate fwd+bwd": lambda: grad(genfast.adaln_modulate(x, shift, scale), (x, shift, scale)),
        "eager gated fwd+bwd": lambda: grad(x + gate[:, None] * x, (x, gate)),
        "genfast gated fwd+bwd": lambda: grad(genfast.gated_residual(x, gate, x), (x, gate)),
        "torch.cuda.current_stream().cuda_stream": lambda: torch.cuda.current_stream(x.device).cuda_stream,
        "torch._C._cuda_getCurrentRawStream": lambda: torch._C._cuda_getCurrentRawStream(0),
        "torch.empty cuda [2,8]": lambda: torch.empty(2, 8, device=DEV),
        "x*2 under no_grad": lambda: torch.mul(x.detach(), 2),
        "modulate backend_for": lambda: m.backend_for(x),
        "modulate _modulate_impl (fwd, no autograd)": lambda: m._modulate_impl(x, shift[:, None], scale[:, None],
                                                                               1e-6, False),
    }
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; us per call (tiny tensors)")
    for name, fn in cases.items():
        print(f"{name:48s} {per_call(fn):8.1f}", flush=True)
    torch.autograd.set_multithreading_enabled(False)
    print("-- autograd multithreading off (backward on the calling thread)")
    for name in ("aten x*2 fwd+bwd", "py Function x*2 fwd+bwd", "eager modulate fwd+bwd",
                 "genfast modulate fwd+bwd", "eager gated fwd+bwd", "genfast gated fwd+bwd"):
        print(f"{name:48s} {per_call(cases[name]):8.1f}", flush=True)
    torch.autograd.set_multithreading_enabled(True)


if __name__ == "__main__":
    main()
