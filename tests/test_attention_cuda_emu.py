"""The CUDA flash attention (csrc/cuda/attention.cu forward, attention_bwd.cu backward) run on CPU
tensors through the emulation (genfast._cuda_emu, DESIGN.md §8), called through
genfast.ops.attention_cuda (the thin layer over the raw bindings that genfast.ops.attention uses).

Each case compares the kernel's output, fp32 log-sum-exp and gradients with a float64 plain-PyTorch
softmax(q k^T * scale + mask) v, under the tolerance rule of DESIGN.md §5 (at most 2x the error of
the same computation done by PyTorch in the inputs' precision, plus a small floor). Shapes are tiny:
every mma.sync in the emulation is three warp-wide meetings of 32 fibers. About 30 s.
"""
import pytest
import torch

from genfast.ops import attention_cuda
from genfast.testing import assert_within_reference_error

emu = pytest.importorskip("genfast._cuda_emu")
if not hasattr(emu, "attention_fwd"):
    pytest.skip("genfast._cuda_emu has no attention_fwd (built without csrc/cuda/attention.cu)", allow_module_level=True)


def cuda_emu_attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None):
    """(out [B, H, Nq, D] contiguous, lse [B, H, Nq] fp32) from the emulated kernel."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return attention_cuda.forward("cuda_emu", q, k, v, key_padding_mask, causal, scale)


def plain_attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None, dtype=torch.float64):
    """softmax(q k^T * scale + mask) v computed in `dtype`; rows with no key -> zeros, lse -inf."""
    nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
    scale = d ** -0.5 if scale is None else scale
    s = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale
    allowed = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].bool()
    s = s.masked_fill(~allowed, float("-inf"))
    any_key = allowed.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~any_key, 0.0), dim=-1) * any_key
    lse = torch.logsumexp(s.double(), dim=-1)
    return (p @ v.to(dtype)), lse


def check(q, k, v, **kw):
    out, lse = cuda_emu_attention(q, k, v, **kw)
    ref64, lse64 = plain_attention(q, k, v, **kw)
    ref_low, _ = plain_attention(q, k, v, dtype=q.dtype, **kw)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    assert_within_reference_error("out", out.double(), ref_low.double(), ref64, floor=1e-3)
    empty = torch.isinf(lse64)  # rows with no key: +inf (exp(s - lse) = 0 in the backward)
    assert torch.equal(torch.isposinf(lse), empty.expand_as(lse))
    assert (out[empty.expand_as(lse)] == 0).all()
    # lse in fp32 from the same 16-bit q, k: only fp32 accumulation and exp2/log2 differ
    ok = ~empty.expand_as(lse)
    torch.testing.assert_close(lse[ok].double(), lse64.expand_as(lse)[ok], atol=1e-3, rtol=1e-4)


def rnd(*shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 32), (17, 72), (64, 128), (127, 72), (129, 32), (17, 128), (129, 72), (64, 64)])
def test_self_attention(n, d, dtype):
    b, h = 1 + (n % 2), 2 - (n % 2)
    q, k, v = (rnd(b, h, n, d, dtype=dtype, seed=s) for s in range(3))
    check(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nq,nk,d", [(64, 77, 72), (129, 77, 32), (17, 77, 128), (77, 1, 72)])
def test_cross_attention(nq, nk, d, dtype):
    q = rnd(1, 2, nq, d, dtype=dtype, seed=0)
    k, v = rnd(1, 2, nk, d, dtype=dtype, seed=1), rnd(1, 2, nk, d, dtype=dtype, seed=2)
    check(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nq,nk,d", [(129, 129, 72), (17, 77, 32), (77, 17, 64)])
def test_causal(nq, nk, d, dtype):
    q = rnd(1, 1, nq, d, dtype=dtype, seed=0)
    k, v = rnd(1, 1, nk, d, dtype=dtype, seed=1), rnd(1, 1, nk, d, dtype=dtype, seed=2)
    check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask(causal, dtype):
    b, h, nq, nk, d = 2, 1, 33, 77, 72
    q = rnd(b, h, nq, d, dtype=dtype, seed=0)
    k, v = rnd(b, h, nk, d, dtype=dtype, seed=1), rnd(b, h, nk, d, dtype=dtype, seed=2)
    mask = torch.ones(b, nk, dtype=torch.bool)
    mask[0, 50:] = False   # a padded text prompt
    mask[1, :] = False     # a sample with no key at all: zeros, lse = +inf
    mask[1, 70] = not causal  # ... except one key when not causal
    check(q, k, v, key_padding_mask=mask, causal=causal)
    # uint8 masks read the same
    out_b, _ = cuda_emu_attention(q, k, v, key_padding_mask=mask, causal=causal)
    out_u, _ = cuda_emu_attention(q, k, v, key_padding_mask=mask.to(torch.uint8), causal=causal)
    assert torch.equal(out_b, out_u)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_qkv_views_of_one_projection(dtype):
    """q/k/v as views of one [B, N, 3, H, D] projection output: no transpose copy."""
    b, n, h, d = 1, 67, 2, 72
    qkv = rnd(b, n, 3 * h * d, dtype=dtype).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    check(q, k, v)
    # an odd element offset: rows not 16-byte aligned -> the element-wise load path
    big = rnd(b, h, n, d + 3, dtype=dtype, seed=5)
    q2 = big[..., 1:d + 1]
    check(q2, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_logits_and_custom_scale(dtype):
    b, h, n, d = 1, 1, 40, 32
    q = rnd(b, h, n, d, dtype=dtype, seed=0, scale=8.0)
    k = rnd(b, h, n, d, dtype=dtype, seed=1, scale=8.0)
    v = rnd(b, h, n, d, dtype=dtype, seed=2)
    check(q, k, v, scale=0.5)


def test_head_dims_and_odd_head_dim():
    for d in (33, 80, 96):
        q, k, v = (rnd(1, 1, 20, d, dtype=torch.bfloat16, seed=s) for s in range(3))
        check(q, k, v)


def test_empty_and_unsupported():
    q = torch.empty(0, 2, 5, 32, dtype=torch.bfloat16)
    out, _ = cuda_emu_attention(q, q, q)
    assert out.shape == q.shape
    q = torch.zeros(1, 1, 4, 32, dtype=torch.bfloat16)
    kz = torch.zeros(1, 1, 0, 32, dtype=torch.bfloat16)
    out, lse = cuda_emu_attention(q, kz, kz)
    assert (out == 0).all() and torch.isposinf(lse).all()
    # the raw binding refuses what the kernel cannot run; reasons() says why beforehand
    with pytest.raises(ValueError, match="fp16 or bf16"):
        emu.attention_fwd(*[0] * 6, *[0] * 14, 1, 1, 4, 4, 32, 1.0, False, 0)
    with pytest.raises(ValueError, match="head dims"):
        emu.attention_fwd(*[0] * 6, *[0] * 14, 1, 1, 4, 4, 160, 1.0, False, 2)
    assert any("fp16, bf16 only" in r for r in attention_cuda.reasons("cuda_emu", "cpu", torch.float32, 32))
    assert any("head dim 160" in r for r in attention_cuda.reasons("cuda_emu", "cpu", torch.bfloat16, 160))
    assert attention_cuda.reasons("cuda_emu", "cpu", torch.bfloat16, 128) == []
    assert any("cuda tensors" in r for r in attention_cuda.reasons("cuda", "cpu", torch.bfloat16, 64))


def test_output_in_token_major_memory():
    """out preallocated as [B, Nq, H, D] memory seen as [B, H, Nq, D] (free reshape before the projection)."""
    b, h, n, d = 2, 3, 19, 72
    q, k, v = (rnd(b, h, n, d, dtype=torch.bfloat16, seed=s) for s in range(3))
    out = torch.empty(b, n, h, d, dtype=torch.bfloat16).transpose(1, 2)
    got, _ = attention_cuda.forward("cuda_emu", q, k, v, None, False, d ** -0.5, out=out)
    assert got is out
    want, _ = cuda_emu_attention(q, k, v)
    assert torch.equal(out, want)


def test_non_contiguous_head_dim_is_copied():
    q, k, v = (rnd(1, 2, 40, 64, dtype=torch.float16, seed=s).transpose(-1, -2).contiguous().transpose(-1, -2)
               for s in range(3))
    assert q.stride(-1) != 1
    check(q, k, v)


# ------------------------------------------------------------------------------------ backward
def cuda_emu_attention_bwd(dout, q, k, v, out, lse, *, causal=False, scale=None, key_padding_mask=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return attention_cuda.backward("cuda_emu", dout, q, k, v, out, lse, key_padding_mask, causal, scale)


def plain_grads(dout, q, k, v, dtype, **kw):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out, _ = plain_attention(*leaves, dtype=dtype, **kw)
    return torch.autograd.grad(out, leaves, dout.to(dtype))


def check_bwd(q, k, v, seed=7, **kw):
    out, lse = cuda_emu_attention(q, k, v, **kw)
    dout = rnd(*out.shape, dtype=q.dtype, seed=seed)
    got = cuda_emu_attention_bwd(dout, q, k, v, out, lse, **kw)
    ref64 = plain_grads(dout, q, k, v, torch.float64, **kw)
    ref_low = plain_grads(dout, q, k, v, q.dtype, **kw)
    for name, g, r64, rl in zip(("dq", "dk", "dv"), got, ref64, ref_low):
        assert g.dtype == q.dtype and torch.isfinite(g).all(), name
        assert_within_reference_error(name, g.double(), rl.double(), r64, floor=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nq,nk,d", [(17, 17, 32), (129, 129, 72), (64, 77, 128), (1, 33, 64), (77, 1, 96)])
def test_backward(nq, nk, d, dtype):
    q = rnd(1, 2, nq, d, dtype=dtype, seed=0)
    k, v = rnd(1, 2, nk, d, dtype=dtype, seed=1), rnd(1, 2, nk, d, dtype=dtype, seed=2)
    check_bwd(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nq,nk,d", [(129, 129, 72), (17, 77, 32), (77, 17, 128)])
def test_backward_causal(nq, nk, d, dtype):
    q = rnd(1, 1, nq, d, dtype=dtype, seed=0)
    k, v = rnd(1, 1, nk, d, dtype=dtype, seed=1), rnd(1, 1, nk, d, dtype=dtype, seed=2)
    check_bwd(q, k, v, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_backward_key_padding_mask_and_strided_views(causal):
    b, n, h, d, nk = 2, 33, 1, 72, 77
    qkv = rnd(b, n, 3 * h * d, dtype=torch.bfloat16).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    q = qkv[0]
    k, v = rnd(b, h, nk, d, dtype=torch.bfloat16, seed=1), rnd(b, h, nk, d, dtype=torch.bfloat16, seed=2)
    mask = torch.ones(b, nk, dtype=torch.bool)
    mask[0, 50:] = False
    mask[1, :] = False  # no key at all: zero gradients
    mask[1, 70] = not causal
    check_bwd(q, k, v, key_padding_mask=mask, causal=causal)


# ------------------------------------------------------------------- the same kernels on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nq,nk,d,causal", [(1000, 1000, 72, True), (257, 333, 64, False), (129, 129, 128, False),
                                            (4096, 77, 80, False), (77, 4096, 96, True), (17, 17, 32, False)])
def test_gpu_forward_backward(nq, nk, d, causal, dtype):
    """genfast._cuda on CUDA tensors (a GPU-lent session runs this): forward, lse and gradients against
    float64 on the GPU, with q/k/v as views of one projection and a key padding mask."""
    b, h = 2, 3
    dev = "cuda"
    q = rnd(b, h, nq, d, dtype=dtype, seed=0).to(dev)
    kv = rnd(b, nk, 2, h, d, dtype=dtype, seed=1).to(dev).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    mask = torch.rand(b, nk, generator=torch.Generator().manual_seed(2)).to(dev) > 0.2
    mask[1] = False
    scale = d ** -0.5
    out, lse = attention_cuda.forward("cuda", q, k, v, mask, causal, scale)
    ref64, lse64 = plain_attention(q, k, v, causal=causal, key_padding_mask=mask)
    ref_low, _ = plain_attention(q, k, v, causal=causal, key_padding_mask=mask, dtype=dtype)
    assert_within_reference_error("out", out.double(), ref_low.double(), ref64, floor=1e-3)
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isposinf(lse), ~finite)
    torch.testing.assert_close(lse[finite].double(), lse64[finite], atol=1e-3, rtol=1e-4)
    dout = rnd(*out.shape, dtype=dtype, seed=3).to(dev)
    got = attention_cuda.backward("cuda", dout, q, k, v, out, lse, mask, causal, scale)
    kw = dict(causal=causal, key_padding_mask=mask)
    for name, g_, r64, rl in zip(("dq", "dk", "dv"), got, plain_grads(dout, q, k, v, torch.float64, **kw),
                                 plain_grads(dout, q, k, v, dtype, **kw)):
        assert_within_reference_error(name, g_.double(), rl.double(), r64, floor=1e-3)
