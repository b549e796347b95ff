"""adaln_modulate / gated_residual through every code path of the CUDA kernels (csrc/cuda/modulate.cu,
modulate_warp.cuh), on every backend, against the plain-PyTorch reference with the tolerance rule.

The CUDA kernels choose by C and alignment: warp-per-row kernels for C <= 2048 (forward) /
C <= 1536 (backward) with 16-byte packs when C is a multiple of the pack (8 halves, 4 floats) and
every pointer and row stride is 16-byte aligned, element loads otherwise; block-per-row kernels for
wider rows. The inputs here are passed as the views themselves (misaligned x[..., 1:] of a wider
tensor, padded row strides, misaligned modulation and grad), never copied to fresh leaves, so the
kernels see exactly these pointers. Per-sample N spans several 32-row chunks, a partial last chunk
and a chunk whose rows fill only some of the block's warps.
"""
import pytest
import torch

import genfast
from genfast import reference
from genfast.testing import FLOAT_DTYPES, assert_within_reference_error, backends_to_test

ALL_BACKENDS = backends_to_test()
IDS = [f"{d}-{b}" for d, b in ALL_BACKENDS]


def _cases(device, dtype, *, wide=True):
    """(name, x, shift, scale, grad, kwargs); tensors may be views; shift/scale may be None / [B, N, C]."""
    g = torch.Generator().manual_seed(5)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    def plain(name, b, n, c, *, per_token=False, shift=True, **kw):
        m = (b, n, c) if per_token else (b, c)
        return (name, rnd(b, n, c), rnd(*m, s=0.5) if shift else None, rnd(*m, s=0.5), rnd(b, n, c), kw)

    def offset(name, b, n, c, *, per_token=False, **kw):
        # every tensor a [..., 1:] view of one a column wider: 2 or 4 bytes off 16-byte alignment
        m = (b, n, c + 1) if per_token else (b, c + 1)
        return (name, rnd(b, n, c + 1)[..., 1:], rnd(*m, s=0.5)[..., 1:], rnd(*m, s=0.5)[..., 1:],
                rnd(b, n, c + 1)[..., 1:], kw)

    def shifted(*shape, s=1.0):
        # contiguous strides, base pointer one element past 16-byte alignment
        n = 1
        for d in shape:
            n *= d
        return rnd(n + 1, s=s)[1:].view(shape)

    cases = [
        ("misaligned_base_c64", shifted(2, 37, 64), shifted(2, 64, s=0.5), shifted(2, 64, s=0.5), shifted(2, 37, 64),
         {}),
        ("misaligned_base_c1152_per_token", shifted(1, 5, 1152), shifted(1, 5, 1152, s=0.5),
         shifted(1, 5, 1152, s=0.5), shifted(1, 5, 1152), {}),
        plain("vec_c1152_per_sample", 2, 70, 1152),  # 3 chunks; the last (6 rows) fills only warp 0
        plain("vec_c1152_per_token_rms", 2, 9, 1152, per_token=True, norm="rms"),
        plain("vec_c64_no_shift", 3, 40, 64, shift=False),
        plain("vec_c512_per_sample_rms", 2, 33, 512, norm="rms"),
        plain("c44_fp32_pack_only", 2, 35, 44),  # a 4-float pack fits, an 8-half one does not
        plain("c1000_per_sample", 1, 37, 1000),  # C % 8 == 0, not a multiple of 32 * 8
        offset("misaligned_c64_per_sample", 2, 41, 64),
        offset("misaligned_c1152_per_token", 1, 6, 1152, per_token=True),
        ("padded_row_stride", rnd(2, 36, 72)[..., :64], rnd(2, 64), rnd(2, 64), rnd(2, 36, 68)[..., :64], {}),
        ("aligned_x_misaligned_modulation", rnd(2, 34, 48), rnd(2, 49)[:, 1:], rnd(2, 49)[:, 1:],
         rnd(2, 34, 48), {}),
        plain("c1536_bwd_warp_bound", 1, 35, 1536),
        plain("c1600_fwd_warp_bwd_wide", 1, 35, 1600, norm="rms"),
        plain("c2048_fwd_warp_bound", 1, 5, 2048, per_token=True),
    ]
    if wide:
        cases.append(plain("c2100_wide", 1, 34, 2100))
        cases.append(offset("c2104_wide_misaligned_per_token", 1, 3, 2104, per_token=True, norm="rms"))
    return cases


