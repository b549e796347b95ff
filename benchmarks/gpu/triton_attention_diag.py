"""Triton attention on a GPU, kernel by kernel and config by config (no autotuner):
  python3 benchmarks/gpu/triton_attention_diag.py matrix [dims...]   each (kernel, config, D) in its own
        process (an illegal access poisons the CUDA context): ok / wrong / crash, against fp32 torch
  python3 benchmarks/gpu/triton_attention_diag.py one KERNEL D BM BN WARPS STAGES   one case (for the sanitizer)
  python3 benchmarks/gpu/triton_attention_diag.py bench [OK_CONFIGS_JSON]   autotuned Triton vs SDPA backends
Run from the repository root: it imports kernels/attention.py directly (no build needed)."""
import concurrent.futures as cf
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.getcwd())
from kernels import attention as ka  # noqa: E402

DT = torch.bfloat16
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1, to check this script itself


def _inputs(d, b=2, h=3, n=200, seed=0, pad=0):
    """q, k, v as views of one fused projection; pad > 0 widens each head's row (odd strides)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d + pad, device=DEV, dtype=DT, generator=g)[..., :d].permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def _dim(spec):
    """'72' -> (72, 0); '64p8' -> (64, 8): head dim and row padding."""
    d, _, pad = str(spec).partition("p")
    return int(d), int(pad or 0)


def _reference(q, k, v, do):
    qf, kf, vf = (t.float().detach().requires_grad_() for t in (q, k, v))
    s = qf @ kf.transpose(-1, -2) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ vf
    out.backward(do.float())
    return out.detach(), lse.detach(), qf.grad, kf.grad, vf.grad


def one(kernel, spec, bm, bn, warps, stages):
    d, pad = _dim(spec)
    q, k, v = _inputs(d, pad=pad)
    do = torch.randn(q.shape, device=DEV, dtype=DT)
    out_ref, lse_ref, dq_ref, dk_ref, dv_ref = _reference(q, k, v, do)
    cfg, scale = (bm, bn, warps, stages), d ** -0.5
    if kernel == "fwd":
        got, ref = ka.attention_forward(q, k, v, None, False, scale, config=cfg), [out_ref, lse_ref]
    else:  # both backward kernels run with cfg; the one named is judged by its outputs
        dq, dk, dv = ka.attention_backward(do, q, k, v, out_ref.to(DT), lse_ref, None, False, scale, config=cfg)
        got, ref = ([dk, dv], [dk_ref, dv_ref]) if kernel == "dkdv" else ([dq], [dq_ref])
    if DEV == "cuda":
        torch.cuda.synchronize()
    err = max(((x.float() - y).abs().max() / y.abs().max().clamp_min(1e-6)).item() for x, y in zip(got, ref))
    print(json.dumps({"ok": err < 3e-2, "rel_err": err}))


def matrix(dims):
    cases = [(kern, d, *c) for d in dims for kern, cfgs in (("fwd", ka.FWD_CONFIGS), ("dkdv", ka.BWD_CONFIGS),
                                                            ("dq", ka.BWD_CONFIGS)) for c in cfgs]

    def run(case):
        try:
            p = subprocess.run([sys.executable, "-P", __file__, "one", *map(str, case)], capture_output=True,
                               text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return case, "timeout", ""
        last = (p.stdout.strip().splitlines() or [""])[-1]
        if p.returncode == 0 and last.startswith("{"):
            r = json.loads(last)
            return case, "ok" if r["ok"] else f"wrong {r['rel_err']:.3g}", ""
        err = [line for line in p.stderr.splitlines() if "Error" in line or "error" in line]
        return case, "crash", (err[-1] if err else p.stderr[-300:])[:200]

    results = {}
    with cf.ThreadPoolExecutor(int(os.environ.get("DIAG_JOBS", "12"))) as pool:
        for case, status, why in pool.map(run, cases):
            results[" ".join(map(str, case))] = status
            print(f"{' '.join(map(str, case)):28s} {status:12s} {why}", flush=True)
    return results


# Candidate tiles beyond the autotune space (bigger tiles and deeper pipelines for D = 128).
FWD_SWEEP = ka.FWD_CONFIGS + [(128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 4, 4), (64, 128, 4, 3), (128, 32, 4, 4),
                              (64, 64, 4, 4), (128, 128, 4, 3), (64, 128, 8, 3)]
BWD_SWEEP = ka.BWD_CONFIGS + [(64, 64, 4, 3), (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 8, 3),
                              (128, 128, 8, 2), (128, 64, 8, 3), (64, 128, 8, 3)]
SWEEP_SHAPE = {64: (8, 16, 1024), 72: (32, 16, 1024), 80: (32, 16, 1024), 128: (2, 24, 4096)}


def _sweep_case(spec, kind, cfg, timed):
    """Run (and, timed, time) one config at the sweep shape: (ms, relative error vs SDPA)."""
    import triton.testing as tt
    d, pad = _dim(spec)
    b, h, n = SWEEP_SHAPE[d] if DEV == "cuda" else (1, 2, 40)  # cpu: a smoke test of this script
    q, k, v = _inputs(d, b=b, h=h, n=n, pad=pad)
    do = torch.randn(q.shape, device=DEV, dtype=DT)
    scale = d ** -0.5
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*leaves)
    out, lse = ka.attention_forward(q, k, v, None, False, scale, config=(64, 64, 4, 3))
    if kind == "fwd":
        fn = lambda: ka.attention_forward(q, k, v, None, False, scale, config=cfg)  # noqa: E731
        got, want = fn()[:1], [ref]
    else:
        fn = lambda: ka.attention_backward(do, q, k, v, out, lse, None, False, scale, config=cfg)  # noqa: E731
        got, want = fn(), torch.autograd.grad(ref, leaves, do)
    if DEV == "cuda":
        torch.cuda.synchronize()
    err = max(((x.float() - y.float()).abs().max() / y.float().abs().max()).item() for x, y in zip(got, want))
    ms = tt.do_bench(fn, warmup=10, rep=50, return_mode="median") if timed else 0.0
    return ms, err, (4 if kind == "fwd" else 10) * b * h * n * n * d


def sweep(specs):
    """Every candidate config (FWD_SWEEP / BWD_SWEEP) at each spec's shape, compiled in parallel
    processes first (Triton's disk cache), then timed one by one here. Prints ms, TFLOP/s, error."""
    cases = [(spec, kind, c) for spec in specs for kind, cfgs in (("fwd", FWD_SWEEP), ("bwd", BWD_SWEEP)) for c in cfgs]

    def warm(case):
        spec, kind, c = case
        try:
            p = subprocess.run([sys.executable, "-P", __file__, "warm", spec, kind, *map(str, c)], capture_output=True,
                               text=True, timeout=150)
            return p.returncode == 0
        except subprocess.TimeoutExpired:
            return False

    with cf.ThreadPoolExecutor(int(os.environ.get("DIAG_JOBS", "12"))) as pool:
        ok = dict(zip(map(str, cases), pool.map(warm, cases)))
    print(f"{'spec':6s} {'kind':4s} {'config':18s} {'ms':>8s} {'TFLOP/s':>8s} {'rel err':>8s}", flush=True)
    for case in cases:
        spec, kind, c = case
        if not ok[str(case)]:
            print(f"{spec:6s} {kind:4s} {str(c):18s} failed in its own process (crash, timeout or no resources)", flush=True)
            continue
        ms, err, flop = _sweep_case(spec, kind, c, timed=True)
        print(f"{spec:6s} {kind:4s} {str(c):18s} {ms:8.3f} {flop / ms / 1e9:8.1f} {err:8.2g}", flush=True)


def bench(ok_json=None):
    import triton.testing as tt
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if ok_json:  # keep only the configs the matrix found correct, per kernel (the autotuner picks among them)
        ok = json.load(open(ok_json))
        for kern, cfgs, key in (("fwd", ka.FWD_CONFIGS, "fwd"), ("dkdv", ka.BWD_CONFIGS, "dkdv"), ("dq", ka.BWD_CONFIGS, "dq")):
            good = [c for c in cfgs if all(ok.get(" ".join(map(str, (kern, d, *c)))) == "ok" for d in (72, 96))]
            print(kern, "configs kept:", good, flush=True)
            ka._RUN[key] = ka._tuned({"fwd": ka.attn_fwd_kernel, "dkdv": ka.attn_bwd_dkdv_kernel,
                                      "dq": ka.attn_bwd_dq_kernel}[kern], good or cfgs[-1:])
    shapes = [(32, 16, 256, 72), (32, 16, 1024, 72), (8, 16, 1024, 64), (2, 24, 4096, 128), (1, 24, 4429, 128)]
    if os.environ.get("DIAG_D"):  # only the shapes of this head dim
        shapes = [s for s in shapes if s[3] == int(os.environ["DIAG_D"])]
    print(f"{'shape':18s} {'mode':8s} {'triton':>8s} {'flash':>8s} {'cudnn':>8s}  (ms; TFLOP/s for triton)", flush=True)
    for shape in shapes:
        b, h, n, d = shape
        qkv = torch.randn(b, n, 3, h, d, device=DEV, dtype=DT).permute(2, 0, 3, 1, 4)
        q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(0))
        do = torch.randn(q.shape, device=DEV, dtype=DT)
        scale = d ** -0.5

        def tri_f():
            return ka.attention_forward(q, k, v, None, False, scale)

        def tri_fb():
            out, lse = ka.attention_forward(q, k, v, None, False, scale)
            return ka.attention_backward(do, q, k, v, out, lse, None, False, scale)

        def sd(backend, bwd):
            def f():
                with sdpa_kernel(backend):
                    o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                    if bwd:
                        torch.autograd.grad(o, (q, k, v), do)
            return f
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        err = (tri_f()[0].float() - ref.float()).abs().max().item()
        for mode, fn, flops in (("fwd", tri_f, 4), ("fwd+bwd", tri_fb, 14)):
            t = tt.do_bench(fn, warmup=25, rep=100, return_mode="median")
            tf = flops * b * h * n * n * d / t / 1e9
            row = [f"{t:8.3f}"]
            for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                try:
                    row.append(f"{tt.do_bench(sd(be, mode != 'fwd'), warmup=25, rep=100, return_mode='median'):8.3f}")
                except Exception as e:  # noqa: BLE001
                    row.append(f"{'n/a':>8s}")
            print(f"{'x'.join(map(str, shape)):18s} {mode:8s} {' '.join(row)}  {tf:6.1f} TF  max err {err:.3g}", flush=True)


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "one":
        one(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:8]))
    elif what == "warm":
        _sweep_case(sys.argv[2], sys.argv[3], tuple(map(int, sys.argv[4:8])), timed=False)
    elif what == "sweep":
        sweep(sys.argv[2:] or ["64", "128"])
    elif what == "matrix":  # dims as D or DpPAD (rows padded by PAD elements: strides not multiples of 16)
        res = matrix(sys.argv[2:] or ["72", "96"])
        with open(os.path.join(os.environ.get("OUT", "."), "triton_matrix.json"), "w") as f:
            json.dump(res, f, indent=0)
    else:
        bench(sys.argv[2] if len(sys.argv) > 2 else None)
