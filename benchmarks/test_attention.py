"""genfast.attention and genfast.nn.DiTBlock vs SDPA, the plain matmul-softmax-matmul, eager PyTorch
and torch.compile, in one run (DESIGN.md §6).

Attention: forward, and forward + backward (grads of q, k, v), on the issue's CPU shapes
[2, 16, 256, 72], [2, 16, 1024, 72], [1, 8, 1024, 64] (GPU: the DiT-XL/2, Flux-like shapes).
Target: >= 1.0x the faster of SDPA and the plain path. DiT-S block (hidden 384, 6 heads, batch 8,
256 tokens; GPU: DiT-XL/2) vs the same block in plain PyTorch (F.scaled_dot_product_attention, as
the reference DiT/timm code) and its torch.compile.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

genfast = pytest.importorskip("genfast", reason="genfast is not importable: build and install it (pip install .)")
import genfast.nn  # noqa: E402

CUDA = torch.cuda.is_available()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES = ([(32, 16, 256, 72), (32, 16, 1024, 72), (8, 16, 1024, 64), (2, 24, 4096, 128)] if CUDA
          else [(2, 16, 256, 72), (2, 16, 1024, 72), (1, 8, 1024, 64)])
DIT = dict(hidden=1152, heads=16, batch=32, tokens=256) if CUDA else dict(hidden=384, heads=6, batch=8, tokens=256)


def plain(q, k, v):
    # what a user writes without SDPA
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1) @ v


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _name(shape):
    return "x".join(map(str, shape))


def _backend(q):
    try:
        return genfast.ops.attention.backend_for(q)
    except Exception:  # an internal helper: the benchmark must not depend on it
        return "?"


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
    }, flops=4 * b * h * n * n * d, targets={"sdpa": 1.0, "plain": 1.0},
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
    }, flops=14 * b * h * n * n * d, targets={"sdpa": 1.0, "plain": 1.0},
        note=f"genfast backend for {dtype}: {_backend(q)}")


class EagerDiTBlock(nn.Module):
    """The reference DiT block in plain PyTorch (facebookresearch/DiT models.py with timm's
    Attention, which calls F.scaled_dot_product_attention)."""

    def __init__(self, hidden, heads, mlp_ratio=4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(hidden, int(hidden * mlp_ratio)), nn.Linear(int(hidden * mlp_ratio), hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        sm, cm, gm, sp, cp, gp = self.adaLN_modulation(c).chunk(6, dim=1)
        b, n, ch = x.shape
        h = self.norm1(x) * (1 + cm.unsqueeze(1)) + sm.unsqueeze(1)
        q, k, v = self.attn.qkv(h).reshape(b, n, 3, self.heads, ch // self.heads).permute(2, 0, 3, 1, 4)
        a = self.attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, ch))
        x = x + gm.unsqueeze(1) * a
        h = self.norm2(x) * (1 + cp.unsqueeze(1)) + sp.unsqueeze(1)
        return x + gp.unsqueeze(1) * self.mlp.fc2(F.gelu(self.mlp.fc1(h), approximate="tanh"))


def _dit_pair(dtype, device):
    torch.manual_seed(0)
    ref = EagerDiTBlock(DIT["hidden"], DIT["heads"])
    ours = genfast.nn.DiTBlock(DIT["hidden"], DIT["heads"])
    ours.load_state_dict(ref.state_dict())
    return ref.to(device, dtype), ours.to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_dit_block(compare, dtype, mode):
    ref, ours = _dit_pair(DTYPES[dtype], compare.device)
    cref = torch.compile(ref, fullgraph=True, dynamic=False)
    x = torch.randn(DIT["batch"], DIT["tokens"], DIT["hidden"], device=compare.device).to(DTYPES[dtype])
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
        flops_fwd = 2 * DIT["batch"] * DIT["tokens"] * DIT["hidden"] ** 2 * 12 + 4 * DIT["batch"] * DIT["tokens"] ** 2 * DIT["hidden"]
        compare(f"DiT block {mode} {dtype} h{DIT['hidden']} b{DIT['batch']} n{DIT['tokens']}", {
            "genfast": lambda: run(ours),
            "eager": lambda: run(ref),
            "compile": lambda: run(cref),
        }, flops=flops_fwd * (1 if mode == "fwd" else 3),
            targets={"eager": 1.1 if dtype == "fp32" else 1.3, "compile": 1.1 if dtype == "fp32" else 1.0},
            note="genfast DiTBlock vs the plain-PyTorch DiT block with the same weights")