def _run(fn, x, shift, scale, grad, kw, *, up=False):
    """Output and (dx, dshift, dscale) of fn at these exact tensors (views stay views)."""
    conv = (lambda t: t.detach().double().requires_grad_()) if up else (lambda t: t.detach().requires_grad_())
    # Leaves that are the very tensors given (a view's .detach() keeps its storage offset and strides).
    leaves = [conv(t) if t is not None else None for t in (x, shift, scale)]
    out = fn(*leaves, **kw)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wrt, grad.double() if up else grad)
    it = iter(grads)
    return out, [next(it) if t is not None else None for t in leaves]


def _check(name, ours, ref, x, shift, scale, grad, kw):
    got, got_g = _run(ours, x, shift, scale, grad, kw)
    low, low_g = _run(ref, x, shift, scale, grad, kw)
    high, high_g = _run(ref, x, shift, scale, grad, kw, up=True)
    assert_within_reference_error(name, got, low, high)
    for what, a, b, c in zip(("x", "shift", "scale"), got_g, low_g, high_g):
        if c is not None:
            assert_within_reference_error(f"{name}: grad of {what}", a, b, c, floor=1e-5)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_modulate_kernel_paths(device, backend, dtype, use_backend):
    use_backend(backend)
    for name, x, shift, scale, grad, kw in _cases(device, dtype, wide=backend != "triton" or device != "cpu"):
        _check(name, genfast.adaln_modulate, reference.adaln_modulate, x, shift, scale, grad, kw)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gated_residual_kernel_paths(device, backend, dtype, use_backend):
    """The same shapes and views through gated_residual (x, gate = scale, y = grad's twin)."""
    use_backend(backend)
    for name, x, _, scale, grad, _ in _cases(device, dtype, wide=backend != "triton" or device != "cpu"):
        y = grad.flip(1)  # a second [B, N, C] tensor with the same strides and offset
        _check(name, lambda a, b, c: genfast.gated_residual(a, c, y), lambda a, b, c: reference.gated_residual(a, c, y),
               x, None, scale, grad, {})


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
def test_per_sample_sums_bit_deterministic(device, backend, use_backend):
    """Per-sample dshift / dscale / dgate: the same bits on every run (fixed chunks, fixed warp order)."""
    use_backend(backend)
    for name, x, shift, scale, grad, kw in _cases(device, torch.bfloat16, wide=False)[:2]:
        runs = [_run(genfast.adaln_modulate, x, shift, scale, grad, kw)[1] for _ in range(2)]
        for a, b in zip(*runs):
            assert torch.equal(a, b), name


