"""genfast.vq_nearest / vector_quantize / code_counts on every backend against the fp64 reference."""
import pytest
import torch

import genfast
import genfast.nn
from genfast import reference
from genfast.testing import (
    FLOAT_DTYPES, assert_vq_indices, assert_within_reference_error, backends_to_test, vq_samples)

ALL_BACKENDS = backends_to_test()
IDS = [f"{d}-{b}" for d, b in ALL_BACKENDS]
SLOW_BACKENDS = ("triton", "cuda_emu")  # interpreter / emulation: small shapes only


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_indices_match_float64(device, backend, dtype, use_backend):
    use_backend(backend)
    heavy = backend not in SLOW_BACKENDS
    for case in vq_samples(device, dtype, heavy=heavy):
        idx = genfast.vq_nearest(case.z, case.codebook, metric=case.metric)
        assert_vq_indices(case.name, idx, case.z, case.codebook, case.metric)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only check (the GPU runs tl.dot anyway)")
def test_triton_dot_formulation_under_interpreter():
    """The GPU's tl.dot path, run by the interpreter (where the default is multiply + sum)."""
    from genfast.kernels import vq as kvq
    from genfast.ops.vq import METRICS, z_layout

    for dtype in (torch.float32, torch.float16):
        for case in vq_samples("cpu", dtype)[:7]:
            z = case.z if z_layout(case.z) is not None else case.z.contiguous()
            idx = torch.empty(z.shape[:-1], dtype=torch.int64)
            dist = torch.empty(z.shape[:-1], dtype=torch.float32)
            kvq.vq_nearest(z, case.codebook, idx.view(-1), dist.view(-1), METRICS[case.metric], z_layout(z), use_dot=True)
            assert_vq_indices(case.name, idx, case.z, case.codebook, case.metric)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
def test_mixed_dtypes(device, backend, use_backend):
    """bf16 / fp16 z with an fp32 codebook (and the reverse) compare in fp32."""
    use_backend(backend)
    for zdt, cdt in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16)):
        for case in vq_samples(device, zdt, codebook_dtype=cdt)[:6]:
            idx = genfast.vq_nearest(case.z, case.codebook, metric=case.metric)
            assert_vq_indices(f"{case.name}[{zdt}/{cdt}]", idx, case.z, case.codebook, case.metric)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_distance(device, backend, dtype, use_backend):
    use_backend(backend)
    for case in vq_samples(device, dtype)[:8]:
        idx, dist = genfast.vq_nearest(case.z, case.codebook, metric=case.metric, return_distance=True)
        assert dist.dtype == torch.float32 and dist.shape == idx.shape
        d = case.codebook.shape[1]
        z2, c2 = case.z.reshape(-1, d), case.codebook[idx.reshape(-1)]
        low = reference.vq_distance(z2.float(), c2.float(), case.metric).reshape(idx.shape)
        high = reference.vq_distance(z2.double(), c2.double(), case.metric).reshape(idx.shape)
        assert_within_reference_error(case.name, dist, low, high, floor=1e-6)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
