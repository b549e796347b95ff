"""The CPU attention path's layouts and ways (genfast/ops/attention_cpu.py): the gradients' memory
layout matches the op's fake in eager and compiled code, and every way, forced, equals the
reference (DESIGN.md §5 tolerance)."""
import pytest
import torch

import genfast
from genfast import reference
from genfast.ops import attention as attention_op
from genfast.ops import attention_cpu
from genfast.testing import assert_within_reference_error

WAYS = ["sdpa", "heads", "onednn", "small"]
DTYPES = [torch.float32, torch.bfloat16]
# (dtype, way) pairs that exist: "onednn" is fp32 only ("small" is fp32 and bf16)
WAY_CASES = [(d, w) for d in DTYPES for w in WAYS if w != "onednn" or d == torch.float32]
WAY_IDS = [f"{d}-{w}" for d, w in WAY_CASES]
# (the cpu_way fixture, which forces a way: conftest.py)


def _inputs(layout, dtype, b=2, h=3, nq=21, nk=21, d=40):
    g = torch.Generator().manual_seed(0)
    if layout == "contiguous":
        q = torch.randn(b, h, nq, d, generator=g)
        k, v = (torch.randn(b, h, nk, d, generator=g) for _ in range(2))
    elif layout == "qkv":  # views of one fused projection, as a DiT block makes them
        q, k, v = torch.randn(b, nq, 3, h, d, generator=g).permute(2, 0, 3, 1, 4)
    else:  # "cross": k and v with another length and the tokens-outer layout
        q = torch.randn(b, h, nq, d, generator=g)
        k, v = (torch.randn(b, nk + 13, h, d, generator=g).transpose(1, 2) for _ in range(2))
    return [t.to(dtype).detach().requires_grad_(True) for t in (q, k, v)]


def _check_grads(name, got, leaves, g, **kw):
    low = torch.autograd.grad(reference.attention(*leaves, upcast=False, **kw), leaves, g)
    high_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    high = torch.autograd.grad(reference.attention(*high_leaves, **kw), high_leaves, g.double())
    for n, a, lo, hi in zip("qkv", got, low, high):
        assert_within_reference_error(f"{name}: d{n}", a, lo, hi, floor=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "qkv", "cross"])
@pytest.mark.parametrize("dtype,way", WAY_CASES, ids=WAY_IDS)
def test_grads_have_the_fakes_layout(dtype, way, layout, cpu_way):
    """Each way returns the gradients in the layout the fake promises (fp32: torch's fused kernel's
    [B, N, H, D] memory, returned without a copy), and they equal the reference."""
    cpu_way(dtype, way)
    q, k, v = _inputs(layout, dtype)
    out = genfast.attention(q, k, v)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for t, gt in zip((q, k, v), grads):
        assert gt.stride() == attention_op._grad_layout(t).stride()
    if dtype == torch.float32:  # the layout the fused kernel writes
        assert grads[0].transpose(1, 2).is_contiguous()
    _check_grads(f"{way} {layout}", grads, (q, k, v), g)


@pytest.mark.parametrize("dtype,way", WAY_CASES, ids=WAY_IDS)
def test_compiled_grads_match_eager(dtype, way, cpu_way):
    """Inductor checks every custom-op output's strides against the fake (assert_size_stride): a
    fake that promised other strides than the kernels return fails here. Caches are off, so that a
    graph compiled against an older fake is not reused."""
    cpu_way(dtype, way)
    torch._dynamo.reset()
    q, k, v = _inputs("qkv", dtype)
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[1, 15:] = False

    def fn(q, k, v):
        o = genfast.attention(q, k, v, key_padding_mask=mask)
        return o.transpose(1, 2).reshape(2, 21, -1).float().square().sum()  # dout in [B, N, H, D] memory

    want = torch.autograd.grad(fn(q, k, v), (q, k, v))
    with torch._inductor.config.patch(force_disable_caches=True):
        got = torch.autograd.grad(torch.compile(fn, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_accumulated_grads_of_a_fused_projection():
    """.backward() through q/k/v views of one qkv tensor (AccumulateGrad, unbind) gives the same
    gradient as autograd.grad of the plain reference."""
    x = torch.randn(2, 21, 3 * 3 * 40, requires_grad=True)

    def run(attn):
        q, k, v = x.view(2, 21, 3, 3, 40).permute(2, 0, 3, 1, 4)
        return attn(q, k, v).transpose(1, 2).reshape(2, 21, -1).sin().sum()

    run(genfast.attention).backward()
    (want,) = torch.autograd.grad(run(reference.attention), x)
    torch.testing.assert_close(x.grad, want, rtol=1e-4, atol=1e-5)


def _bf16_heads_case(seed=0, n=40):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, 32, generator=g).to(torch.bfloat16) for _ in range(3)]


