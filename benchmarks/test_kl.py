"""Reparameterized sample + KL, forward and backward: genfast.reparam_kl vs eager PyTorch (randn_like
+ the formulas, as diffusers' DiagonalGaussianDistribution writes them) and torch.compile of the
same (its own RNG, and with fallback_random=True, i.e. eager's randn inside the compiled graph).

Bytes per forward+backward (what must move): read mu, logvar; write z; read dz; write dmu,
dlogvar = 6 N elements (the KL [B] and its gradient are negligible). Also recorded per case: the
memory each implementation keeps for the backward (unique storages saved by autograd, mu's and
logvar's own storage excluded: every implementation keeps those).
"""
import pytest
import torch

genfast = pytest.importorskip("genfast", reason="genfast is not importable: build and install it (pip install .)")

CUDA = torch.cuda.is_available()
SHAPES = [(64, 16, 64, 64)] if CUDA else [(16, 16, 32, 32), (64, 16, 32, 32)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the targets: CPU >= 2x eager and >= 1x compile; GPU >= 3x eager and >= 1.3x compile
TARGETS = {"eager": 3.0, "compile": 1.3, "compile_fallback_random": 1.3} if CUDA else {
    "eager": 2.0, "compile": 1.0, "compile_fallback_random": 1.0}


def eager_reparam_kl(mu, logvar):
    logvar = torch.clamp(logvar, -30.0, 20.0)
    std = torch.exp(0.5 * logvar)
    var = torch.exp(logvar)
    z = mu + std * torch.randn_like(mu)
    kl = 0.5 * torch.sum(mu.pow(2) + var - 1.0 - logvar, dim=list(range(1, mu.dim())))
    return z, kl


def _saved_bytes(fn, mu, lv):
    """Bytes of the unique storages autograd keeps for the backward of fn(mu, lv), without mu's and
    logvar's own storage; None when the implementation hides its saved tensors from the hooks."""
    seen = {}
    skip = {mu.untyped_storage().data_ptr(), lv.untyped_storage().data_ptr()}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(mu, lv)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return f"unmeasured: {type(e).__name__}"
    del out
    return sum(seen.values())


def _fwd_bwd(fn, mu, lv, dz, dkl):
    def run():
        z, kl = fn(mu, lv)
        return torch.autograd.grad((z, kl), (mu, lv), (dz, dkl))
    return run


def _name(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("dtype", ["fp32"] + (["bf16"] if CUDA else []))
@pytest.mark.parametrize("shape", SHAPES, ids=_name)
def test_reparam_kl_fwd_bwd(compare, shape, dtype):
    dt = DTYPES[dtype]
    enc = torch.randn((shape[0], 2 * shape[1], *shape[2:]), device=compare.device, dtype=dt)
    mu, lv = (t.detach().requires_grad_(True) for t in enc.chunk(2, dim=1))  # the encoder's halves
    dz = torch.randn(shape, device=compare.device, dtype=dt)
    dkl = torch.full((shape[0],), 1.0 / shape[0], device=compare.device)
    subject = lambda m, l: genfast.reparam_kl(m, l)  # noqa: E731
    # the benchmarked call must be right: same formulas on the kernel's own noise, which stays fp32 for
    # bf16 inputs (rounding it to bf16 first moved z by 0.03 where mu + eps * std cancels: H200, session 17)
    z, kl = genfast.reparam_kl(mu, lv, seed=3)
    eps = genfast.reference.philox_normal(3, 0, mu.numel(), device=mu.device).view(shape)
    zr, klr = genfast.reference.reparam_kl(mu.detach(), lv.detach(), noise=eps)
    torch.testing.assert_close(z, zr, rtol=1e-5 if dt == torch.float32 else 1e-2, atol=1e-5)
    torch.testing.assert_close(kl, klr, rtol=1e-5, atol=1e-3)
    impls = {"genfast": subject, "eager": eager_reparam_kl,
             "compile": compare.compile(eager_reparam_kl),
             "compile_fallback_random": compare.compile(eager_reparam_kl, options={"fallback_random": True})}
    calls = {k: _fwd_bwd(f, mu, lv, dz, dkl) for k, f in impls.items()}
    calls["randn_like"] = lambda: torch.randn_like(mu)  # the eager RNG alone, for scale (no target)
    n = mu.numel()
    rec = compare(f"reparam_kl fwd+bwd {dtype} {_name(shape)}", calls, bytes=6 * n * mu.element_size(),
                  targets=TARGETS, note="fwd+bwd; mu, logvar the two chunks of one encoder output; "
                  f"genfast backend: {genfast.ops.kl.backend_for(mu)}")
    saved = {}
    for k, f in impls.items():
        saved[k] = _saved_bytes(f, mu, lv)
    rec["saved_for_backward_bytes"] = saved
    print(f"\nmemory kept for the backward ({_name(shape)} {dtype}, N = {n}): " + ", ".join(
        (f"{k} {v / 2**20:.2f} MiB" if v >= 2**20 else f"{k} {v} B") if isinstance(v, int) else f"{k} {v}"
        for k, v in saved.items()))
    assert isinstance(saved["genfast"], int) and isinstance(saved["eager"], int) and saved["genfast"] < saved["eager"]


@pytest.mark.parametrize("shape", SHAPES[:1], ids=_name)
def test_reparam_kl_forward_only(compare, shape):
    """Inference-style sampling (no grad): the RNG and one pass."""
    mu, lv = torch.randn((shape[0], 2 * shape[1], *shape[2:]), device=compare.device).chunk(2, dim=1)
    compiled = compare.compile(eager_reparam_kl, options={"fallback_random": True})
    compare(f"reparam_kl fwd fp32 {_name(shape)}", {
        "genfast": lambda: genfast.reparam_kl(mu, lv),
        "eager": lambda: eager_reparam_kl(mu, lv),
        "compile_fallback_random": lambda: compiled(mu, lv),
        "randn_like": lambda: torch.randn_like(mu),
    }, bytes=3 * mu.numel() * 4, note="forward only (no grad)")


def _eager_moments(h):
    return eager_reparam_kl(*h.chunk(2, dim=1))


def _gf_chunks(h):
    return genfast.reparam_kl(*h.chunk(2, dim=1))


def _gf_moments(h):
    return genfast.reparam_kl_moments(h)


@pytest.mark.parametrize("shape", SHAPES[-1:], ids=_name)
def test_reparam_kl_from_encoder_output(compare, shape):
    """A VAE's training step: mu and logvar the halves of one encoder output h that needs a gradient.
    reparam_kl_moments writes dh into one buffer from its backward kernel; reparam_kl on h.chunk(2, 1)
    leaves autograd's split backward to concatenate dmu and dlogvar (another pass over both)."""
    h = torch.randn((shape[0], 2 * shape[1], *shape[2:]), device=compare.device, requires_grad=True)
    dz = torch.randn(shape, device=compare.device)
    dkl = torch.full((shape[0],), 1.0 / shape[0], device=compare.device)

    def grad_of(fn):
        def run():
            z, kl = fn(h)
            return torch.autograd.grad((z, kl), (h,), (dz, dkl))
        return run
    n = dz.numel()
    compare(f"reparam_kl fwd+bwd from the encoder output fp32 {_name(shape)}", {
        "genfast": grad_of(_gf_moments), "genfast_on_chunks": grad_of(_gf_chunks), "eager": grad_of(_eager_moments),
        "compile": grad_of(compare.compile(_eager_moments)),
    }, bytes=6 * n * 4, targets=TARGETS, note="reparam_kl_moments(h) vs reparam_kl(*h.chunk(2, 1)): h [B, 2C, H, W] "
            "requires grad; 6 N elements must move (read mu, logvar, dz; write z, dh)")