def test_exact_ties_take_lowest_index(device, backend, use_backend):
    """Duplicated codes (in other panels, blocks and, with few rows, other threads' code ranges)
    score bit-identically: the lowest index wins, as torch.argmin."""
    use_backend(backend)
    g = torch.Generator().manual_seed(3)
    k = 300 if backend in SLOW_BACKENDS else 5000
    for d in (3, 16, 40):
        c = torch.randn(k, d, generator=g)
        dup = {7: [70, 200, k - 1], 64: [65, 130], 0: [k - 2]}
        for src, dsts in dup.items():
            for t in dsts:
                c[t] = c[src]
        z = torch.cat([c[[7, 64, 0]], c[[7, 64, 0]] + 1e-3 * torch.randn(3, d, generator=g)])
        for metric in ("l2", "cosine"):
            idx = genfast.vq_nearest(z.to(device), c.to(device), metric=metric)
            assert idx.tolist() == [7, 64, 0, 7, 64, 0], (d, metric, idx.tolist())
        # z equidistant from every code (z = 0 under cosine): all scores 0, index 0
        assert genfast.vq_nearest(torch.zeros(2, d, device=device), c.to(device), metric="cosine").tolist() == [0, 0]
        # all codes equal: index 0
        same = c[:1].expand(129, d)
        assert genfast.vq_nearest(z.to(device), same.to(device)).tolist() == [0] * 6


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
def test_nan_behaviour(device, backend, use_backend):
    """Documented: a NaN score never wins. A z row containing NaN gets index 0 and distance NaN;
    a codebook row containing NaN is never chosen while another scores a number."""
    use_backend(backend)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(9, 12, generator=g)
    c = torch.randn(40, 12, generator=g)
    z[2, 5] = float("nan")
    c[0] = z[0]  # z[0] sits on code 0 ...
    c[0, 3] = float("nan")  # ... which is poisoned: not chosen
    c[17] = z[4]
    for metric in ("l2", "cosine"):
        idx, dist = genfast.vq_nearest(z.to(device), c.to(device), metric=metric, return_distance=True)
        assert idx[2].item() == 0 and dist[2].isnan().item()
        assert idx[0].item() != 0 and not dist[0].isnan().item()
        assert idx[4].item() == 17
        ok = torch.ones(9, dtype=torch.bool)
        ok[2] = False
        want = reference.vq_nearest(z[ok].double(), c.double(), metric=metric)
        assert_vq_indices("nan", idx.cpu(), z, c, metric)
        assert (idx.cpu()[ok] == want).float().mean() > 0.8
    nan_cb = torch.full((5, 12), float("nan"))
    assert genfast.vq_nearest(z.to(device), nan_cb.to(device)).tolist() == [0] * 9


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
def test_code_counts_equal_bincount(device, backend, use_backend):
    use_backend(backend)
    g = torch.Generator().manual_seed(5)
    for n, k in ((0, 5), (1, 1), (1000, 37), (70000, 300), (5, 65536)):
        idx = torch.randint(0, k, (n,), generator=g).to(device)
        got = genfast.code_counts(idx, k)
        assert got.dtype == torch.int64
        torch.testing.assert_close(got, torch.bincount(idx, minlength=k), rtol=0, atol=0)
    idx = torch.randint(0, 10, (6, 7), generator=g)
    strided = idx.to(device).T  # any shape and strides, int32 too
    torch.testing.assert_close(genfast.code_counts(strided.to(torch.int32), 10),
                               torch.bincount(idx.reshape(-1), minlength=10).to(device), rtol=0, atol=0)
    bad = torch.tensor([0, -1, 3, 10, 3, 99]).to(device)  # documented: out of range is not counted
    assert genfast.code_counts(bad, 10).tolist() == [1, 0, 0, 2, 0, 0, 0, 0, 0, 0]