def _check_forward(name, q, k, v, got):
    assert_within_reference_error(name, got, reference.attention(q, k, v, upcast=False),
                                  reference.attention(q.double(), k.double(), v.double()), floor=1e-5)


def test_workspace_is_kept_bounded_and_freed(cpu_way):
    cpu_way(torch.bfloat16, "heads")
    q, k, v = _bf16_heads_case()
    assert attention_cpu.variant(q, k.shape[2]) == "heads"
    attention_cpu.free_workspace()
    _check_forward("first", q, k, v, genfast.attention(q, k, v))
    kept = attention_cpu._workspace[(q.device, q.dtype)]
    assert 0 < kept.numel() * kept.element_size() <= attention_cpu.SCORE_BYTES
    _check_forward("reused", q, k, v, genfast.attention(q, k, v))
    assert attention_cpu._workspace[(q.device, q.dtype)] is kept  # the same buffer, no new pages
    attention_cpu.free_workspace()
    assert not attention_cpu._workspace


def test_workspace_is_never_shared_while_in_use(cpu_way):
    """A call nested inside another's use of the buffer (re-entrancy) gets a buffer of its own."""
    cpu_way(torch.bfloat16, "heads")
    q, k, v = _bf16_heads_case()
    genfast.attention(q, k, v)  # leaves a kept buffer
    with attention_cpu._scores((q.shape[2] * k.shape[2],), q.dtype, q.device) as held:
        held.fill_(7)
        _check_forward("nested", q, k, v, genfast.attention(q, k, v))
        assert (held == 7).all()