def _gated_cases(device, dtype):
    """(name, x, gate, y): gated_residual's own layouts, each tensor's alignment and strides chosen
    independently. The CUDA forward takes 16-byte packs only when C is a multiple of the pack and
    every pointer and row stride is 16-byte aligned, else element loads; under the emulation the
    grid holds 16 blocks of 256 threads, 4 packs a thread a step, so 16384 packs a grid step."""
    g = torch.Generator().manual_seed(11)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def shifted(*shape):  # contiguous strides, base one element past 16-byte alignment
        n = 1
        for d in shape:
            n *= d
        return rnd(n + 1)[1:].view(shape)

    return [
        ("vec_per_sample_grid_steps_and_tail", rnd(3, 67, 1152), rnd(3, 1152), rnd(3, 67, 1152)),
        ("vec_per_token", rnd(2, 19, 96), rnd(2, 19, 96), rnd(2, 19, 96)),
        ("vec_one_pack_a_row", rnd(3, 5, 8), rnd(3, 8), rnd(3, 5, 8)),
        ("vec_one_token", rnd(4, 1, 64), rnd(4, 1, 64), rnd(4, 1, 64)),
        ("vec_padded_rows_all", rnd(2, 21, 80)[..., :64], rnd(2, 21, 72)[..., :64], rnd(2, 21, 88)[..., :64]),
        ("vec_padded_batch_stride", rnd(2, 23, 64)[:, :21], rnd(3, 64)[:2], rnd(2, 22, 64)[:, 1:]),
        ("c12_fp32_only", rnd(2, 33, 12), rnd(2, 12), rnd(2, 33, 12)),
        ("c20_elements", rnd(2, 17, 20), rnd(2, 17, 20), rnd(2, 17, 20)),
        ("misaligned_y_only", rnd(2, 30, 64), rnd(2, 64), shifted(2, 30, 64)),
        ("misaligned_gate_only_per_token", rnd(2, 30, 64), shifted(2, 30, 64), rnd(2, 30, 64)),
        ("misaligned_x_only_per_sample", shifted(2, 30, 64), rnd(2, 64), rnd(2, 30, 64)),
        ("odd_row_stride_y", rnd(2, 25, 64), rnd(2, 64), rnd(2, 25, 65)[..., :64]),
        ("odd_row_stride_gate", rnd(2, 25, 64), rnd(2, 25, 65)[..., :64], rnd(2, 25, 64)),
        ("misaligned_all_c1152", rnd(2, 9, 1153)[..., 1:], rnd(2, 1153)[:, 1:], rnd(2, 9, 1153)[..., 1:]),
        ("empty_n", rnd(2, 0, 64), rnd(2, 64), rnd(2, 0, 64)),
        ("empty_b", rnd(0, 5, 64), rnd(0, 64), rnd(0, 5, 64)),
    ]


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gated_residual_layouts(device, backend, dtype, use_backend):
    """gated_residual forward and backward over the pack path and each reason to fall back."""
    use_backend(backend)
    for name, x, gate, y in _gated_cases(device, dtype):
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(x)

        def run(fn, up=False):
            # leaves that are the very views given (detach keeps storage offset and strides)
            conv = (lambda t: t.detach().double().requires_grad_()) if up else (lambda t: t.detach().requires_grad_())
            leaves = [conv(t) for t in (x, gate, y)]
            out = fn(*leaves)
            return out, torch.autograd.grad(out, leaves, grad.double() if up else grad)

        got, got_g = run(genfast.gated_residual)
        low, low_g = run(reference.gated_residual)
        high, high_g = run(reference.gated_residual, up=True)
        assert got.shape == x.shape and got.dtype == x.dtype, name
        assert_within_reference_error(name, got, low, high)
        for what, a, b, c in zip(("x", "gate", "y"), got_g, low_g, high_g):
            assert_within_reference_error(f"{name}: grad of {what}", a, b, c, floor=1e-5)


@pytest.mark.parametrize("device,backend", [p for p in ALL_BACKENDS if p[1] in ("cuda", "cuda_emu")],
                         ids=[i for i, p in zip(IDS, ALL_BACKENDS) if p[1] in ("cuda", "cuda_emu")])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gated_residual_pack_and_element_paths_same_bits(device, backend, dtype, use_backend):
    """The 16-byte paths and the element paths compute x + gate * y, grad * gate, grad * y and the
    per-sample chunk sums of grad * y the same way, in the same order: equal bits."""
    use_backend(backend)
    g = torch.Generator().manual_seed(7)
    for shape, gshape in (((3, 67, 1152), (3, 1152)), ((2, 19, 96), (2, 19, 96)), ((2, 70, 64), (2, 64))):
        x, gate, y, grad = (torch.randn(*s, generator=g).to(device=device, dtype=dtype)
                            for s in (shape, gshape, shape, shape))

        def misaligned(t):  # the same values, base one element past 16-byte alignment
            buf = torch.empty(t.numel() + 1, device=device, dtype=dtype)
            buf[1:] = t.reshape(-1)
            return buf[1:].view(t.shape)

        def run(*ts):
            leaves = [t.detach().requires_grad_() for t in ts[:3]]
            out = genfast.gated_residual(*leaves)
            return (out, *torch.autograd.grad(out, leaves, ts[3]))

        packs = run(x, gate, y, grad)
        elems = run(*(misaligned(t) for t in (x, gate, y, grad)))
        for what, a, b in zip(("out", "dx", "dgate", "dy"), packs, elems):
            assert torch.equal(a, b), (shape, gshape, what)


_PRELOAD_SCRIPT = """
import json, sys, torch
from genfast import _native
from genfast.ops import modulate as m
torch.manual_seed(0)
dev = sys.argv[2]
emu = _native.module("_cuda_emu") if dev == "cpu" else None
out, kernels = [], set()
for dt in (torch.float32, torch.bfloat16, torch.float16):
    # 37 rows a sample: a full 32-row chunk and a 5-row one (one warp with rows, three without)
    for b, n, c in ((2, 37, 1152), (1, 70, 384), (2, 5, 1500)):
        x, g = torch.randn(b, n, c).to(dev, dt), torch.randn(b, n, c).to(dev, dt)
        shift, scale = torch.randn(b, 1, c).to(dev, dt), torch.randn(b, 1, c).to(dev, dt)
        y, mean, rstd = m._modulate_impl(x, shift, scale, 1e-6, False)
        out += [y, mean, rstd, m._modulate_impl(x, None, scale, 1e-6, True)[0]]  # (the forward: its preload too)
        out += m._modulate_bwd_impl(g, x, shift, scale, mean, rstd, 1e-6, False, [True, True, True])
        out += m._modulate_bwd_impl(g, x, None, scale, mean, rstd, 1e-6, True, [True, False, True], addend=g)
        if emu is not None:
            kernels.update(k for k, _, _ in emu.emu_launches())
torch.save(out, sys.argv[1])
print(json.dumps(sorted(kernels)))
"""

