"""Where the time goes on a GPU: torch.profiler tables (host and device time per op) for
  python3 -P benchmarks/gpu/profile.py modulate   adaln_modulate fwd+bwd, bf16 [32, 256, 1152]
  python3 -P benchmarks/gpu/profile.py dit        genfast DiTBlock vs the eager block, bf16 DiT-XL/2,
                                                  256 tokens, forward and forward+backward
  python3 -P benchmarks/gpu/profile.py host       cProfile of the Python side of adaln_modulate,
                                                  gated_residual and attention fwd+bwd (tiny tensors:
                                                  host time only; H200 session 2 measured ~0.35 ms of
                                                  host time per modulate fwd+bwd that this should name)
Prints, per case, the wall time per call (synchronised), the summed device time, and the top ops
by host time and by device time. Needs the installed genfast (run from the repository root)."""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import genfast
import genfast.nn
from genfast import reference


def _wall(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def _report(name, fn, rows=12):
    wall = _wall(fn)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    dev = sum(e.self_device_time_total for e in ev) / 10 / 1e3
    print(f"\n=== {name}: wall {wall:.3f} ms/call, device busy {dev:.3f} ms/call", flush=True)
    print(ev.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60), flush=True)
    print(ev.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60), flush=True)


def modulate():
    x = torch.randn(32, 256, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    shift, scale = (torch.randn(32, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    g = torch.randn_like(x)

    def ours():
        torch.autograd.grad(genfast.adaln_modulate(x, shift, scale), (x, shift, scale), g)

    def eager():
        y = torch.nn.functional.layer_norm(x, (1152,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        torch.autograd.grad(y, (x, shift, scale), g)
    _report("genfast adaln_modulate fwd+bwd", ours)
    _report("eager modulate fwd+bwd", eager)


def dit():
    torch.manual_seed(0)
    ref = reference.DiTBlock(1152, 16).cuda().bfloat16()
    ours = genfast.nn.DiTBlock(1152, 16).cuda().bfloat16()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(32, 256, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    c = torch.randn(32, 1152, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    for name, m in (("genfast", ours), ("eager", ref)):
        with torch.no_grad():
            _report(f"{name} DiT-XL/2 block fwd", lambda: m(x, c))
        _report(f"{name} DiT-XL/2 block fwd+bwd", lambda: torch.autograd.grad(m(x, c), [x, *m.parameters()], g))


def host():
    import cProfile
    import pstats
    dt = torch.bfloat16
    x = torch.randn(2, 8, 64, device="cuda", dtype=dt, requires_grad=True)
    shift, scale, gate = (torch.randn(2, 64, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    q, k, v = (torch.randn(1, 2, 8, 72, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    cases = {
        "adaln_modulate": (lambda: genfast.adaln_modulate(x, shift, scale), (x, shift, scale)),
        "gated_residual": (lambda: genfast.gated_residual(x, gate, x), (x, gate)),
        "attention": (lambda: genfast.attention(q, k, v), (q, k, v)),
    }
    for name, (fn, leaves) in cases.items():
        def step():
            out = fn()
            torch.autograd.grad(out, leaves, torch.ones_like(out))
        print(f"\n=== {name} fwd+bwd, tiny tensors: wall {_wall(step, 200) * 1e3:.1f} us/call", flush=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            step()
        torch.cuda.synchronize()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    {"modulate": modulate, "dit": dit, "host": host}[sys.argv[1] if len(sys.argv) > 1 else "modulate"]()