def _concurrently(fn, cases, repeats):
    """[[fn(case) x repeats] per case], each case's calls in its own thread, all threads at once."""
    import threading

    results = [[None] * repeats for _ in cases]

    def work(i):
        for j in range(repeats):
            results[i][j] = fn(cases[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("way", ["heads", "small"])
def test_workspace_under_threads_and_inference_mode(way, cpu_way):
    """Concurrent calls (the GIL is released inside the GEMMs and the "small" kernels, whose OpenMP
    threads keep their own scratch) and a buffer first made under inference_mode then reused with
    autograd on: the same results as one call at a time."""
    cpu_way(torch.bfloat16, way)
    attention_cpu.free_workspace()
    cases = [_bf16_heads_case(seed, n) for seed, n in ((1, 40), (2, 64), (3, 33), (4, 64))]
    with torch.inference_mode():
        want = [genfast.attention(*c).clone() for c in cases]
    for i, rs in enumerate(_concurrently(lambda c: genfast.attention(*c), cases, 6)):
        for r in rs:
            torch.testing.assert_close(r, want[i], rtol=0, atol=0)
    q, k, v = (t.requires_grad_(True) for t in _bf16_heads_case())
    out = genfast.attention(q, k, v)
    out.float().sum().backward()
    _check_forward("after inference_mode", q.detach(), k.detach(), v.detach(), out.detach())


def test_no_workspace_kept_when_disabled(cpu_way, monkeypatch):
    cpu_way(torch.bfloat16, "heads")
    monkeypatch.setattr(attention_cpu, "KEEP_WORKSPACE", False)
    attention_cpu.free_workspace()
    q, k, v = _bf16_heads_case()
    _check_forward("fresh", q, k, v, genfast.attention(q, k, v))
    assert not attention_cpu._workspace


@pytest.mark.parametrize("dtype,way", [(torch.bfloat16, "heads"), (torch.bfloat16, "small"), (torch.float32, "small")],
                         ids=["bf16-heads", "bf16-small", "fp32-small"])
def test_kept_p_is_reused_only_when_free(dtype, way, cpu_way, reuse_small_buffers):
    """The p buffer kept for the backward is reused by the next forward only once nothing holds it:
    two graphs alive at once get two buffers, and both backwards are right."""
    from genfast.ops import attention_cpu_fp32

    if way == "small" and not attention_cpu_fp32.small_supports(dtype, 32):
        pytest.skip("the small way needs AVX-512 with BF16")
    cpu_way(dtype, way)
    attention_cpu.free_workspace()
    first = [t.to(dtype).requires_grad_(True) for t in _bf16_heads_case(1)]
    second = [t.to(dtype).requires_grad_(True) for t in _bf16_heads_case(2)]
    assert genfast.ops.attention._can_keep_p(first[0], first[1])
    key = (first[0].device, first[0].dtype)
    g = torch.randn(first[0].shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    out1 = genfast.attention(*first)
    buf1 = attention_cpu._kept_p[key]
    out2 = genfast.attention(*second)  # first graph still holds buf1: a new buffer
    assert attention_cpu._kept_p[key] is not buf1
    _check_grads("second", torch.autograd.grad(out2, second, g), second, g)
    _check_grads("first", torch.autograd.grad(out1, first, g), first, g)
    buf2 = attention_cpu._kept_p[key]
    out3 = genfast.attention(*first)  # every graph freed: the kept buffer again
    assert attention_cpu._kept_p[key] is buf2
    _check_grads("again", torch.autograd.grad(out3, first, g), first, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_way_in_eager_is_torchs_sdpa(dtype, use_backend, monkeypatch):
    """Eager calls the fused way serves without a key mask run torch's SDPA itself (the same kernel
    under its C++ autograd): same numbers and layouts as the op, whose kernels masked calls still take.
    (16-bit dtypes with widened CPU GEMMs keep the op: tests/test_attention_cpu_widened.py.)"""
    use_backend("cpu")
    monkeypatch.setattr(genfast.ops.linear, "WIDENED", frozenset())
    q, k, v = _inputs("qkv", dtype)
    out = genfast.attention(q, k, v, causal=True)
    assert "ScaledDotProduct" in type(out.grad_fn).__name__
    via_op = torch.ops.genfast.attention_fwd(q, k, v, None, True, q.shape[-1] ** -0.5, False)[0]
    assert out.stride() == via_op.stride()
    torch.testing.assert_close(out, via_op, rtol=0, atol=0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for t, gt in zip((q, k, v), grads):
        assert gt.stride() == attention_op._grad_layout(t).stride()
    if dtype == torch.float32:
        _check_grads("direct", grads, (q, k, v), g, causal=True)
    masked = genfast.attention(q, k, v, key_padding_mask=torch.ones(2, 21, dtype=torch.bool))
    assert "genfast" in type(masked.grad_fn).__name__.lower()


# bf16 "small" runs on AMX tiles where the CPU has them; "small-vdp" forces its AVX-512 BF16 dot
# products (attention_cpu_fp32.USE_AMX = False), so both kernels are tested on an AMX CPU.
OWN_WAYS = [(torch.float32, "onednn", "fits"), (torch.float32, "onednn", "forward_only"),
            (torch.float32, "small", "whole_heads"), (torch.float32, "small", "blocks"),
            (torch.float32, "small", "recompute"),
            (torch.bfloat16, "small", "whole_heads"), (torch.bfloat16, "small", "blocks"),
            (torch.bfloat16, "small", "recompute"), (torch.bfloat16, "small-vdp", "blocks"),
            (torch.bfloat16, "small-vdp", "recompute")]


@pytest.mark.parametrize("dtype,way,budget", OWN_WAYS, ids=[f"{d}-{w}-{b}" for d, w, b in OWN_WAYS])
def test_own_ways_match_reference(dtype, way, budget, cpu_way, monkeypatch):
    """genfast's own ways ("onednn", fp32: per-head oneDNN GEMMs, backward on transposed score
    blocks; "small", fp32 and bf16: one C++ call, a thread per head, AVX-512 / AVX-512 BF16
    micro-kernels) on every sample: odd and cross lengths, causal, key masks with fully masked rows
    (zeros, finite grads), qkv views, a non-unit last stride, empty cases; forward and all
    gradients against fp64.
    forward_only: the budget fits one block but not the backward's two, so the backward takes the
    fused kernel on the lse this way wrote. blocks: 5 query rows per block (dk/dv summed over the
    blocks, causal blocks skip the keys after their last row). "small" keeps p for the backward
    (whole_heads, blocks) or recomputes it from the lse (recompute)."""
    from genfast.ops import attention_cpu_fp32
    from genfast.testing import attention_samples

    if way.startswith("small") and not attention_cpu_fp32.small_available():
        pytest.skip("the small way needs AVX-512 with BF16")
    if way == "small-vdp":
        monkeypatch.setattr(attention_cpu_fp32, "USE_AMX", False)
        way = "small"
    cpu_way(dtype, way)
    monkeypatch.setattr(attention_cpu, "LONG", {**attention_cpu.LONG, torch.float32: "sdpa"})
    if budget == "recompute":
        monkeypatch.setattr(attention_cpu, "KEEP_P_BYTES", 0)
    row_bytes = 8 if dtype == torch.float32 else 18
    for case in attention_samples("cpu", dtype, long=True):
        nq, nk = case.q.shape[2], case.k.shape[2]
        if budget == "forward_only":
            monkeypatch.setattr(attention_cpu, "SCORE_BYTES", nq * nk * 4)
        if budget == "blocks":
            name = "SMALL_BLOCK_BYTES" if dtype == torch.float32 else "SMALL16_BLOCK_BYTES"
            monkeypatch.setattr(attention_cpu, name, 5 * row_bytes * nk)
            if nk:
                got = attention_cpu_fp32.block_rows(nq, nk, attention_cpu._small_block_bytes(dtype), row_bytes)
                assert got == min(5, nq)
        if case.q.numel() and nk:
            assert attention_cpu.variant(case.q, nk, causal=case.kwargs.get("causal", False)) == way
            assert attention_cpu.variant(case.q, nk, buffers=2) == ("sdpa" if budget == "forward_only" else way)
            if way == "small":
                assert genfast.ops.attention._can_keep_p(case.q, case.k) == (budget != "recompute")
        leaves = case.leaves()
        out = genfast.attention(*leaves, **case.kwargs)
        assert_within_reference_error(case.name, out, reference.attention(*case.args(), upcast=False, **case.kwargs),
                                      reference.attention(*(t.double() for t in case.args()), **case.kwargs),
                                      floor=1e-5)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        grads = torch.autograd.grad(out, leaves, g)
        for t in grads:
            assert torch.isfinite(t).all(), case.name
        _check_grads(case.name, grads, leaves, g, **case.kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dout_layout", ["columns", "expanded"])
def test_small_way_reads_any_dout_strides(dtype, dout_layout, cpu_way):
    """The "small" backward reads dout with any strides (fp32 takes delta = rowsum(dout * out) row by
    row inside the kernel): a dout with a non-unit last stride, and the all-zero-stride dout of
    out.sum(), against the reference."""
    from genfast.ops import attention_cpu_fp32

    if not attention_cpu_fp32.small_available():
        pytest.skip("the small way needs AVX-512 with BF16")
    cpu_way(dtype, "small")
    leaves = _inputs("qkv", dtype)
    out = genfast.attention(*leaves)
    if dout_layout == "columns":
        g = torch.randn(out.shape[:-1] + (2 * out.shape[-1],), generator=torch.Generator().manual_seed(1))
        g = g.to(dtype)[..., ::2]
    else:
        g = torch.ones((), dtype=dtype).expand(out.shape)
    assert g.stride(-1) != 1
    _check_grads(dout_layout, torch.autograd.grad(out, leaves, g), leaves, g)


def test_onednn_way_rows_with_no_key_are_zero():
    """Rows the masks leave without a key: zero output, zero (finite) gradients, also where the
    causal limit and the padding mask meet (the transposed backward's per-lane mask)."""
    from genfast.ops import attention_cpu_fp32

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 37, 16, generator=g) for _ in range(3))
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[0] = False
    mask[1, :20] = False  # causal rows 0..19 of sample 1 see no key
    m = mask.view(torch.uint8)
    out, lse = attention_cpu_fp32.forward(q, k, v, m, True, 0.25, torch.empty_like(q))
    assert (out[0] == 0).all() and (out[1, :, :20] == 0).all() and (out[1, :, 20:] != 0).any()
    assert torch.isinf(lse[0]).all() and torch.isinf(lse[1, :, :20]).all()
    grads = attention_cpu_fp32.backward(torch.randn(q.shape, generator=g), q, k, v, out, lse, m, True, 0.25,
                                        [torch.empty_like(t) for t in (q, k, v)])
    for t in grads:
        assert torch.isfinite(t).all()
        assert (t[0] == 0).all()
    assert (grads[0][1, :, :20] == 0).all() and (grads[1][1, :, :20] == 0).all()


def test_bf16_forward_without_p_on_the_fused_kernel(use_backend, monkeypatch):
    """FUSED_WITHOUT_P (AMX CPUs): a bf16 forward that keeps no p runs torch's fused kernel, its
    gradients the "small" backward from that kernel's log-sum-exp; same answers as the reference.
    With a key mask the forward stays "small" (masks in its rows; torch's kernel would need an
    additive mask and the fully-masked-row fixes around it, measured slower)."""
    from genfast.ops import attention_cpu_fp32

    if not attention_cpu_fp32.small_supports(torch.bfloat16, 40):
        pytest.skip("the small way needs AVX-512 with BF16")
    use_backend("cpu")
    monkeypatch.setattr(attention_cpu, "FUSED_WITHOUT_P", {torch.bfloat16: (1 << 30, 1 << 62, 1 << 62)})  # every case
    monkeypatch.setattr(attention_cpu, "SMALL16_FROM_HEADS", 0)
    monkeypatch.setattr(attention_cpu, "KEEP_P_BYTES", 0)  # a gradient without p: the fused forward too
    calls = []
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu",
                        lambda *a, **k: calls.append(1) or fused(*a, **k), raising=False)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 40, generator=g).bfloat16().requires_grad_(True) for n in (37, 53, 53))
    mask = torch.rand(2, 53, generator=g) > 0.3
    mask[1] = False  # sample 1: every row fully masked
    for kwargs in ({}, {"causal": True}, {"key_padding_mask": mask}):
        calls.clear()
        out = genfast.attention(q, k, v, **kwargs)
        assert bool(calls) == ("key_padding_mask" not in kwargs), f"torch's fused kernel: {len(calls)} calls, {kwargs}"
        want = reference.attention(q.double(), k.double(), v.double(), **kwargs)
        low = reference.attention(q, k, v, upcast=False, **kwargs)
        assert_within_reference_error("fused forward", out, low, want, floor=1e-5)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert all(torch.isfinite(t).all() for t in grads)
        _check_grads("fused forward", grads, (q, k, v), torch.ones_like(out), **kwargs)


@pytest.mark.parametrize("layout", ["contiguous", "qkv", "cross"])
def test_bf16_no_grad_forward_calls_torch_sdpa_in_the_ops_layout(layout, use_backend, monkeypatch):
    """FUSED_WITHOUT_P, eager and without gradients: torch's SDPA itself runs (no op dispatch), and
    the output keeps the layout the op promises (_out_layout), values within the reference error."""
    from genfast.ops import attention_cpu_fp32

    if not attention_cpu_fp32.small_supports(torch.bfloat16, 40):
        pytest.skip("the small way needs AVX-512 with BF16")
    use_backend("cpu")
    monkeypatch.setattr(attention_cpu, "FUSED_WITHOUT_P", {torch.bfloat16: (1 << 30, 1 << 62, 1 << 62)})  # every case
    monkeypatch.setattr(attention_cpu, "SMALL16_FROM_HEADS", 0)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    q, k, v = _inputs(layout, torch.bfloat16)
    with torch.no_grad():
        out = genfast.attention(q, k, v, causal=layout == "qkv")
    assert calls, "torch's SDPA was not called"
    assert out.stride() == attention_op._out_layout(q).stride()
    kw = {"causal": layout == "qkv"}
    assert_within_reference_error(layout, out, reference.attention(q, k, v, upcast=False, **kw),
                                  reference.attention(q.double(), k.double(), v.double(), **kw), floor=1e-5)


def test_bf16_odd_head_dim_matches_reference(use_backend, monkeypatch):
    """An odd head dim takes the "heads" way (the "small" kernels need pairs; where torch's bf16 GEMMs
    are fast): same tolerance."""
    use_backend("cpu")
    monkeypatch.setattr(attention_cpu, "BF16_GEMMS", True)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 19, 33, generator=g).to(torch.bfloat16).requires_grad_(True) for _ in range(3))
    assert attention_cpu.variant(q, 19) == "heads"
    _check_forward("odd d", q.detach(), k.detach(), v.detach(), genfast.attention(q, k, v).detach())
    gout = torch.randn(q.shape, generator=g).to(torch.bfloat16)
    _check_grads("odd d", torch.autograd.grad(genfast.attention(q, k, v), (q, k, v), gout), (q, k, v), gout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_small_way_under_threads(dtype, use_backend, monkeypatch):
    """Concurrent calls (the GIL is released in the C++ call; each OpenMP thread keeps its own
    scratch): bitwise the same results as one call at a time, forward and gradients."""
    from genfast.ops import attention_cpu_fp32

    if not attention_cpu_fp32.small_available():
        pytest.skip("the small way needs AVX-512")
    use_backend("cpu")
    monkeypatch.setattr(attention_cpu, "FITS", {**attention_cpu.FITS, dtype: "small"})
    monkeypatch.setattr(attention_cpu, "SMALL16_FROM_HEADS", 0)  # bf16 "small" with one head too
    monkeypatch.setattr(attention_cpu, "SMALL32_FROM", None)  # fp32 too (Intel: from 2 heads a thread)
    monkeypatch.setattr(attention_cpu, "TINY16", None)
    g = torch.Generator().manual_seed(7)
    cases = [[torch.randn(1, h, n, 40, generator=g).to(dtype).requires_grad_(True) for _ in range(3)]
             for h, n in ((1, 70), (3, 129), (2, 257), (1, 100))]
    assert all(attention_cpu.variant(c[0], c[1].shape[2], buffers=2) == "small" for c in cases)

    def run(c):
        out = genfast.attention(*c, causal=True)
        return [out.detach(), *torch.autograd.grad(out.square().sum(), c)]

    want = [run(c) for c in cases]
    for i, runs in enumerate(_concurrently(run, cases, 4)):
        for r in runs:
            for a, b in zip(r, want[i]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_eager_twin_equals_the_op(dtype, masked, use_backend):
    """Plain eager calls that need gradients skip the op's dispatcher through an autograd.Function with
    the op's forward and backward (_GenfastAttention): the same bits and layouts as the registered op
    with its autograd, p kept or not; under a dispatch mode (what torch.compile and fake tensors see)
    the op itself runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    use_backend("cpu")
    q, k, v = _inputs("qkv", dtype, nq=70, nk=70)
    mask = torch.rand(2, 70, generator=torch.Generator().manual_seed(3)) > 0.3 if masked else None
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    scale = q.shape[-1] ** -0.5
    keep_p = attention_op._can_keep_p(q, k)
    out = genfast.attention(q, k, v, key_padding_mask=mask)
    if attention_op._fused_directly(q, k, v) and not masked:
        pytest.skip("this case runs torch's SDPA itself (test_fused_way_in_eager_is_torchs_sdpa)")
    assert type(out.grad_fn).__name__ == "_GenfastAttentionBackward"
    via_op = torch.ops.genfast.attention_fwd(q, k, v, mask, False, scale, keep_p)[0]
    assert out.stride() == via_op.stride() and torch.equal(out, via_op)
    want = torch.autograd.grad(via_op, (q, k, v), g)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), want):
        assert a.stride() == b.stride() and torch.equal(a, b)

    class Seen(TorchDispatchMode):
        ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        genfast.attention(q, k, v, key_padding_mask=mask)
    assert any("genfast.attention_fwd" in name for name in seen.ops)
    # the twin's backward calls the impl directly, but the op under a dispatch mode
    out = genfast.attention(q, k, v, key_padding_mask=mask)
    with Seen() as seen:
        got = torch.autograd.grad(out, (q, k, v), g)
    assert any("genfast.attention_bwd" in name for name in seen.ops)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