# Environment switches of the CUDA modulate kernels' load orders (all the same bits; read once per process)
_OLD_ORDERS = {"GENFAST_MODULATE_FWD_PRELOAD": "0", "GENFAST_MODULATE_BWD_PRELOAD": "0",
               "GENFAST_MODULATE_BWD_STREAM": "0", "GENFAST_MODULATE_FWD_ROWS": "1"}
_SWITCHES = (*_OLD_ORDERS, "GENFAST_MODULATE_FWD_ASYNC")


def _run_with_switches(script, backend, flags, path):
    """(tensors, JSON of its last stdout line) of `script` run in a fresh process (the switches are read
    once a process) with GENFAST_BACKEND=backend and the load-order switches `flags` only."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in _SWITCHES}
    env.update(flags, GENFAST_BACKEND=backend)
    device = "cuda" if backend == "cuda" else "cpu"
    res = subprocess.run([sys.executable, "-P", "-c", script, str(path), device], env=env, check=True, timeout=600,
                         capture_output=True, text=True)
    return torch.load(path, map_location="cpu"), json.loads(res.stdout.strip().splitlines()[-1])


def _assert_same_bits(ref, got, label):
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert torch.equal(a, b), (label, i)


@pytest.mark.parametrize("backend", ["cuda_emu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_load_order_switches_same_bits(backend, tmp_path):
    """The CUDA modulate kernels' load orders, kept switchable for GPU A/B timings, give the same bits:
    the defaults (the forward's scale / shift preload, the per-sample backward walking its rows a row
    ahead), the backward preloading one row at a time (GENFAST_MODULATE_BWD_STREAM=0), and the old
    orders (every switch off). On the emulation the launch log shows the backward's streaming kernel
    ran by default and not with the switch off."""
    got, kernels = {}, {}
    configs = {"default": {}, "bwd row at a time": {"GENFAST_MODULATE_BWD_STREAM": "0"}, "old": _OLD_ORDERS}
    for i, (name, flags) in enumerate(configs.items()):
        got[name], kernels[name] = _run_with_switches(_PRELOAD_SCRIPT, backend, flags, tmp_path / f"{i}.pt")
    for name in ("bwd row at a time", "old"):
        _assert_same_bits(got["default"], got[name], name)
    if backend == "cuda_emu":
        assert "bwd_stream_k" in kernels["default"]
        assert "bwd_stream_k" not in kernels["bwd row at a time"] and "bwd_stream_k" not in kernels["old"]


def test_backward_walks_a_row_ahead_only_within_one_wave(use_backend):
    """By default the per-sample backward's warps load a row ahead only while its grid (B x 32-row
    chunks) fits one wave of resident blocks, else a row at a time (H200: faster on each side of that
    line; benchmarks/gpu/NOTES.md, session 17). The emulated device holds 2 SMs x 16 such blocks: 4
    blocks stream, 39 do not (the launch log names the kernel that ran)."""
    import os

    from genfast import _native
    from genfast.ops.modulate import _modulate_bwd_impl, _modulate_impl

    if "GENFAST_MODULATE_BWD_STREAM" in os.environ:
        pytest.skip("GENFAST_MODULATE_BWD_STREAM is set: the default rule is off")
    use_backend("cuda_emu")
    emu = _native.module("_cuda_emu")
    gen = torch.Generator().manual_seed(5)
    for (b, n), streamed in (((2, 37), True), ((3, 400), False)):
        x, g = (torch.randn(b, n, 384, generator=gen).bfloat16() for _ in range(2))
        shift, scale = (torch.randn(b, 1, 384, generator=gen).bfloat16() for _ in range(2))
        _, mean, rstd = _modulate_impl(x, shift, scale, 1e-6, False)
        emu.emu_launches()
        _modulate_bwd_impl(g, x, shift, scale, mean, rstd, 1e-6, False, [True, True, True])
        names = [k for k, _, _ in emu.emu_launches()]
        assert ("bwd_stream_k" in names) == streamed, (b, n, names)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_modulate_backward_addend_is_a_separate_add(device, backend, dtype, use_backend):
    """_modulate_bwd_impl(..., addend=a) (the DiT block's dx1 = modulate's dx + dout in one pass) gives
    the bits of dx + a computed apart, on every kernel path (addend aligned or not); dshift / dscale
    unchanged. Triton on a GPU may contract the add into an FMA: within one rounding of dx0 and one of dx there."""
    from genfast.ops.modulate import _modulate_bwd_impl, _modulate_impl

    use_backend(backend)
    gen = torch.Generator().manual_seed(9)
    for i, (name, x, shift, scale, grad, kw) in enumerate(
            _cases(device, dtype, wide=backend != "triton" or device != "cpu")):
        rms = kw.get("norm") == "rms"
        shift, scale = (t[:, None] if t is not None and t.dim() == 2 else t for t in (shift, scale))  # [B, 1, C]
        _, mean, rstd = _modulate_impl(x, shift, scale, 1e-6, rms)
        base = torch.randn(x.numel() + 1, generator=gen).to(device, dtype)
        view = (lambda t: t[1:].view(x.shape)) if i % 2 else (lambda t: t[:-1].view(x.shape))
        add = view(base)  # odd cases: 2-4 bytes off 16-byte alignment (the kernels' element paths)
        needs = [True, shift is not None, True]
        # dx on the path the addend's alignment picks: + 0 (exact), or no addend where it is aligned
        dx0, dsh0, dsc0 = (_modulate_bwd_impl(grad, x, shift, scale, mean, rstd, 1e-6, rms, needs,
                                              addend=view(torch.zeros_like(base))) if i % 2 else
                           _modulate_bwd_impl(grad, x, shift, scale, mean, rstd, 1e-6, rms, needs))
        dx, dsh, dsc = _modulate_bwd_impl(grad, x, shift, scale, mean, rstd, 1e-6, rms, needs, addend=add)
        want = dx0 + add
        if (device, backend) == ("cuda", "triton"):  # fma(a, b, add): dx0's fp32 rounding skipped, then dx's
            f32 = torch.float32
            tol = 2 * (torch.finfo(f32).eps * dx0.to(f32).abs() + torch.finfo(dtype).eps * want.to(f32).abs())
            assert ((dx.to(f32) - want.to(f32)).abs() <= tol).all(), name
        else:
            assert torch.equal(dx, want), name
        assert torch.equal(dsh, dsh0) and torch.equal(dsc, dsc0), name


_STREAM_SCRIPT = """
import json, sys, torch
from genfast import _native
from genfast.ops import modulate as m
torch.manual_seed(0)
dev = sys.argv[2]
emu = _native.module("_cuda_emu") if dev == "cpu" else None
out, kernels = [], []
for dt in (torch.bfloat16, torch.float16, torch.float32):
    # rows straddling samples (N = 5, 67) and warps; C in the 16/32/40-item instances and 1500 (64 items:
    # the one-row kernel); per-token scale and misaligned rows: the one-row kernel
    for b, n, c, kind in ((3, 67, 1152, "ps"), (2, 70, 384, "ps"), (1, 300, 1000, "ps"), (7, 5, 1152, "ps"),
                          (2, 5, 1500, "ps"), (2, 40, 384, "token"), (2, 40, 384, "offset")):
        x = torch.randn(b, n, c + 1).to(dev, dt)[..., 1:] if kind == "offset" else torch.randn(b, n, c).to(dev, dt)
        mod = (b, n, c) if kind == "token" else (b, 1, c)
        shift, scale = torch.randn(mod).to(dev, dt), torch.randn(mod).to(dev, dt)
        if emu is not None:
            emu.emu_launches()
        y, mean, rstd = m._modulate_impl(x, shift, scale, 1e-6, False)
        out += [y, mean, rstd, m._modulate_impl(x, None, scale, 1e-6, True)[0]]  # RMS, no shift
        if emu is not None:
            kernels.append([k for k, _, _ in emu.emu_launches()])
