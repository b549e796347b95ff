"""genfast's differentiable ops, modules and patched models under torch.func transforms (grad, jvp,
vmap, jacrev), forward-mode AD (torch.autograd.forward_ad) and batched gradients (is_grads_batched):
the results of the same transform of
the plain-PyTorch reference (genfast.ops._common.transformed routes such calls there), and JVPs that
agree with the kernels' own eager backward: <J t, u> = <t, J^T u>.

Consistency-model / MeanFlow training runs torch.func.jvp through a DiT, per-sample gradients run
vmap(grad(...)): before this routing the JVP of a genfast op was zero without an error."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jacrev, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import genfast
import genfast.nn
from genfast import reference
from genfast.ops import gelu

GEN = torch.Generator().manual_seed(0)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=GEN).to(dtype)


X = _randn(2, 5, 8)
SHIFT, SCALE, TOKENS = _randn(2, 8), _randn(2, 8), _randn(2, 5, 8)
K, V = _randn(2, 2, 6, 8), _randn(2, 2, 6, 8)
MASK = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
CAUSAL_MASK = torch.tensor([[False, True, True, True, True, True], [True] * 6])  # row 0 of sample 0: no key
EPS = _randn(2, 5, 8)
DT = torch.tensor([0.1, 0.3])

# name -> (genfast's function, the reference's, its input); each a function of one tensor
OPS = {
    "modulate": (lambda a: genfast.adaln_modulate(a, SHIFT, SCALE), lambda a: reference.adaln_modulate(a, SHIFT, SCALE),
                 X),
    "modulate_rms_per_token": (lambda a: genfast.adaln_modulate(a, None, TOKENS * a, norm="rms"),
                               lambda a: reference.adaln_modulate(a, None, TOKENS * a, norm="rms"), X),
    "modulate_of_shift": (lambda s: genfast.adaln_modulate(X, s, SCALE), lambda s: reference.adaln_modulate(X, s, SCALE),
                          SHIFT),
    "gated_residual": (lambda a: genfast.gated_residual(a, SCALE, a * 2), lambda a: reference.gated_residual(a, SCALE, a * 2),
                       X),
    "gated_of_gate": (lambda g: genfast.gated_residual(X, g, TOKENS), lambda g: reference.gated_residual(X, g, TOKENS),
                      SHIFT),
    "attention": (lambda q: genfast.attention(q, K, V), lambda q: reference.attention(q, K, V), _randn(2, 2, 5, 8)),
    "attention_kv": (lambda k: genfast.attention(K, k, k * 2), lambda k: reference.attention(K, k, k * 2), K),
    "attention_masked_causal": (lambda q: genfast.attention(q, K, V, causal=True, key_padding_mask=CAUSAL_MASK),
                                lambda q: reference.attention(q, K, V, causal=True, key_padding_mask=CAUSAL_MASK),
                                _randn(2, 2, 6, 8)),
    "attention_mask": (lambda q: genfast.attention(q, K, V, key_padding_mask=MASK),
                       lambda q: reference.attention(q, K, V, key_padding_mask=MASK), _randn(2, 2, 5, 8)),
    "flow_step": (lambda a: genfast.flow_euler_step(a, a * 2, TOKENS, dt=DT, guidance=2.0),
                  lambda a: reference.flow_euler_step(a, a * 2, TOKENS, dt=DT, guidance=2.0), X),
    "flow_step_no_cfg": (lambda a: genfast.flow_euler_step(X, a, dt=0.25), lambda a: reference.flow_euler_step(X, a, dt=0.25),
                         X),
    "reparam_kl_z": (lambda m: genfast.reparam_kl(m, m * 0.5, noise=EPS)[0],
                     lambda m: reference.reparam_kl(m, m * 0.5, noise=EPS)[0], X),
    "reparam_kl_loss": (lambda lv: genfast.reparam_kl(X, lv, noise=EPS, reduction="none")[1],
                        lambda lv: reference.reparam_kl(X, lv, noise=EPS, reduction="none")[1], X * 3),
    "gelu_tanh": (gelu.gelu_tanh, lambda a: F.gelu(a, approximate="tanh"), X),
}


@pytest.fixture(autouse=True)
def _same_inputs_in_any_order():
    GEN.manual_seed(1)  # the tests below draw from GEN too: the same numbers whatever ran first


def _fwd_ad(fn, a, t):
    with forward_ad.dual_level():
        out = forward_ad.unpack_dual(fn(forward_ad.make_dual(a, t)))
        return out.primal, out.tangent


TRANSFORMS = {
    "grad": lambda fn, a, t: grad(lambda a: (fn(a) * torch.cos(fn(a))).sum())(a),
    "jvp": lambda fn, a, t: jvp(fn, (a,), (t,)),
    "vmap": lambda fn, a, t: vmap(fn)(torch.stack([a, 2 * a, -a])),
    "vmap_grad": lambda fn, a, t: vmap(grad(lambda a: fn(a).square().sum()))(torch.stack([a, 2 * a])),
    "jacrev": lambda fn, a, t: jacrev(fn)(a),
    "forward_ad": _fwd_ad,
}


def _close(got, want, name, rtol=1e-5, atol=1e-6):
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), name
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{name}[{i}]", rtol, atol)
        return
    assert got is not None, f"{name}: no result (a dropped tangent)"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("op", list(OPS))
def test_op_under_transform_equals_reference(op, transform):
    ours, ref, a = OPS[op]
    t = torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    _close(TRANSFORMS[transform](ours, a, t), TRANSFORMS[transform](ref, a, t), f"{op} under {transform}")


@pytest.mark.parametrize("op", list(OPS))
def test_jvp_agrees_with_the_kernels_backward(op):
    """<J t, u> from torch.func.jvp (the reference) = <t, J^T u> from genfast's eager backward (the
    kernels): the JVP is the derivative of what the kernels compute, not merely of the reference."""
    ours, _, a = OPS[op]
    t = torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    primal, tangent = jvp(ours, (a,), (t,))
    leaf = a.clone().requires_grad_()
    out = ours(leaf)
    u = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (vjp,) = torch.autograd.grad(out, leaf, u)
    torch.testing.assert_close(primal, out.detach(), rtol=1e-5, atol=1e-5)  # the kernels' forward
    torch.testing.assert_close((tangent * u).sum(), (vjp * t).sum(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", list(OPS))
def test_batched_gradients(op):
    """torch.autograd.grad(..., is_grads_batched=True) (and jacobian(vectorize=True), built on it): the
    backward gets batched gradients without storage of their own, which the kernels cannot read; it
    recomputes through the reference (genfast.ops._common.backward_by_reference)."""
    ours, ref, a = OPS[op]
    got, want = [], []
    for fn, res in ((ours, got), (ref, want)):
        leaf = a.clone().requires_grad_()
        out = fn(leaf)
        cot = torch.randn(3, *out.shape, generator=torch.Generator().manual_seed(2))
        res.append(torch.autograd.grad(out, leaf, cot, is_grads_batched=True)[0])
        res.append(torch.autograd.functional.jacobian(fn, a, vectorize=True))
    _close(tuple(got), tuple(want), f"{op} batched gradients")


def test_reparam_kl_with_seed_under_grad_uses_the_kernels_noise():
    mu, logvar = X, X * 0.3
    z_eager, kl_eager = genfast.reparam_kl(mu, logvar, seed=(7, 3))
    dmu = grad(lambda m: genfast.reparam_kl(m, logvar, seed=(7, 3))[0].sum())(mu)
    z, kl = vmap(lambda m: genfast.reparam_kl(m, logvar[0], seed=(7, 3)), randomness="same")(mu[:1])
    torch.testing.assert_close(z[0], genfast.reparam_kl(mu[:1], logvar[:1], seed=(7, 3))[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dmu, torch.ones_like(mu))
    _, kl_t = jvp(lambda m: genfast.reparam_kl(m, logvar, seed=(7, 3))[1], (mu,), (torch.ones_like(mu),))
    torch.testing.assert_close(kl_t, mu.sum((1, 2)))  # d/dmu of 0.5 mu^2 summed: mu . 1
    assert z_eager.shape == mu.shape and kl_eager.shape == (2,)


def test_flow_step_out_under_forward_ad():
    x = X.clone()
    with forward_ad.dual_level():
        v = forward_ad.make_dual(TOKENS, torch.ones_like(TOKENS))
        res = genfast.flow_euler_step(x, v, dt=0.5, out=x)
        tangent = forward_ad.unpack_dual(res).tangent
    assert res is x
    torch.testing.assert_close(tangent, torch.full_like(x, -0.5))


# ------------------------------------------------------------------------------------- modules
def _block_pair():
    torch.manual_seed(0)
    ours = genfast.nn.DiTBlock(32, 2)
    for p in ours.parameters():
        p.data.normal_(0, 0.1, generator=GEN)
    ref = reference.DiTBlock(32, 2)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _math_sdpa(fn):
    """The reference block's SDPA on the math backend: torch's CPU flash kernel has no forward-mode AD."""
    def run(*args):
        with sdpa_kernel(SDPBackend.MATH):
            return fn(*args)
    return run


def test_dit_block_jvp_and_forward_ad():
    ours, ref = _block_pair()
    x, c = _randn(2, 9, 32), _randn(2, 32)
    tx, tc = torch.randn_like(x), torch.randn_like(c)
    want = jvp(_math_sdpa(ref), (x, c), (tx, tc))
    # (the reference block's LayerNorm and SDPA round in another order than genfast.reference's ops)
    _close(jvp(ours, (x, c), (tx, tc)), want, "DiTBlock jvp", rtol=1e-4, atol=1e-5)
    with forward_ad.dual_level():  # the fused path must step aside for dual tensors
        out = forward_ad.unpack_dual(ours(forward_ad.make_dual(x, tx), forward_ad.make_dual(c, tc)))
    _close((out.primal, out.tangent), want, "DiTBlock forward AD", rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(want[0], ours(x, c), rtol=1e-5, atol=1e-5)  # the fused eager path's forward


def test_dit_block_batched_gradients():
    ours, ref = _block_pair()
    x, c = _randn(2, 9, 32), _randn(2, 32)
    cot = _randn(3, 2, 9, 32)
    got, want = [], []
    for block, res in ((ours, got), (_math_sdpa(ref), want)):
        leaf = x.clone().requires_grad_()
        res.append(torch.autograd.grad(block(leaf, c), leaf, cot, is_grads_batched=True)[0])
    _close(got[0], want[0], "DiTBlock batched gradients", rtol=1e-4, atol=1e-5)


def test_dit_block_per_sample_gradients():
    ours, ref = _block_pair()
    params = {k: v.detach() for k, v in ours.named_parameters()}
    xs, c = _randn(3, 1, 9, 32), _randn(1, 32)

    def loss(p, block, x):
        return functional_call(block, p, (x, c)).square().sum()

    got = vmap(grad(loss), in_dims=(None, None, 0))(params, ours, xs)
    with sdpa_kernel(SDPBackend.MATH):
        want = vmap(grad(loss), in_dims=(None, None, 0))(params, ref, xs)
    for name in params:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    x0 = xs[1].clone()
    ours.zero_grad()
    loss(dict(ours.named_parameters()), ours, x0).backward()  # eager, fused path: the kernels
    for name, p in ours.named_parameters():
        torch.testing.assert_close(got[name][1], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_zoo_dit_jvp_agrees_with_its_backward():
    from zoo_tiny import tiny_dit

    model = tiny_dit()
    x, t, y = _randn(2, 1, 8, 8), torch.tensor([0.3, 0.7]), torch.tensor([1, 4])
    tx, tt = torch.randn_like(x), torch.tensor([0.5, -1.0])
    out, tangent = jvp(lambda x, t: model(x, t, y), (x, t), (tx, tt))
    xl, tl = x.clone().requires_grad_(), t.clone().requires_grad_()
    eager = model(xl, tl, y)
    u = torch.randn_like(eager)
    gx, gt = torch.autograd.grad(eager, (xl, tl), u)
    torch.testing.assert_close(out, eager.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((tangent * u).sum(), (gx * tx).sum() + (gt * tt).sum(), rtol=1e-4, atol=1e-4)


def test_patched_diffusers_dit_jvp_equals_unpatched():
    pytest.importorskip("diffusers")
    from diffusers_tiny import dit

    model, shape = dit()
    x, t, y = _randn(*shape), torch.tensor([300, 700]), torch.tensor([1, 4])
    tx = torch.randn_like(x)

    def run(x):
        return model(x, timestep=t, class_labels=y).sample

    want = jvp(_math_sdpa(run), (x,), (tx,))
    with genfast.patch(model) as handle:
        assert handle.report.swapped
        got = jvp(run, (x,), (tx,))
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
