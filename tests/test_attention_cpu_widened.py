"""The CPU attention's "sdpa" way for bf16 / fp16 where genfast widens 16-bit GEMMs
(genfast.ops.linear.WIDENED: CPUs without 16-bit GEMM instructions): the forward is torch's 16-bit
fused kernel (fp16: its fp32 kernel on exact fp32 copies, the output rounded once), the backward its
fp32 kernel on exact fp32 copies, gradients rounded once. Every
gradient within the reference's own error (DESIGN.md §5) for odd, cross, causal, masked (a fully
masked row) and strided cases, in the layout the op's fake promises; eager and compiled agree."""
import pytest
import torch

import genfast
from genfast import reference
from genfast.ops import attention as attention_op
from genfast.ops import linear as lin
from genfast.testing import assert_within_reference_error

DTYPES = [torch.bfloat16, torch.float16]


def _leaves(dtype, layout, b=2, h=3, nq=21, nk=21, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "qkv":  # views of one fused projection, as a DiT block makes them
        q, k, v = torch.randn(b, nq, 3, h, d, generator=g).permute(2, 0, 3, 1, 4)
    else:  # "cross": other key length, tokens-outer k / v
        q = torch.randn(b, h, nq, d, generator=g)
        k, v = (torch.randn(b, nk, h, d, generator=g).transpose(1, 2) for _ in range(2))
    return [t.to(dtype).detach().requires_grad_(True) for t in (q, k, v)]


def _kernel_grads(q, k, v, g, causal, dtype_in):
    """torch's fused backward kernel run by hand in dtype_in on the op's forward output and lse,
    the gradients rounded to q's dtype: the bits the way must give."""
    out, lse = torch.ops.genfast.attention_fwd(q, k, v, None, causal, q.shape[-1] ** -0.5, False)[:2]
    cast = lambda t: t.detach().to(dtype_in).contiguous()  # noqa: E731
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        cast(g), cast(q), cast(k), cast(v), cast(out), lse, 0.0, causal, scale=q.shape[-1] ** -0.5)
    return [t.to(q.dtype) for t in grads]


CASES = [("qkv", {}, 21), ("cross", {}, 77), ("qkv", {"causal": True}, 21), ("cross", {"mask": True}, 33),
         ("qkv", {"causal": True, "mask": True}, 21)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("widened", [True, False], ids=["widened", "16bit"])
@pytest.mark.parametrize("layout,kw,nk", CASES, ids=[f"{c[0]}-{'-'.join(c[1]) or 'plain'}" for c in CASES])
def test_sdpa_way_backward_within_reference_error(dtype, widened, layout, kw, nk, cpu_way, monkeypatch):
    cpu_way(dtype, "sdpa")
    monkeypatch.setattr(lin, "WIDENED", frozenset({dtype}) if widened else frozenset())
    q, k, v = _leaves(dtype, layout, nk=nk)
    kwargs = {"causal": kw.get("causal", False)}
    if kw.get("mask"):
        mask = torch.rand(2, k.shape[2], generator=torch.Generator().manual_seed(2)) > 0.3
        mask[1] = False  # sample 1: every row fully masked (zeros, zero gradients)
        kwargs["key_padding_mask"] = mask
    out = genfast.attention(q, k, v, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    if "key_padding_mask" not in kwargs:  # the bits of the kernel in fp32 (widened) or in dtype
        for a, b in zip(grads, _kernel_grads(q, k, v, g, kwargs["causal"], torch.float32 if widened else dtype)):
            assert torch.equal(a, b)
    for t, gt in zip((q, k, v), grads):
        assert gt.dtype == dtype and gt.stride() == attention_op._grad_layout(t).stride()
    low = torch.autograd.grad(reference.attention(q, k, v, upcast=False, **kwargs), (q, k, v), g)
    hi_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    high = torch.autograd.grad(reference.attention(*hi_leaves, **kwargs), hi_leaves, g.double())
    for n, a, lo, hi in zip("qkv", grads, low, high):
        assert torch.isfinite(a).all()
        assert_within_reference_error(f"{dtype} {layout} {kw} d{n}", a, lo, hi, floor=1e-3)


@pytest.mark.parametrize("widened", [True, False], ids=["widened", "16bit"])
@pytest.mark.parametrize("layout,kw,nk", CASES, ids=[f"{c[0]}-{'-'.join(c[1]) or 'plain'}" for c in CASES])
def test_fp16_sdpa_way_forward(widened, layout, kw, nk, cpu_way, monkeypatch):
    """fp16 forward where WIDENED holds fp16: the bits of torch's fp32 kernel on fp32 copies, rounded
    once (else those of its fp16 kernel); within the reference's error; fully masked rows zeros;
    inference and training calls alike."""
    dtype = torch.float16
    cpu_way(dtype, "sdpa")
    monkeypatch.setattr(lin, "WIDENED", frozenset({dtype}) if widened else frozenset())
    q, k, v = _leaves(dtype, layout, nk=nk)
    causal, mask = kw.get("causal", False), None
    if kw.get("mask"):
        mask = torch.rand(2, k.shape[2], generator=torch.Generator().manual_seed(2)) > 0.3
        mask[1] = False
    with torch.no_grad():
        out = genfast.attention(q, k, v, causal=causal, key_padding_mask=mask)
    assert torch.equal(out, genfast.attention(q, k, v, causal=causal, key_padding_mask=mask).detach())
    if mask is None:
        dt = torch.float32 if widened else dtype
        want = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(t.detach().to(dt).contiguous() for t in (q, k, v)), 0.0, causal, scale=q.shape[-1] ** -0.5)[0]
        assert torch.equal(out, want.to(dtype))
    else:
        assert torch.equal(out[1], torch.zeros_like(out[1]))
    low = reference.attention(q, k, v, causal=causal, key_padding_mask=mask, upcast=False)
    high = reference.attention(*(t.double() for t in (q, k, v)), causal=causal, key_padding_mask=mask)
    assert_within_reference_error(f"fp16 {layout} {kw} out", out, low, high, floor=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_widened_dtypes_keep_the_op_for_training(dtype, cpu_way, monkeypatch):
    """Eager training calls of widened dtypes take the op (its backward widens), not torch's SDPA
    directly (whose 16-bit backward is the slow one); forward-only calls go straight to SDPA in bf16,
    through the op in fp16 (whose forward widens too)."""
    cpu_way(dtype, "sdpa")
    q, k, v = _leaves(dtype, "qkv")
    monkeypatch.setattr(lin, "WIDENED", frozenset({dtype}))
    assert "genfast" in type(genfast.attention(q, k, v).grad_fn).__name__.lower()
    with torch.no_grad():
        assert attention_op._fused_directly(q, k, v, grad=False) == (dtype == torch.bfloat16)
    monkeypatch.setattr(lin, "WIDENED", frozenset())
    assert "ScaledDotProduct" in type(genfast.attention(q, k, v).grad_fn).__name__


def test_compiled_grads_equal_eager_widened(cpu_way, monkeypatch):
    """Compiled code calls the same op backward: the same bits as eager."""
    cpu_way(torch.bfloat16, "sdpa")
    monkeypatch.setattr(lin, "WIDENED", frozenset({torch.bfloat16}))
    torch._dynamo.reset()
    q, k, v = _leaves(torch.bfloat16, "qkv")

    def fn(q, k, v):
        return genfast.attention(q, k, v).float().square().sum()

    want = torch.autograd.grad(fn(q, k, v), (q, k, v))
    with torch._inductor.config.patch(force_disable_caches=True):
        got = torch.autograd.grad(torch.compile(fn, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
