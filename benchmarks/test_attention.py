"""genfast.attention and genfast.nn.DiTBlock vs SDPA, the plain matmul-softmax-matmul, eager PyTorch
and torch.compile, in one run (DESIGN.md §6).

Attention: forward, and forward + backward (grads of q, k, v), on the issue's CPU shapes
[2, 16, 256, 72], [2, 16, 1024, 72], [1, 8, 1024, 64] (GPU: the DiT-XL/2, Flux-like shapes).
Target: >= 1.0x the faster of SDPA and the plain path. DiT-S block (hidden 384, 6 heads, batch 8,
256 tokens; GPU: DiT-XL/2) vs the same block in plain PyTorch (F.scaled_dot_product_attention, as
the reference DiT/timm code) and its torch.compile. GENFAST_BENCH_WAYS=1 adds genfast forced
through each way of its CPU path (see _way_impls).
"""
import os

import pytest
import torch
import torch.nn.functional as F

genfast = pytest.importorskip("genfast", reason="genfast is not importable: build and install it (pip install .)")
import genfast.nn  # noqa: E402
from genfast import reference  # noqa: E402
from genfast.ops import dit_block  # noqa: E402
from genfast.testing import with_backend  # noqa: E402

CUDA = torch.cuda.is_available()
# GPU: bf16 only (the issue's GPU targets; fp32 correctness is the tests' job)
DTYPES = {"bf16": torch.bfloat16} if CUDA else {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES = ([(32, 16, 256, 72), (32, 16, 1024, 72), (8, 16, 1024, 64), (2, 24, 4096, 128), (1, 24, 4429, 128)]
          if CUDA else [(2, 16, 256, 72), (2, 16, 1024, 72), (1, 8, 1024, 64)])
# GPU: every SDPA backend as its own baseline (the issue: >= 1.0x FLASH, aiming at cuDNN)
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION"} if CUDA else {}
DIT = dict(hidden=1152, heads=16, batch=32) if CUDA else dict(hidden=384, heads=6, batch=8)
DIT_TOKENS = [256, 1024] if CUDA else [256]  # GPU: DiT-XL/2 at 256^2 and 512^2 images


def plain(q, k, v):
    # what a user writes without SDPA
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1) @ v


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _sdpa_backend_impls(make_call):
    """{name: callable | "skipped: why"} running make_call(sdpa) under each SDPA backend (GPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    impls = {}
    for name, backend in SDPA_BACKENDS.items():
        def run(backend=getattr(SDPBackend, backend)):
            with sdpa_kernel(backend):
                return make_call(sdpa)
        try:  # a backend this device/shape cannot run is reported as skipped, not dropped
            run()
            impls[name] = run
        except Exception as e:  # noqa: BLE001
            impls[name] = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return impls


def _per_backend(fn):
    """GPU: genfast forced through each of its GPU backends, as extra rows (which one should lead)."""
    return {f"genfast:{b}": with_backend(b, fn) for b in ("cuda", "triton")} if CUDA else {}


def _name(shape):
    return "x".join(map(str, shape))


def _backend(q):
    try:
        return genfast.ops.attention.backend_for(q)
    except Exception:  # an internal helper: the benchmark must not depend on it
        return "?"


def _way_impls(fn, device):
    """With GENFAST_BENCH_WAYS=1 on the CPU: genfast forced through each way of its CPU path
    (genfast/ops/attention_cpu.py), as extra rows: the ratio genfast/way shows whether the chosen
    way is the fastest for the case."""
    if device.type != "cpu" or os.environ.get("GENFAST_BENCH_WAYS") != "1":
        return {}
    from genfast.ops import attention_cpu

    def forced(way):
        def run():
            saved = attention_cpu.FITS, attention_cpu.FUSED_FROM_KEYS, attention_cpu.FUSED_BELOW_KEYS
            attention_cpu.FITS = {d: way for d in saved[0]}  # fp32-only ways fall back to "sdpa" elsewhere
            attention_cpu.FUSED_FROM_KEYS = attention_cpu.FUSED_BELOW_KEYS = {}
            try:
                return fn()
            finally:
                attention_cpu.FITS, attention_cpu.FUSED_FROM_KEYS, attention_cpu.FUSED_BELOW_KEYS = saved
        return run
    return {f"way:{w}": forced(w) for w in ("heads", "sdpa", "onednn", "small")}


def _qkv(shape, dtype, device, grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(3)]


def _fwd_bwd(fn, q, k, v, g):
    return torch.autograd.grad(fn(q, k, v), (q, k, v), g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=_name)
def test_attention_forward(compare, shape, dtype):
    q, k, v = _qkv(shape, DTYPES[dtype], compare.device)
    torch.testing.assert_close(genfast.attention(q, k, v).float(), sdpa(q.float(), k.float(), v.float()),
                               atol=2e-2 if dtype == "bf16" else 1e-4, rtol=0)
    cplain = compare.compile(plain)
    b, h, n, d = shape
    compare(f"attention fwd {dtype} {_name(shape)}", {
        "genfast": lambda: genfast.attention(q, k, v),
        "sdpa": lambda: sdpa(q, k, v),
        "plain": lambda: plain(q, k, v),
        "compile": lambda: cplain(q, k, v),
        **_sdpa_backend_impls(lambda f: f(q, k, v)),
        **_per_backend(lambda: genfast.attention(q, k, v)),
        **_way_impls(lambda: genfast.attention(q, k, v), compare.device),
    }, flops=4 * b * h * n * n * d, targets={"sdpa": 1.0, "plain": 1.0, "sdpa-flash": 1.0},
        note=f"genfast backend for {dtype}: {_backend(q)}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=_name)
def test_attention_forward_backward(compare, shape, dtype):
    q, k, v = _qkv(shape, DTYPES[dtype], compare.device, grad=True)
    g = torch.randn(shape, device=compare.device).to(DTYPES[dtype])
    cplain = compare.compile(plain)
    b, h, n, d = shape
    compare(f"attention fwd+bwd {dtype} {_name(shape)}", {
        "genfast": lambda: _fwd_bwd(genfast.attention, q, k, v, g),
        "sdpa": lambda: _fwd_bwd(sdpa, q, k, v, g),
        "plain": lambda: _fwd_bwd(plain, q, k, v, g),
        "compile": lambda: _fwd_bwd(cplain, q, k, v, g),
        **_sdpa_backend_impls(lambda f: _fwd_bwd(f, q, k, v, g)),
        **_per_backend(lambda: _fwd_bwd(genfast.attention, q, k, v, g)),
        **_way_impls(lambda: _fwd_bwd(genfast.attention, q, k, v, g), compare.device),
    }, flops=14 * b * h * n * n * d, targets={"sdpa": 1.0, "plain": 1.0, "sdpa-flash": 1.0},
        note=f"genfast backend for {dtype}: {_backend(q)}")


EagerDiTBlock = reference.DiTBlock  # the plain-PyTorch DiT block


def _dit_pair(dtype, device):
    torch.manual_seed(0)
    ref = EagerDiTBlock(DIT["hidden"], DIT["heads"])
    ours = genfast.nn.DiTBlock(DIT["hidden"], DIT["heads"])
    ours.load_state_dict(ref.state_dict())
    return ref.to(device, dtype), ours.to(device, dtype)


def _per_op(run, block):
    """run(block) with genfast.nn.DiTBlock's fused path (genfast.ops.dit_block) switched off."""
    saved = dict(dit_block.USE_FUSED)
    dit_block.USE_FUSED.update({k: False for k in saved})
    try:
        return run(block)
    finally:
        dit_block.USE_FUSED.update(saved)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("tokens", DIT_TOKENS)