def _clear_case(dtype, seed=6, n=(4, 5), k=40, d=12, spread=0.05):
    """z close to distinct codes: every nearest code is unambiguous at any dtype's rounding."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(k, d, generator=g)
    pick = torch.randint(0, k, n, generator=g)
    z = c[pick] + spread * torch.randn(*n, d, generator=g)
    return z.to(dtype), c.to(dtype)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_vector_quantize_matches_reference(device, backend, metric, use_backend):
    use_backend(backend)
    for dtype in FLOAT_DTYPES:
        z0, c0 = _clear_case(dtype)
        za, ca = z0.to(device).requires_grad_(), c0.to(device).requires_grad_()
        zb, cb = z0.to(device).requires_grad_(), c0.to(device).requires_grad_()
        zq, idx, loss = genfast.vector_quantize(za, ca, beta=0.3, metric=metric)
        zq_r, idx_r, loss_r = reference.vector_quantize(zb, cb, beta=0.3, metric=metric)
        assert zq.dtype == z0.dtype and zq.shape == z0.shape and loss.dtype == torch.float32 and loss.dim() == 0
        torch.testing.assert_close(idx, idx_r, rtol=0, atol=0)
        torch.testing.assert_close(zq, zq_r, rtol=0, atol=0)
        torch.testing.assert_close(loss, loss_r)
        g = torch.randn_like(zq)
        (zq * g).sum().add(loss).backward()
        (zq_r * g).sum().add(loss_r).backward()
        torch.testing.assert_close(za.grad, zb.grad)
        torch.testing.assert_close(ca.grad, cb.grad)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cosine_zero_vector_stays_finite(dtype):
    """A zero vector normalises to zero (VQ_NORM_EPS), not NaN, in every dtype: in fp16 the eps of 1e-12
    underflows, so the normalisation runs in fp32 (it gave NaN z_q and loss there). Its gradient there is
    ~1/eps (F.normalize's, fp32 too), which fp16 cannot hold: checked finite in the other dtypes."""
    z = torch.zeros(3, 8, dtype=dtype)
    z[1] = 1.0
    z.requires_grad_()
    cb = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    for fn in (genfast.vector_quantize, reference.vector_quantize):
        zq, idx, loss = fn(z, cb, metric="cosine")
        assert torch.isfinite(zq).all() and torch.isfinite(loss), fn
        loss.backward()
        assert torch.isfinite(z.grad).all() or dtype == torch.float16
        z.grad = None
    vq = genfast.nn.VectorQuantizer(8, 5, metric="cosine", ema=True).to(dtype)
    zq, _, loss = vq(z.detach())
    assert torch.isfinite(zq).all() and torch.isfinite(loss) and torch.isfinite(vq.codebook).all()


def test_straight_through_gradient():
    z, c = _clear_case(torch.float32)
    z.requires_grad_()
    zq, _, _ = genfast.vector_quantize(z, c)
    g = torch.randn_like(zq)
    zq.backward(g)
    torch.testing.assert_close(z.grad, g, rtol=0, atol=0)  # dz_q/dz = identity


def test_loss_gradients_closed_form():
    """Stop-gradients make gradcheck inapplicable; the VQ-VAE gradients in closed form instead:
    dL/dz = 2 beta (z - c) / numel, dL/dc_k = sum over rows assigned to k of 2 (c_k - z) / numel."""
    z, c = _clear_case(torch.float64, n=(3, 4), k=6, d=5)
    z.requires_grad_()
    c.requires_grad_()
    _, idx, loss = genfast.vector_quantize(z, c, beta=0.7)
    loss.backward()
    q = c.detach()[idx]
    torch.testing.assert_close(z.grad, 2 * 0.7 * (z.detach() - q) / z.numel())
    want = torch.zeros_like(c).index_add_(0, idx.reshape(-1), (2 * (q - z.detach()) / z.numel()).reshape(-1, 5))
    torch.testing.assert_close(c.grad, want)


def test_bad_inputs():
    z, c = torch.randn(4, 8), torch.randn(10, 8)
    cases = [
        (lambda: genfast.vq_nearest(z, torch.randn(10, 7)), ValueError, "D = 8"),
        (lambda: genfast.vq_nearest(z, torch.randn(0, 8)), ValueError, "codebook is empty"),
        (lambda: genfast.vq_nearest(z, torch.randn(10, 8, 1)), ValueError, "codebook must have shape"),
        (lambda: genfast.vq_nearest(z.long(), c), TypeError, "z must have a floating dtype"),
        (lambda: genfast.vq_nearest(z, c.int()), TypeError, "codebook must have a floating dtype"),
        (lambda: genfast.vq_nearest(z, c, metric="dot"), ValueError, "metric"),
        (lambda: genfast.vq_nearest(z.numpy(), c), TypeError, "z must be a torch.Tensor"),
        (lambda: genfast.vq_nearest(torch.tensor(1.0), c), ValueError, "z must have shape"),
        (lambda: genfast.vq_nearest(z, c.to("meta")), ValueError, "same device"),
        (lambda: genfast.vector_quantize(z, c, beta="x"), TypeError, "beta"),
        (lambda: genfast.code_counts(torch.zeros(3), 5), TypeError, "indices"),
        (lambda: genfast.code_counts(torch.zeros(3, dtype=torch.long), 0), ValueError, "codebook_size"),
    ]
    for fn, exc, words in cases:
        with pytest.raises(exc, match=words):
            fn()


def test_float64_runs_the_reference():
    z, c = torch.randn(20, 5, dtype=torch.float64), torch.randn(30, 5, dtype=torch.float64)
    idx, dist = genfast.vq_nearest(z, c, return_distance=True)
    assert dist.dtype == torch.float64
    torch.testing.assert_close(idx, reference.vq_nearest(z, c), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend, use_backend):
    use_backend(backend)
    for case in vq_samples("cpu", torch.float32):
        for rd in (False, True):
            torch.library.opcheck(torch.ops.genfast.vq_nearest.default,
                                  (case.z, case.codebook, genfast.ops.vq.METRICS[case.metric], rd))
    torch.library.opcheck(torch.ops.genfast.vq_nearest.default, (case.z, case.codebook, 0, True, 1))  # bf16-screen
    torch.library.opcheck(torch.ops.genfast.vq_nearest.default, (case.z, case.codebook, 0, True, 2))  # tf32x3
    torch.library.opcheck(torch.ops.genfast.vq_counts.default, (torch.randint(0, 9, (50,)), 9))


def test_compile_matches_eager():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(6, 8)
            self.codebook = torch.nn.Parameter(torch.randn(32, 8))
            self.dec = torch.nn.Linear(8, 6)

        def forward(self, x):
            zq, idx, loss = genfast.vector_quantize(self.enc(x), self.codebook, beta=0.25)
            counts = genfast.code_counts(idx, 32)
            dist_idx, dist = genfast.vq_nearest(zq, self.codebook, metric="cosine", return_distance=True)
            return self.dec(zq), loss, counts, dist_idx, dist

    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(2, 9, 6)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_bf16_screen_equals_fp32_bit_for_bit(dtype, use_backend):
    """precision="bf16-screen" (the CPU kernel's vdpbf16ps screen + exact fp32 re-check) returns
    exactly the fp32 mode's indices: every sample case, NaN rows and codes, exact ties, large D,
    and few rows (the code range split over threads)."""
    use_backend("cpu")
    cases = vq_samples("cpu", dtype, heavy=True)
    g = torch.Generator().manual_seed(7)
    c = torch.randn(3000, 40, generator=g).to(dtype)
    c[100], c[2999] = c[7], c[7]
    z = torch.cat([c[[7, 100]], torch.randn(50, 40, generator=g).to(dtype)])
    z[5, 3] = float("nan")
    c[11, 0] = float("nan")
    extra = [("ties_nan", z, c, m) for m in ("l2", "cosine")]
    extra.append(("d256", torch.randn(200, 256, generator=g).to(dtype), torch.randn(5000, 256, generator=g).to(dtype), "l2"))
    extra.append(("few_rows", torch.randn(3, 96, generator=g).to(dtype), torch.randn(9000, 96, generator=g).to(dtype), "cosine"))
    extra.append(("huge_values", torch.randn(20, 8, generator=g).to(dtype) * 1e18, torch.randn(70, 8, generator=g).to(dtype), "l2"))
    for name, zz, cc, metric in [(k.name, k.z, k.codebook, k.metric) for k in cases] + extra:
        want = genfast.vq_nearest(zz, cc, metric=metric)
        got, dist = genfast.vq_nearest(zz, cc, metric=metric, precision="bf16-screen", return_distance=True)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
        _, want_dist = genfast.vq_nearest(zz, cc, metric=metric, return_distance=True)
        torch.testing.assert_close(dist, want_dist, rtol=0, atol=0, equal_nan=True, msg=name)
    with pytest.raises(ValueError, match="precision"):
        genfast.vq_nearest(z, c, precision="tf32")


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
def test_bf16_screen_elsewhere_is_the_fp32_path(device, backend, use_backend):
    use_backend(backend)
    case = vq_samples(device, torch.float32)[0]
    torch.testing.assert_close(genfast.vq_nearest(case.z, case.codebook, precision="bf16-screen"),
                               genfast.vq_nearest(case.z, case.codebook), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", [p for p in ALL_BACKENDS if p != ("cuda", "triton")],
                         ids=[i for i, p in zip(IDS, ALL_BACKENDS) if p != ("cuda", "triton")])
def test_tf32x3_elsewhere_is_the_fp32_path(device, backend, use_backend):
    """precision="tf32x3" is a GPU Triton mode: every other backend (the interpreter's multiply + sum
    included) returns the fp32 mode's indices and distances, bit for bit."""
    use_backend(backend)
    for case in vq_samples(device, torch.float32)[:3]:
        want = genfast.vq_nearest(case.z, case.codebook, metric=case.metric, return_distance=True)
        got = genfast.vq_nearest(case.z, case.codebook, metric=case.metric, return_distance=True, precision="tf32x3")
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=case.name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gpu_tf32x3_within_a_few_fp32_roundings(dtype, use_backend):
    """On the GPU's Triton kernel, precision="tf32x3" (three TF32 products a dot: ~2^-21 relative
    each, against fp32's 2^-24) picks the fp64 argmin wherever the two best codes are apart by more
    than 8x the fp32 rounding bound, and within that of the minimum elsewhere; its distances are the
    fp32 mode's (the same direct fp32 pass) wherever the two modes pick the same code."""
    use_backend("triton")
    g = torch.Generator().manual_seed(11)
    for d in (8, 32, 72, 256):
        for metric in ("l2", "cosine"):
            z = torch.randn(3000, d, generator=g).to("cuda", dtype)
            c = torch.randn(2500, d, generator=g).to("cuda", dtype)
            idx, dist = genfast.vq_nearest(z, c, metric=metric, return_distance=True, precision="tf32x3")
            assert_vq_indices(f"tf32x3 d{d} {metric}", idx, z, c, metric, slack=8.0)
            idx32, dist32 = genfast.vq_nearest(z, c, metric=metric, return_distance=True)
            same = idx == idx32
            assert same.float().mean() > 0.99, (d, metric)
            torch.testing.assert_close(dist[same], dist32[same], rtol=1e-6, atol=0)  # the same fp32 pass
