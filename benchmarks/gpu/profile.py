"""Where the time goes on a GPU: torch.profiler tables (host and device time per op) for
  python3 -P benchmarks/gpu/profile.py modulate   adaln_modulate fwd+bwd, bf16 [32, 256, 1152]
  python3 -P benchmarks/gpu/profile.py dit        genfast DiTBlock vs the eager block, bf16 DiT-XL/2,
                                                  256 tokens, forward and forward+backward
  python3 -P benchmarks/gpu/profile.py kernels    the fused DiTBlock's fwd+bwd kernel by kernel; fused vs
                                                  per-op vs eager wall time, autograd threads on / off
  python3 -P benchmarks/gpu/profile.py chunks     modulate / gated backward per CHUNK_ROWS (32, 16, 8); run it
                                                  also with GENFAST_MODULATE_BWD_PRELOAD=0 (old load order)
  python3 -P benchmarks/gpu/profile.py big        fused DiT-XL/2 block fwd+bwd at 1024 tokens per CHUNK_ROWS
  python3 -P benchmarks/gpu/profile.py fusions    session 8's untimed changes, each on / off: the bias gradients
                                                  from the gated / GELU backwards, dx1's add inside the modulate
                                                  backward (DiT-XL/2 fwd+bwd, 256 and 1024 tokens, interleaved
                                                  rounds; and each kernel pair alone), the modulate forward's
                                                  bandwidth; run it also with GENFAST_MODULATE_FWD_PRELOAD=0
                                                  GENFAST_MODULATE_BWD_PRELOAD=0 (the old load orders)
  python3 -P benchmarks/gpu/profile.py modab      the modulate kernels per load order (forward: a row a warp with /
                                                  without preload, streamed 2-16 rows a warp; backward: old order,
                                                  a row at a time, a row ahead; the async forward), TB/s and %
                                                  of a same-size copy
  python3 -P benchmarks/gpu/profile.py modfwd     the forward's walking kernels: streaming vs asynchronous
                                                  (GENFAST_MODULATE_FWD_ASYNC=0 / 1, cp.async 3 rows ahead), rows a warp
  python3 -P benchmarks/gpu/profile.py threads    a Python node's per-op cost with autograd's device thread on / off
  python3 -P benchmarks/gpu/profile.py host       cProfile of the Python side of adaln_modulate,
                                                  gated_residual and attention fwd+bwd (tiny tensors:
                                                  host time only; H200 session 2 measured ~0.35 ms of
                                                  host time per modulate fwd+bwd that this should name)
  python3 -P benchmarks/gpu/profile.py overhead   host time piece by piece, tiny tensors, us per call:
                                                  autograd's device thread (aten op fwd+bwd), a Python
                                                  autograd.Function, the same with autograd multithreading
                                                  off, genfast modulate / gated vs eager, stream query,
                                                  allocation (H200 session 3: benchmarks/gpu/NOTES.md)
  python3 -P benchmarks/gpu/profile.py kl         reparam_kl fwd and fwd+bwd at [64, 16, 64, 64] fp32, mu / logvar
                                                  two halves of one encoder output (the harness's case: 7 % of
                                                  copy on the H200, session 17), against randn_like alone
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


def _report(name, fn, rows=12, tables=("self_cpu_time_total", "self_device_time_total")):
    wall = _wall(fn)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    dev = sum(e.self_device_time_total for e in ev) / 10 / 1e3
    print(f"\n=== {name}: wall {wall:.3f} ms/call, device busy {dev:.3f} ms/call", flush=True)
    for key in tables:
        print(ev.table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)


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


def _dit_case(tokens=256):
    """(genfast block, eager block with the same weights, x, c, grad): bf16 DiT-XL/2, batch 32."""
    torch.manual_seed(0)
    ref = reference.DiTBlock(1152, 16).cuda().bfloat16()
    ours = genfast.nn.DiTBlock(1152, 16).cuda().bfloat16()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(32, tokens, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    c = torch.randn(32, 1152, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    return ours, ref, x, c, g


def dit():
    ours, ref, x, c, g = _dit_case()
    for name, m in (("genfast", ours), ("eager", ref)):
        with torch.no_grad():
            _report(f"{name} DiT-XL/2 block fwd", lambda: m(x, c))
        _report(f"{name} DiT-XL/2 block fwd+bwd", lambda: torch.autograd.grad(m(x, c), [x, *m.parameters()], g))


def kernels():
    """The fused DiT-XL/2 block (256 tokens): wall time of fused vs per-op vs eager, autograd threads
    on / off (_dit_threads), inference with and without the GELU epilogue; column-sum ways; then the
    fused forward+backward kernel by kernel (device time) and a chrome trace of 3 steps
    ($OUT/dit_trace.json.gz) to read the GPU's idle gaps from."""
    import gzip
    import os
    from genfast.ops import dit_block
    e = torch.zeros(0, 2, 16, 32, device="cuda", dtype=torch.float16)
    print("torch SDPA over an empty fp16 batch returns", type(torch.nn.functional.scaled_dot_product_attention(e, e, e)))
    ours, ref, x, c, g = _dit_case()
    step = lambda: torch.autograd.grad(ours(x, c), [x, *ours.parameters()], g)  # noqa: E731
    _dit_threads()
    with torch.no_grad():
        for name, m, fused, epilogue in (("fused, GELU epilogue", ours, True, True), ("fused", ours, True, False),
                                         ("per-op", ours, False, False), ("eager", ref, True, True)):
            dit_block.USE_FUSED["cuda"], dit_block.EPILOGUE_GELU = fused, epilogue
            print(f"DiT-XL/2 block fwd (no grad) 256 tokens, {name:22s} {_wall(lambda: m(x, c), 50):8.3f} ms", flush=True)
    dit_block.USE_FUSED["cuda"], dit_block.EPILOGUE_GELU = True, True
    for cols in (1152, 3456, 4608):
        dy = torch.randn(8192, cols, device="cuda", dtype=torch.bfloat16)
        ones = torch.ones(8192, device="cuda", dtype=torch.bfloat16)
        t_sum, t_mv = _wall(lambda: dy.sum(0), 200), _wall(lambda: torch.mv(dy.t(), ones), 200)
        err = (torch.mv(dy.t(), ones).float() - dy.double().sum(0)).abs().max().item()
        print(f"column sums of [8192, {cols}] bf16: sum(0) {t_sum * 1e3:6.1f} us, mv(dy^T, ones) {t_mv * 1e3:6.1f} us "
              f"(mv max err vs fp64 {err:.3g}, sum {(dy.sum(0).double() - dy.double().sum(0)).abs().max().item():.3g})")
    _report("genfast fused DiT-XL/2 block fwd+bwd", step, rows=45, tables=("self_device_time_total",))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    path = os.path.join(os.environ.get("OUT", "."), "dit_trace.json")
    prof.export_chrome_trace(path)
    with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as z:
        z.write(f.read())
    os.remove(path)


