"""The host-path forms of the modulate / gated-residual wrappers (genfast.ops.modulate), which the fused
DiT block (genfast.ops.dit_block) uses to skip host calls, on every backend:

- an inference forward (stats=False) writes no statistics and gives the bits of the training forward;
- token tensors given as the [B*N, C] rows of a GEMM (outputs into such a buffer, y of the gated
  residual, the incoming gradients) give the bits of their [B, N, C] views.
"""
import pytest
import torch

import genfast
from genfast.ops import dit_block
from genfast.ops.modulate import _gated_impl, _modulate_bwd_impl, _modulate_impl, gated_bwd
from genfast.testing import FLOAT_DTYPES, backends_to_test, modulate_samples

ALL_BACKENDS = backends_to_test()
IDS = [f"{d}-{b}" for d, b in ALL_BACKENDS]


def _cases(device, dtype, backend):
    """modulate_samples; under the Triton interpreter (slow: a Python loop per program) only the cases
    of up to 64 channels and 40 rows, which keep every layout (strided, broadcast, chunked, empty)."""
    cases = modulate_samples(device, dtype, seed=3)
    if backend == "triton" and device == "cpu":
        cases = [c for c in cases if c.x.shape[-1] <= 64 and c.x.shape[0] * c.x.shape[1] <= 40]
    return cases


def _rows(t):
    """The same values as t [B, N, C], as a fresh [B*N, C] rows tensor (what a GEMM returns)."""
    return t.reshape(-1, t.shape[-1]).clone()


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_forward_without_statistics_same_bits(device, backend, dtype, use_backend):
    use_backend(backend)
    for case in _cases(device, dtype, backend):
        rms = case.kwargs.get("norm") == "rms"
        eps = case.kwargs.get("eps", 1e-6)
        y, mean, rstd = _modulate_impl(case.x, case.shift, case.scale, eps, rms)
        y2, mean2, rstd2 = _modulate_impl(case.x, case.shift, case.scale, eps, rms, stats=False)
        assert mean2 is None and rstd2 is None, case.name
        assert mean.shape == case.x.shape[:2] and rstd.shape == case.x.shape[:2], case.name
        assert torch.equal(y, y2), case.name
        # into a given [B*N, C] buffer (NaN-filled: every element must be written), no statistics
        b, n, c = case.x.shape
        buf = torch.full((b * n, c), float("nan"), device=device, dtype=dtype)
        y3, _, _ = _modulate_impl(case.x, case.shift, case.scale, eps, rms, buf, stats=False)
        assert y3.data_ptr() == buf.data_ptr() and y3.shape == buf.shape, case.name
        assert torch.equal(buf.view(b, n, c), y), case.name


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_token_rows_same_bits_as_their_views(device, backend, dtype, use_backend):
    """y of the gated residual, its gradient and the modulate backward's incoming gradient as [B*N, C]
    rows (dy then comes as rows too), against the same values as [B, N, C] tensors."""
    use_backend(backend)
    gen = torch.Generator().manual_seed(4)
    for case in _cases(device, dtype, backend):
        x, scale = case.x, case.scale
        g = torch.randn(x.shape, generator=gen).to(device, dtype)
        rms = case.kwargs.get("norm") == "rms"
        eps = case.kwargs.get("eps", 1e-6)
        gate, y = scale, case.y
        assert torch.equal(_gated_impl(x, gate, _rows(y)), _gated_impl(x, gate, y)), case.name
        want = gated_bwd(g, gate, y, True, True, True)
        got = gated_bwd(g, gate, _rows(y), True, True, True)
        assert got[0].shape == (x.shape[0] * x.shape[1], x.shape[2]), case.name
        assert torch.equal(got[0].view(x.shape), want[0]), case.name
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), case.name
        _, mean, rstd = _modulate_impl(x, case.shift, scale, eps, rms)
        needs = [True, case.shift is not None, True]
        want = _modulate_bwd_impl(g, x, case.shift, scale, mean, rstd, eps, rms, needs)
        got = _modulate_bwd_impl(_rows(g), x, case.shift, scale, mean, rstd, eps, rms, needs)
        for w, o in zip(want, got):
            assert torch.equal(o, w), case.name


def test_inference_calls_skip_the_statistics(monkeypatch):
    """adaln_modulate without autograd and the fused block's inference forward launch the forward
    kernel without statistics; with autograd they are written (the backward reads them)."""
    from genfast.ops import modulate

    seen = []
    real = modulate._launch

    def spy(name, fn, tensors, args, tail=()):
        if fn == "modulate_fwd":
            seen.append(tensors[4] is not None)
        return real(name, fn, tensors, args, tail)

    monkeypatch.setattr(modulate, "_launch", spy)
    x, shift, scale = torch.randn(2, 5, 16), torch.randn(2, 16), torch.randn(2, 16)
    genfast.adaln_modulate(x, shift, scale)
    assert seen == [False]
    genfast.adaln_modulate(x.requires_grad_(), shift, scale)
    assert seen == [False, True]
    block = genfast.nn.DiTBlock(16, 2)
    seen.clear()
    with torch.no_grad():
        block(torch.randn(2, 5, 16), torch.randn(2, 16))
    assert seen == [False, False]
    seen.clear()
    block(torch.randn(2, 5, 16), torch.randn(2, 16))
    assert seen == [True, True]


@pytest.mark.parametrize("grad", [False, True])
def test_token_rows_of_attention_layouts(grad):
    """dit_block._token_rows: [B, H, N, D] -> [B*N, C] rows, equal to transpose + reshape for the
    [B, N, H, D] memory of SDPA's outputs (a view) and for any other layout (a copy); with autograd
    recording, the transpose + reshape (as_strided's backward would be a scatter)."""
    b, n, h, d = 2, 5, 3, 4
    bnhd = torch.randn(b, n, h, d).transpose(1, 2).requires_grad_(grad)
    bhnd = torch.randn(b, h, n, d).requires_grad_(grad)
    for t in (bnhd, bhnd):
        rows = dit_block._token_rows(t, b, n, h * d)
        assert torch.equal(rows, t.transpose(1, 2).reshape(b * n, h * d))
        assert (rows.data_ptr() == t.data_ptr()) == (t is bnhd)
        if grad:
            assert rows.grad_fn is not None and "AsStrided" not in type(rows.grad_fn).__name__
