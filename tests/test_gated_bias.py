"""The gated-residual backward's bias gradient (genfast.ops.modulate.gated_bwd(..., need_bias=True)):
the column sums of dy = grad * gate over all rows, from the same pass over grad. genfast's DiT block
takes the proj and fc2 bias gradients from it (genfast.ops.dit_block.BIAS_IN_GATED)."""
import pytest
import torch

from genfast.ops.modulate import CHUNK_ROWS, gated_bwd
from genfast.testing import FLOAT_DTYPES, assert_within_reference_error, backends_to_test

ALL_BACKENDS = backends_to_test()
IDS = [f"{d}-{b}" for d, b in ALL_BACKENDS]
# (B, N, C): a chunk remainder, several chunks a sample and a width off the 16-byte packs, one
# sample of a few rows, one token (a per-token gate: torch's sum of dy), empty batch, empty rows
SHAPES = [(2, CHUNK_ROWS + 5, 72), (3, 2 * CHUNK_ROWS, 136), (1, 5, 3), (2, 1, 8), (0, 4, 8), (2, 3, 0)]


def _case(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, n, c = shape
    grad, y = (torch.randn(b, n, c, generator=gen).to(device, dtype) for _ in range(2))
    gate = torch.randn(b, 1, c, generator=gen).to(device, dtype)
    return grad, gate, y


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("need_gate", [True, False])
def test_dbias_is_the_sum_of_dy_as_stored(device, backend, dtype, shape, need_gate, use_backend):
    use_backend(backend)
    grad, gate, y = _case(shape, dtype, device)
    dy, dgate, dbias = gated_bwd(grad, gate, y, True, need_gate, True)
    dy0, dgate0, none = gated_bwd(grad, gate, y, True, need_gate)
    assert none is None and dbias.shape == (shape[2],) and dbias.dtype == dtype
    # the same dy and dgate bits as without the bias
    assert torch.equal(dy, dy0)
    assert (dgate is None) == (not need_gate) and (dgate is None or torch.equal(dgate, dgate0))
    # dbias: dy's own values summed (fp64 here), rounded once to the dtype, plus fp32 summation error
    exact = dy.double().sum((0, 1))
    rows = shape[0] * shape[1]
    bound = exact.abs() * torch.finfo(dtype).eps + rows * 2 ** -23 * dy.double().abs().sum((0, 1))
    assert ((dbias.double() - exact).abs() <= bound + 1e-30).all()
    # and within the reference error of the exact bias gradient (fp64 grad * gate, summed)
    high = (grad.double() * gate.double()).sum((0, 1))
    low = (grad * gate).sum((0, 1))  # plain PyTorch in the dtype
    assert_within_reference_error("dbias", dbias, low, high, floor=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dbias_same_bits_on_every_kernel_backend(dtype, use_backend):
    """cpu, cuda_emu and triton sum the same (b, chunk) partials in the same order: same bits (dgate's
    sums may contract to FMAs or not per backend; dbias is plain adds)."""
    grad, gate, y = _case((3, CHUNK_ROWS + 7, 40), dtype, "cpu", seed=1)
    got = {}
    for backend in [b for d, b in ALL_BACKENDS if d == "cpu" and b != "reference"]:
        use_backend(backend)
        got[backend] = gated_bwd(grad, gate, y, True, True, True)
    first = next(iter(got.values()))
    for backend, outs in got.items():
        for name, a, b in zip(("dy", "dbias"), outs[::2], first[::2]):
            assert torch.equal(a, b), f"{name} of {backend} differs"


def test_dbias_deterministic_and_in_thread_path(monkeypatch, use_backend):
    """The CPU kernel's two per-sample paths (sums in the sample's thread, or partial buffers) give
    the same dbias bits, run after run."""
    import genfast.ops.modulate as mod

    use_backend("cpu")
    grad, gate, y = _case((4, 3 * CHUNK_ROWS + 1, 24), torch.bfloat16, "cpu", seed=2)
    runs = []
    for in_thread in (True, False, True):
        monkeypatch.setattr(mod, "_sums_in_thread", lambda name, n, v=in_thread: v)
        runs.append(gated_bwd(grad, gate, y, True, True, True))
    for outs in runs[1:]:
        for a, b in zip(outs, runs[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("module", ["_C", "_cuda_emu"])
def test_binding_rejects_dbias_without_per_sample_or_workspace(module):
    from genfast import _native

    mod = _native.module(module)
    grad, gate, y = _case((1, 4, 8), torch.float32, "cpu")
    dy, db, part = torch.empty_like(grad), torch.empty(8), torch.empty(1, 1, 8)
    args = (dy.data_ptr(), 0, 0, grad.data_ptr(), gate.data_ptr(), y.data_ptr(), 1, 4, 8, (32, 8, 8, 0, 32, 8), 32)
    with pytest.raises(ValueError, match="dbias needs per_sample"):
        mod.gated_residual_bwd(*args, False, 0, dbias=db.data_ptr(), bias_partial=part.data_ptr())
    with pytest.raises(ValueError, match="dbias needs per_sample"):
        mod.gated_residual_bwd(*args, True, 0, dbias=db.data_ptr())


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dbias_of_strided_views(device, backend, dtype, use_backend):
    """grad and y as views with padded row strides (a wider tensor's first C columns), the gate a
    column slice: the kernels read them in place; dbias is still the sum of dy as stored."""
    use_backend(backend)
    gen = torch.Generator().manual_seed(5)
    b, n, c = 2, CHUNK_ROWS + 3, 40
    grad, y = (torch.randn(b, n, c + 8, generator=gen).to(device, dtype)[..., :c] for _ in range(2))
    gate = torch.randn(b, 1, c + 1, generator=gen).to(device, dtype)[..., 1:]
    assert not grad.is_contiguous() and not gate.is_contiguous()
    dy, _, dbias = gated_bwd(grad, gate, y, True, True, True)
    torch.testing.assert_close(dy, (grad.float() * gate.float()).to(dtype), rtol=0, atol=0)
    exact = dy.double().sum((0, 1))
    bound = exact.abs() * torch.finfo(dtype).eps + b * n * 2 ** -23 * dy.double().abs().sum((0, 1))
    assert ((dbias.double() - exact).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("shape", [(2, 5, 37), (3, 2, 384), (1, 1, 3), (0, 4, 8), (2, 0, 16)], ids=str)
@pytest.mark.parametrize("keep_y", [True, False])
def test_bias_folded_forward_fp32(shape, keep_y):
    """x + gate * (y + bias) with the Linear's bias folded in (genfast.ops.modulate.gated_bias_fp32, the
    DiT block's fp32 CPU path): the per-sample gate read through a [B, 6, 1, C] view's sample stride,
    odd widths (the scalar tail), empty cases; with keep_y, y + bias written back exactly as torch
    adds it, else y untouched."""
    from genfast.ops.gelu import _uses_kernel
    from genfast.ops.modulate import gated_bias_fp32
    from genfast.reference import gated_residual

    gen = torch.Generator().manual_seed(4)
    b, n, c = shape
    x, y0 = (torch.randn(b, n, c, generator=gen) for _ in range(2))
    gate = torch.randn(b, 6, 1, c, generator=gen).unbind(1)[2]  # as the adaLN chunks: sample stride 6C
    bias = torch.randn(c, generator=gen)
    if not _uses_kernel(x):
        pytest.skip("the CPU kernels are not built")
    y = y0.clone()
    out = gated_bias_fp32(x, gate, y, bias, keep_y)
    torch.testing.assert_close(y, y0 + bias if keep_y else y0, rtol=0, atol=0)
    assert_within_reference_error("gated + bias", out, gated_residual(x, gate, y0 + bias),
                                  gated_residual(x.double(), gate.double(), y0.double() + bias.double()), floor=1e-6)
