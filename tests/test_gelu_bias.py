"""genfast.ops.gelu.gelu_tanh_backward_bias (dh = grad * gelu_tanh'(h), dbias = dh.sum(0)) on every
backend: the reference, the C++ CPU kernel, the Triton kernels (interpreter on the CPU), the CUDA
kernels (emulated on the CPU; on a GPU when one is visible). Numerics by the DESIGN.md §5 rule against fp64, the sums
checked to be the chunked fp32 sums of the rounded dh, determinism, empty inputs, bad input."""
import pytest
import torch

from genfast import backends
from genfast.ops import gelu as gelu_ops
from genfast.ops._common import kernel_reasons
from genfast.ops.gelu import ROWS, gelu_tanh_backward_bias
from genfast.testing import FLOAT_DTYPES, assert_within_reference_error

GPU = torch.cuda.is_available()
_gpu = pytest.mark.gpu
# (device, backend); Triton runs on CPU tensors only under the interpreter (no GPU visible).
BACKENDS = ([("cpu", "reference"), ("cpu", "cpu"), ("cpu", "cuda_emu")] + ([] if GPU else [("cpu", "triton")])
            + [pytest.param("cuda", "cuda", marks=_gpu), pytest.param("cuda", "triton", marks=_gpu)])
KERNELS = [b for b in BACKENDS if not (isinstance(b, tuple) and b[1] == "reference")]


def _misaligned(t):
    """A contiguous copy of t whose data starts one element past a 16-byte boundary: the CUDA
    kernels' element path even where K allows 16-byte packs."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def _samples(device, dtype, seed=0):
    """[(name, grad, h)]: odd shapes (both CUDA paths, chunk tails), a wide h range (overflow-safe
    tanh), non-contiguous and misaligned inputs."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(dtype).to(device)

    out = [(f"{m}x{k}", rnd(m, k), rnd(m, k, s=3.0)) for m in (1, 3, 33, 130) for k in (1, 7, 72, 136)]
    wide = torch.cat([torch.linspace(-30, 30, 136 * 4 - 4), torch.tensor([0.0, -0.0, 1e-8, -1e-8])])
    out.append(("wide_range", rnd(4, 136), wide.view(4, 136).to(dtype).to(device)))
    out.append(("non_contiguous", rnd(72, 40).t(), rnd(72, 40, s=3.0).t()))  # [40, 72] transposed views
    out.append(("sliced", rnd(35, 80)[:, 3:75], rnd(35, 80, s=3.0)[:, 3:75]))
    out.append(("misaligned", _misaligned(rnd(66, 72)), _misaligned(rnd(66, 72, s=3.0))))
    return out