def chunks():
    """A/B of the rows per partial sum of a per-sample gradient (genfast.ops.modulate.CHUNK_ROWS, passed to
    the kernels at each call): adaln_modulate and gated_residual backward alone, bf16, DiT-XL/2 widths."""
    from genfast.ops import modulate as mod
    for n in (256, 1024):
        x = torch.randn(32, n, 1152, device="cuda", dtype=torch.bfloat16)
        shift, scale, gate = (torch.randn(32, 1, 1152, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        g = torch.randn_like(x)
        _, mean, rstd = mod._modulate_impl(x, shift, scale, 1e-6, False)
        for rows in (32, 16, 8):
            mod.CHUNK_ROWS = rows
            t_mod = _wall(lambda: mod._modulate_bwd_impl(g, x, shift, scale, mean, rstd, 1e-6, False, [True, True, True]), 200)
            t_gate = _wall(lambda: mod._gated_bwd_impl(g, gate, x, [True, True]), 200)
            print(f"[32, {n}, 1152] CHUNK_ROWS {rows:2d}: modulate bwd {t_mod * 1e3:6.1f} us, gated bwd {t_gate * 1e3:6.1f} us "
                  f"(moving {3 * x.numel() * 2 / 1e6:.0f} MB each: {3 * x.numel() * 2 / t_mod / 1e9:.2f} / "
                  f"{3 * x.numel() * 2 / t_gate / 1e9:.2f} TB/s)", flush=True)
        mod.CHUNK_ROWS = 32


def big():
    """The fused DiT-XL/2 block at 1024 tokens (GPU-bound): fwd+bwd per CHUNK_ROWS, per-op and eager, ms.
    (Session 7 also A/B'd the bias gradients as cuBLAS dy^T @ ones here: no faster than torch's sum.)"""
    from genfast.ops import dit_block, modulate as mod
    ours, ref, x, c, g = _dit_case(1024)
    for name, m, fused, rows in (("fused/32", ours, True, 32), ("fused/16", ours, True, 16), ("per-op", ours, False, 32),
                                 ("eager", ref, True, 32)):
        dit_block.USE_FUSED["cuda"], mod.CHUNK_ROWS = fused, rows
        ms = _wall(lambda: torch.autograd.grad(m(x, c), [x, *m.parameters()], g), 30)
        print(f"DiT-XL/2 block fwd+bwd 1024 tokens, {name:14s} {ms:8.3f} ms", flush=True)
    dit_block.USE_FUSED["cuda"], mod.CHUNK_ROWS = True, 32


def fusions():
    """A/B of the gradient fusions (genfast.ops.dit_block flags) in the fused DiT-XL/2 block, and of each
    fused kernel against the pair of launches it replaces; the modulate forward / backward at [32, 1024,
    1152] (the preload switches are read once per process: compare two runs)."""
    import statistics
    from genfast.ops import dit_block, gelu as gelu_ops, modulate as mod
    flags = ("BIAS_IN_GATED", "GELU_BIAS_IN_BWD", "QKV_BIAS_ONE_PASS")
    configs = {"all on": {}, "no bias-in-gated": {"BIAS_IN_GATED": False}, "no gelu-bias": {"GELU_BIAS_IN_BWD": False},
               "no qkv-bias-one-pass": {"QKV_BIAS_ONE_PASS": False}, "no add-in-modulate": {"ADD_IN_MODULATE": False},
               "all off (s7)": {"BIAS_IN_GATED": False, "GELU_BIAS_IN_BWD": False, "QKV_BIAS_ONE_PASS": False,
                                "ADD_IN_MODULATE": False}}

    def apply(cfg):
        for f in flags:
            getattr(dit_block, f)["cuda"] = cfg.get(f, True)
        dit_block.ADD_IN_MODULATE = cfg.get("ADD_IN_MODULATE", True)

    for tokens, rounds in ((256, 5), (1024, 3)):
        ours, ref, x, c, g = _dit_case(tokens)
        times = {k: [] for k in (*configs, "eager")}
        for _ in range(rounds):  # interleaved: host / clock drift hits every config alike
            for name, cfg in configs.items():
                apply(cfg)
                times[name].append(_wall(lambda: torch.autograd.grad(ours(x, c), [x, *ours.parameters()], g), 20))
            times["eager"].append(_wall(lambda: torch.autograd.grad(ref(x, c), [x, *ref.parameters()], g), 20))
        apply({})
        for name, ts in times.items():
            print(f"DiT-XL/2 fwd+bwd {tokens:4d} tokens, {name:20s} median {statistics.median(ts):7.3f} ms "
                  f"(rounds {' '.join(f'{t:.3f}' for t in ts)})", flush=True)
    m, ch = 32 * 1024, 1152
    x = torch.randn(32, 1024, ch, device="cuda", dtype=torch.bfloat16)
    shift, scale, gate = (torch.randn(32, 1, ch, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    gr = torch.randn_like(x)
    _, mean, rstd = mod._modulate_impl(x, shift, scale, 1e-6, False)
    h, da = (torch.randn(m, 4 * ch, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dq, dk, dv = (torch.randn(m, ch, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    pairs = {
        "gated bwd + bias": (lambda: mod.gated_bwd(gr, gate, x, True, True, True),
                             lambda: mod.gated_bwd(gr, gate, x, True, True)[0].view(m, ch).sum(0)),
        "gelu bwd + bias [32768, 4608]": (lambda: gelu_ops._bwd_bias_impl(da, h),
                                          lambda: torch.ops.aten.gelu_backward(da, h, approximate="tanh").sum(0)),
        "qkv bias 3 x [32768, 1152]": (lambda: gelu_ops.column_sums([dq, dk, dv]),
                                       lambda: [t.sum(0) for t in (dq, dk, dv)]),
        "modulate bwd + add": (
            lambda: mod._modulate_bwd_impl(gr, x, shift, scale, mean, rstd, 1e-6, False, [True, True, True], addend=gr),
            lambda: mod._modulate_bwd_impl(gr, x, shift, scale, mean, rstd, 1e-6, False, [True, True, True])[0].add_(gr)),
    }
    for name, (fused, apart) in pairs.items():
        t_f, t_a = _wall(fused, 100), _wall(apart, 100)
        print(f"{name:32s} fused {t_f * 1e3:7.1f} us, apart {t_a * 1e3:7.1f} us ({t_a / t_f:.2f}x)", flush=True)
    t_fwd = _wall(lambda: mod._modulate_impl(x, shift, scale, 1e-6, False), 200)
    t_bwd = _wall(lambda: mod._modulate_bwd_impl(gr, x, shift, scale, mean, rstd, 1e-6, False, [True, True, True]), 200)
    mb = 2 * x.numel() * 2 / 1e6
    print(f"modulate [32, 1024, 1152] bf16: fwd {t_fwd * 1e3:.1f} us ({mb / t_fwd / 1e3:.2f} TB/s), bwd {t_bwd * 1e3:.1f} us "
          f"({1.5 * mb / t_bwd / 1e3:.2f} TB/s)", flush=True)


_LOAD_ORDER_ENV = ("GENFAST_MODULATE_FWD_ROWS", "GENFAST_MODULATE_FWD_PRELOAD", "GENFAST_MODULATE_BWD_PRELOAD",
                   "GENFAST_MODULATE_BWD_STREAM", "GENFAST_MODULATE_FWD_ASYNC")


def modab():
    """The adaln_modulate kernels per load order, each setting in its own process (the switches are read
    once): the forward one row a warp (GENFAST_MODULATE_FWD_ROWS=1) with and without its scale / shift
    preload, or streamed 2-16 rows a warp; the per-sample backward in the old order, preloading a row at
    a time, or walking its rows a row ahead (the default); and the asynchronous forward."""
    old = dict(zip(_LOAD_ORDER_ENV, ("1", "0", "0", "0")))
    settings = [("fwd 1 row, no preload / bwd old order", old),
                ("fwd 1 row, preload / bwd a row at a time", {"GENFAST_MODULATE_FWD_ROWS": "1",
                                                              "GENFAST_MODULATE_BWD_STREAM": "0"}),
                *((f"fwd {r} rows a warp / bwd a row ahead", {"GENFAST_MODULATE_FWD_ROWS": r}) for r in ("2", "4", "8", "16")),
                ("defaults (fwd streaming or async by rows) / bwd a row ahead", {}),
                ("fwd async (cp.async, rows by device) / bwd default", {"GENFAST_MODULATE_FWD_ASYNC": "1"})]
    _modab_settings(settings)


def modfwd():
    """The forward's walking kernels only: streaming (a row ahead in registers, GENFAST_MODULATE_FWD_ASYNC=0)
    against asynchronous (=1: cp.async into shared memory, 3 rows ahead), rows a warp by device or forced;
    the default (async from 8 rows a streaming warp); the one-row kernel for scale."""
    settings = [("fwd 1 row", {"GENFAST_MODULATE_FWD_ROWS": "1"}),
                ("fwd streaming, rows by device", {"GENFAST_MODULATE_FWD_ASYNC": "0"}),
                ("fwd default (streaming or async by rows)", {}),
                ("fwd async, rows by device", {"GENFAST_MODULATE_FWD_ASYNC": "1"}),
                *((f"fwd async, {r} rows a warp", {"GENFAST_MODULATE_FWD_ASYNC": "1", "GENFAST_MODULATE_FWD_ROWS": r})
                  for r in ("4", "8", "32"))]
    _modab_settings(settings)


def _modab_settings(settings):
    """Runs _modab_one once per (label, env flags), each in its own process (the switches are read once)."""
    import os
    import subprocess
    for label, flags in settings:
        env = {k: v for k, v in os.environ.items() if k not in _LOAD_ORDER_ENV}
        env.update(flags, GENFAST_AB_LABEL=label)
        subprocess.run([sys.executable, "-P", __file__, "_modab_one"], env=env, check=False, timeout=120)


def _modab_one():
    """bf16, per-sample scale / shift, C = 1152: forward and backward (dx with the block's addend, dshift,
    dscale) us per call, TB/s of their main tensors, and the share of a same-size device copy (x -> y),
    timed alternately."""
    import os
    from genfast.ops import modulate as mod
    label = os.environ.get("GENFAST_AB_LABEL", "")
    for b, n in ((32, 256), (32, 1024), (8, 1024)):
        x, g = (torch.randn(b, n, 1152, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        shift, scale = (torch.randn(b, 1, 1152, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        _, mean, rstd = mod._modulate_impl(x, shift, scale, 1e-6, False)
        y = torch.empty_like(x)
        runs = {"fwd": lambda: mod._modulate_impl(x, shift, scale, 1e-6, False),
                "bwd": lambda: mod._modulate_bwd_impl(g, x, shift, scale, mean, rstd, 1e-6, False, [True, True, True],
                                                      addend=g),
                "copy": lambda: y.copy_(x)}
        best = {k: min(_wall(f, 100) for _ in range(5)) for k, f in runs.items()}
        gb = x.numel() * x.element_size() / 1e9  # one [B, N, C] tensor
        fwd, bwd, cp = best["fwd"], best["bwd"], best["copy"]
        print(f"modulate [{b}, {n}, 1152] bf16, {label}: fwd {fwd * 1e3:6.1f} us {2 * gb / fwd:5.2f} TB/s "
              f"({100 * cp / fwd:5.1f} % of copy), bwd {bwd * 1e3:6.1f} us {4 * gb / bwd:5.2f} TB/s "
              f"({100 * 2 * cp / bwd:5.1f} % of copy); copy {2 * gb / cp:.2f} TB/s", flush=True)


class _Ops(torch.autograd.Function):
    """Backward runs k tiny aten ops: what an op costs inside a Python node, on autograd's device thread or not."""
    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x * 2

    @staticmethod
    def backward(ctx, g):
        for _ in range(ctx.k):
            g = g * 1.0
        return g, None


def threads():
    x = torch.randn(2, 8, 64, device="cuda", requires_grad=True)
    g = torch.ones_like(x)
    for threaded in (True, False):
        torch.autograd.set_multithreading_enabled(threaded)
        for k in (1, 10, 30):
            us = _wall(lambda: torch.autograd.grad(_Ops.apply(x, k), (x,), g), 1000) * 1e3
            print(f"Python node with {k:2d} aten ops in its backward, multithreading {'on ' if threaded else 'off'}: "
                  f"{us:7.1f} us", flush=True)
        us = _wall(lambda: [x * 1.0 for _ in range(30)], 1000) * 1e3
        print(f"30 aten ops on the main thread (no autograd): {us:7.1f} us", flush=True)
    torch.autograd.set_multithreading_enabled(True)


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


class Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def overhead():
    """Host time of a custom op's forward+backward, piece by piece (see the module docstring)."""
    dt = torch.bfloat16
    x = torch.randn(2, 8, 64, device="cuda", dtype=dt, requires_grad=True)
    shift, scale, gate = (torch.randn(2, 64, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
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
        "torch.empty cuda [2,8]": lambda: torch.empty(2, 8, device="cuda"),
        "x*2 under no_grad": lambda: torch.mul(x.detach(), 2),
        "modulate backend_for": lambda: m.backend_for(x),
        "modulate _modulate_impl (fwd, no autograd)": lambda: m._modulate_impl(x, shift[:, None], scale[:, None],
                                                                               1e-6, False),
    }
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; us per call (tiny tensors)")
    for name, fn in cases.items():
        print(f"{name:48s} {_wall(fn, 2000) * 1e3:8.1f}", flush=True)
    torch.autograd.set_multithreading_enabled(False)
    print("-- autograd multithreading off (backward on the calling thread)")
    for name in ("aten x*2 fwd+bwd", "py Function x*2 fwd+bwd", "eager modulate fwd+bwd",
                 "genfast modulate fwd+bwd", "eager gated fwd+bwd", "genfast gated fwd+bwd"):
        print(f"{name:48s} {_wall(cases[name], 2000) * 1e3:8.1f}", flush=True)
    torch.autograd.set_multithreading_enabled(True)
    _dit_threads()


def _dit_threads():
    """DiT-XL/2 block fwd+bwd at 256 tokens (host-bound), ms per call: genfast's fused and per-op paths
    and eager, with autograd's device thread (default) and without."""
    from genfast.ops import dit_block
    ours, ref, x, c, g = _dit_case()
    for threaded in (True, False):
        torch.autograd.set_multithreading_enabled(threaded)
        for name, m, fused in (("fused", ours, True), ("per-op", ours, False), ("eager", ref, True)):
            dit_block.USE_FUSED["cuda"] = fused
            ms = _wall(lambda: torch.autograd.grad(m(x, c), [x, *m.parameters()], g), 50)
            print(f"DiT-XL/2 block fwd+bwd 256 tokens, {name:8s} multithreading {'on ' if threaded else 'off'} "
                  f"{ms:8.3f} ms", flush=True)
    torch.autograd.set_multithreading_enabled(True)
    dit_block.USE_FUSED["cuda"] = True


def kl():
    enc = torch.randn(64, 32, 64, 64, device="cuda")
    mu, lv = (t.detach().requires_grad_() for t in enc.chunk(2, dim=1))
    dz, dkl = torch.randn_like(mu), torch.full((64,), 1 / 64, device="cuda")

    def fwd_bwd():
        z, k = genfast.reparam_kl(mu, lv)
        torch.autograd.backward([z, k], [dz, dkl])

    with torch.no_grad():
        _report("reparam_kl fwd (no grad)", lambda: genfast.reparam_kl(mu, lv))
    _report("reparam_kl fwd+bwd", fwd_bwd)
    _report("randn_like", lambda: torch.randn_like(mu), tables=("self_device_time_total",))


if __name__ == "__main__":
    {"modulate": modulate, "dit": dit, "host": host, "overhead": overhead, "kernels": kernels,
     "chunks": chunks, "big": big, "threads": threads, "fusions": fusions, "modab": modab,
     "modfwd": modfwd, "_modab_one": _modab_one, "kl": kl}[sys.argv[1] if len(sys.argv) > 1 else "modulate"]()