torch.save(out, sys.argv[1])
print(json.dumps(kernels))
"""


@pytest.mark.parametrize("backend", ["cuda_emu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_streaming_forward_same_bits_as_one_row_kernel(backend, tmp_path):
    """The streaming forward (fp16/bf16, per-sample scale / shift, C <= 1280: a warp takes several rows,
    loading the next row's x while it reduces and stores the current one) and the asynchronous one
    (GENFAST_MODULATE_FWD_ASYNC=1: the rows copied into shared memory by cp.async, 3 in flight) give
    the one-row kernel's bits, for every rows-per-warp count (GENFAST_MODULATE_FWD_ROWS: 1 = the
    one-row kernel, 2 (fewer rows than the pipeline's stages), 3, 5 and 16 forced, unset = the
    device's choice), rows of several samples within one warp's share included. On the emulation
    the launch log shows which kernel ran, so the comparison cannot pass by running the one-row kernel
    twice; and the emulation lands a cp.async group only at its wait, so a slot read before its wait
    gives other bits."""
    runs = {("stream", r): {} if r is None else {"GENFAST_MODULATE_FWD_ROWS": r} for r in ("1", "3", "16", None)}
    runs.update({("async", r): {"GENFAST_MODULATE_FWD_ASYNC": "1", **({} if r is None else {"GENFAST_MODULATE_FWD_ROWS": r})}
                 for r in ("2", "5", None)})
    got, logs = {}, {}
    for (kind, rows), flags in runs.items():
        got[kind, rows], logs[kind, rows] = _run_with_switches(_STREAM_SCRIPT, backend, flags,
                                                               tmp_path / f"{kind}{rows}.pt")
    for key in runs:
        _assert_same_bits(got["stream", "1"], got[key], key)
    if backend == "cuda_emu":
        cases = 7
        for (kind, rows), log in logs.items():
            for i, kernels in enumerate(log):
                dtype_16bit, case = i < 2 * cases, i % cases
                walks = dtype_16bit and case < 4 and rows != "1"  # per sample, aligned, C <= 1280
                if rows is None and case == 3:  # 35 rows: fewer than 2 a resident warp, the device's choice is 1
                    walks = False
                name = "fwd_stream" if kind == "stream" else "fwd_async_k"
                assert kernels == ([name] * 2 if walks else ["k"] * 2), (kind, rows, i, kernels)


_DEFAULT_ASYNC_SCRIPT = """
import json, sys, torch
from genfast import _native
from genfast.ops import modulate as m
torch.manual_seed(0)
emu = _native.module("_cuda_emu")
out, kernels = [], []
for b, n in ((2, 400), (2, 600), (3, 342)):  # 800, 1200 and 1026 rows
    x = torch.randn(b, n, 384).to(torch.bfloat16)
    shift, scale = (torch.randn(b, 1, 384).to(torch.bfloat16) for _ in range(2))
    emu.emu_launches()
    out += list(m._modulate_impl(x, shift, scale, 1e-6, False))
    kernels.append([k for k, _, _ in emu.emu_launches()])
torch.save(out, sys.argv[1])
print(json.dumps(kernels))
"""


def test_forward_default_takes_async_kernel_from_eight_rows_a_streaming_warp(tmp_path):
    """GENFAST_MODULATE_FWD_ASYNC unset: the per-sample 16-bit forward takes the streaming kernel while the
    rows give its resident warps fewer than 8 each, the asynchronous kernel from there (measured on an
    H200: async ahead at 15.5 rows a streaming warp, behind at 3.9). The emulation holds 2 SMs x 8 blocks
    x 8 warps of the streaming kernel, so async from 1024 rows. =0 / =1 force either kernel, and every
    choice gives the one-row kernel's bits (its launch log says which kernel ran)."""
    runs = {"one row": {"GENFAST_MODULATE_FWD_ROWS": "1"}, "default": {}, "stream": {"GENFAST_MODULATE_FWD_ASYNC": "0"},
            "async": {"GENFAST_MODULATE_FWD_ASYNC": "1"}}
    got, logs = {}, {}
    for label, flags in runs.items():
        got[label], logs[label] = _run_with_switches(_DEFAULT_ASYNC_SCRIPT, "cuda_emu", flags, tmp_path / f"{label}.pt")
    assert logs == {"one row": [["k"]] * 3, "default": [["fwd_stream"], ["fwd_async_k"], ["fwd_async_k"]],
                    "stream": [["fwd_stream"]] * 3, "async": [["fwd_async_k"]] * 3}
    for label in runs:
        _assert_same_bits(got["one row"], got[label], label)