def _chunked_sums(dh):
    """dh's column sums the way the kernels add them: fp32 rows in order within chunks of ROWS
    rows, the chunks in order within groups of GROUP chunks, then the groups in order, rounded to
    the dtype once."""
    chunks = []
    for m0 in range(0, dh.shape[0], ROWS):
        acc = torch.zeros(dh.shape[1], dtype=torch.float32, device=dh.device)
        for row in dh[m0:m0 + ROWS].float():
            acc = acc + row
        chunks.append(acc)
    total = torch.zeros(dh.shape[1], dtype=torch.float32, device=dh.device)
    for g0 in range(0, len(chunks), gelu_ops.GROUP):
        group = torch.zeros_like(total)
        for c in chunks[g0:g0 + gelu_ops.GROUP]:
            group = group + c
        total = total + group
    return total.to(dh.dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_matches_fp64_within_reference_error(device, backend, dtype, use_backend):
    use_backend(backend)
    for name, grad, h in _samples(device, dtype):
        dh, dbias = gelu_tanh_backward_bias(grad, h)
        assert dh.shape == h.shape and dh.dtype == dtype and dh.is_contiguous(), name
        assert dbias.shape == (h.shape[1],) and dbias.dtype == dtype, name
        dh_low = torch.ops.aten.gelu_backward(grad, h, approximate="tanh")  # torch in the same precision
        dh_high = torch.ops.aten.gelu_backward(grad.double(), h.double(), approximate="tanh")
        assert_within_reference_error(f"{name}: dh", dh, dh_low, dh_high, floor=1e-6)
        assert_within_reference_error(f"{name}: dbias", dbias, dh_low.sum(0), dh_high.sum(0), floor=1e-6)


@pytest.mark.parametrize("device,backend", KERNELS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("group", ["default", 2])
def test_dbias_sums_the_rounded_dh_in_chunks(device, backend, dtype, group, use_backend, monkeypatch):
    """dbias is exactly the chunked fp32 sum of the kernel's own (rounded) dh, and so close to
    dh.float().sum(0) (torch's order): within the final rounding plus fp32 reassociation. group=2:
    several groups of chunks (a partial last one) at these small shapes."""
    if group != "default":
        monkeypatch.setattr(gelu_ops, "GROUP", group)
    use_backend(backend)
    for name, grad, h in _samples(device, dtype, seed=1):
        dh, dbias = gelu_tanh_backward_bias(grad, h)
        assert torch.equal(dbias, _chunked_sums(dh)), name
        plain = dh.float().sum(0)
        reassoc = h.shape[0] * 2.0 ** -24 * dh.float().abs().sum(0)
        err = (dbias.float() - plain).abs()
        assert (err <= torch.finfo(dtype).eps * plain.abs() + reassoc + 1e-30).all(), name


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_same_bits_on_every_call(device, backend, use_backend):
    use_backend(backend)
    for dtype in FLOAT_DTYPES:
        for name, grad, h in _samples(device, dtype)[-4:]:
            a, b = gelu_tanh_backward_bias(grad, h), gelu_tanh_backward_bias(grad, h)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), f"{dtype} {name}"


@pytest.mark.parametrize("device,backend", [b for b in KERNELS if "triton" not in str(b)])
def test_cuda_pack_and_element_paths_agree(device, backend, use_backend):
    """K a multiple of the 16-byte pack: aligned inputs take the pack kernel, misaligned ones the
    element kernel; both walk the rows in the same order and give the same bits."""
    use_backend(backend)
    gen = torch.Generator().manual_seed(2)
    for dtype in FLOAT_DTYPES:
        grad = torch.randn(97, 144, generator=gen).to(dtype).to(device)
        h = (torch.randn(97, 144, generator=gen) * 3).to(dtype).to(device)
        pack = gelu_tanh_backward_bias(grad, h)
        elem = gelu_tanh_backward_bias(_misaligned(grad), _misaligned(h))
        assert torch.equal(pack[0], elem[0]) and torch.equal(pack[1], elem[1]), dtype


def test_triton_and_cuda_emu_agree_where_dh_agrees(use_backend):
    """The chunking is the backends' common constant: where the two kernels' dh bits agree, so do
    their dbias bits."""
    if GPU:
        pytest.skip("the Triton interpreter runs only without a GPU")
    agreed = 0
    for dtype in FLOAT_DTYPES:
        for name, grad, h in _samples("cpu", dtype, seed=3):
            use_backend("triton")
            t_dh, t_db = gelu_tanh_backward_bias(grad, h)
            use_backend("cuda_emu")
            c_dh, c_db = gelu_tanh_backward_bias(grad, h)
            if torch.equal(t_dh, c_dh):
                agreed += 1
                assert torch.equal(t_db, c_db), f"{dtype} {name}"
    assert agreed >= 10, agreed


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_empty(device, backend, dtype, use_backend):
    use_backend(backend)
    for m, k in ((0, 7), (5, 0), (0, 0)):
        grad = torch.randn(m, k).to(dtype).to(device)
        dh, dbias = gelu_tanh_backward_bias(grad, grad.clone())
        assert dh.shape == (m, k) and dh.dtype == dtype and dh.device == grad.device
        assert dbias.shape == (k,) and dbias.dtype == dtype and not dbias.any()


def test_cpu_tensors_take_the_cpu_kernel(monkeypatch):
    """Unforced, CPU tensors take the C++ kernel for both passes (fp32 / fp16 / bf16)."""
    monkeypatch.delenv("GENFAST_BACKEND", raising=False)
    for op in ("gelu_tanh_backward_bias", "column_sums"):
        for dtype in FLOAT_DTYPES:
            assert backends.choose_cached(op, "cpu", (dtype,), kernel_reasons) == "cpu", (op, dtype)


def test_forced_cpu_backend_raises_on_fp64(use_backend):
    """fp64 has no kernel: a forced CPU backend says so instead of running another backend."""
    use_backend("cpu")
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="gelu_tanh_backward_bias"):
        gelu_tanh_backward_bias(x, x)