def test_dit_block(compare, dtype, mode, tokens):
    ref, ours = _dit_pair(DTYPES[dtype], compare.device)
    cref = torch.compile(ref, fullgraph=True, dynamic=False)
    x = torch.randn(DIT["batch"], tokens, DIT["hidden"], device=compare.device).to(DTYPES[dtype])
    c = torch.randn(DIT["batch"], DIT["hidden"], device=compare.device).to(DTYPES[dtype])
    if mode == "fwd":
        run = lambda m: m(x, c)  # noqa: E731
        ctx = torch.no_grad()
    else:
        x.requires_grad_(True)
        g = torch.randn_like(x)

        def run(m):
            return torch.autograd.grad(m(x, c), [x] + list(m.parameters()), g)
        ctx = torch.enable_grad()
    with ctx:
        torch.testing.assert_close(ours(x, c).float(), ref(x, c).float(), atol=0.1 if dtype == "bf16" else 1e-3, rtol=0)
        flops_fwd = 2 * DIT["batch"] * tokens * DIT["hidden"] ** 2 * 12 + 4 * DIT["batch"] * tokens ** 2 * DIT["hidden"]
        compare(f"DiT block {mode} {dtype} h{DIT['hidden']} b{DIT['batch']} n{tokens}", {
            "genfast": lambda: run(ours),
            "genfast-per-op": lambda: _per_op(run, ours),  # A/B: the block as separate ops (no fused nodes)
            "eager": lambda: run(ref),
            "compile": lambda: run(cref),
        }, flops=flops_fwd * (1 if mode == "fwd" else 3),
            targets={"eager": 1.1 if dtype == "fp32" else 1.3, "compile": 1.1 if dtype == "fp32" or CUDA else 1.0},
            note="genfast DiTBlock vs the plain-PyTorch DiT block with the same weights")


@pytest.mark.skipif(not CUDA, reason="GPU only: what head dim 72 (split 64 + 16 in the Triton kernels) costs vs 64")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_attention_head_dim_72_cost(compare, mode):
    """genfast at D = 72 against genfast at D = 64 and D = 128 on the same tokens (bf16, DiT-XL/2 at
    512^2: 1024 tokens). The split does the dot work of 80 columns: target >= 0.8x the D = 64 speed
    (1 / 1.25), and faster than 128, which is what one padded 128 block used to cost."""
    b, h, n = 32, 16, 1024
    qkv = {d: _qkv((b, h, n, d), torch.bfloat16, compare.device, grad=mode != "fwd") for d in (72, 64, 128)}
    grads = {d: torch.randn(b, h, n, d, device=compare.device, dtype=torch.bfloat16) for d in qkv}

    def run(d):
        if mode == "fwd":
            return lambda: genfast.attention(*qkv[d])
        return lambda: _fwd_bwd(genfast.attention, *qkv[d], grads[d])

    compare(f"attention {mode} bf16 {b}x{h}x{n} head dim 72 vs 64, 128", {
        "genfast": run(72), "d64": run(64), "d128": run(128), "sdpa_d72": lambda: (
            sdpa(*qkv[72]) if mode == "fwd" else _fwd_bwd(sdpa, *qkv[72], grads[72]))},
        flops=(4 if mode == "fwd" else 14) * b * h * n * n * 72, targets={"d64": 0.8, "d128": 1.0, "sdpa_d72": 1.0},
        note=f"genfast backend: {_backend(qkv[72][0])}; speedups are D = 72's vs each")