def test_fp64_runs_on_the_reference(use_backend):
    grad, h = torch.randn(40, 9, dtype=torch.float64), torch.randn(40, 9, dtype=torch.float64) * 3
    dh, dbias = gelu_tanh_backward_bias(grad, h)
    want = torch.ops.aten.gelu_backward(grad, h, approximate="tanh")
    torch.testing.assert_close(dh, want, rtol=0, atol=0)
    torch.testing.assert_close(dbias, want.sum(0))


def test_bad_input_names_the_argument():
    x = torch.randn(4, 6)
    with pytest.raises(TypeError, match="grad"):
        gelu_tanh_backward_bias([1.0], x)
    with pytest.raises(TypeError, match="h"):
        gelu_tanh_backward_bias(x, torch.zeros(4, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match="h must be 2-D"):
        gelu_tanh_backward_bias(torch.randn(2, 4, 6), torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="h must be 2-D"):
        gelu_tanh_backward_bias(torch.randn(6), torch.randn(6))
    with pytest.raises(TypeError, match="grad has dtype"):
        gelu_tanh_backward_bias(x.half(), x)
    with pytest.raises(ValueError, match="grad has shape"):
        gelu_tanh_backward_bias(torch.randn(4, 5), x)
    with pytest.raises(ValueError, match="grad is on"):
        gelu_tanh_backward_bias(torch.empty(4, 6, device="meta"), x)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("group", ["default", 2])
def test_column_sums_of_up_to_three_tensors(device, backend, dtype, group, use_backend, monkeypatch):
    """column_sums([t0, t1, t2]) (the qkv bias gradient): kernels give exactly the chunked, grouped
    fp32 sums of each tensor (widths off the 16-byte pack and aligned ones, a misaligned one); every
    backend within the reference error of the fp64 sums; M = 0 gives zeros."""
    from genfast.ops.gelu import column_sums

    if group != "default":
        monkeypatch.setattr(gelu_ops, "GROUP", group)
    use_backend(backend)
    gen = torch.Generator().manual_seed(4)
    for m, widths in ((130, (72, 72, 72)), (33, (7, 16)), (5, (136,)), (70, (64, 40, 24))):
        ts = [torch.randn(m, w, generator=gen).to(dtype).to(device) for w in widths]
        if len(ts) == 3:
            ts[1] = _misaligned(ts[1])  # the element path on the CUDA kernel
        got = column_sums(ts)
        assert got.shape == (sum(widths),) and got.dtype == dtype
        high = torch.cat([t.double().sum(0) for t in ts])
        low = torch.cat([t.sum(0) for t in ts])
        assert_within_reference_error(f"{m} {widths}", got, low, high, floor=1e-6)
        if backend != "reference":
            assert torch.equal(got, torch.cat([_chunked_sums(t) for t in ts])), f"{m} {widths}"
    assert torch.equal(column_sums([torch.zeros(0, 5, dtype=dtype, device=device)] * 3),
                       torch.zeros(15, dtype=dtype, device=device))
