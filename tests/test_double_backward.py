"""Double backward (torch.autograd.grad(..., create_graph=True) then a second backward: R1 / WGAN-GP
gradient penalties, Hessian-vector products) through genfast's ops and the fused DiT block: the
second-order gradients of the same computation in plain PyTorch. The kernels' gradients are not
differentiable; a backward asked to build a graph recomputes through the reference
(genfast.ops._common.graph_grads). Before, the second-order terms through genfast were lost without
an error (or, with torch.autograd.grad on chosen inputs, silently)."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import genfast
import genfast.nn
from genfast import reference
from genfast.ops import dit_block, gelu, linear


def _randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


X, TOKENS = _randn(0, 2, 5, 8), _randn(1, 2, 5, 8)
SHIFT, SCALE = _randn(2, 2, 8), _randn(3, 2, 8)
K, V = _randn(4, 2, 2, 6, 8), _randn(5, 2, 2, 6, 8)
MASK = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
EPS = _randn(6, 2, 5, 8)
W = _randn(7, 4, 8)

def _zk(z_kl):
    z, kl = z_kl
    return z + kl[:, None, None]


# name -> (genfast's function, the reference's, its input): one tensor in, one out; the input also
# reaches the result along a second path (as x does in a penalty), so cross terms count
OPS = {
    "modulate": (lambda a: genfast.adaln_modulate(a, SHIFT * a[:, 0], SCALE), lambda a: reference.adaln_modulate(
        a, SHIFT * a[:, 0], SCALE), X),
    "modulate_rms_per_token": (lambda a: genfast.adaln_modulate(a, None, a * TOKENS, norm="rms"),
                               lambda a: reference.adaln_modulate(a, None, a * TOKENS, norm="rms"), X),
    "gated": (lambda a: genfast.gated_residual(a, a[:, 0] * SCALE, a * a), lambda a: reference.gated_residual(
        a, a[:, 0] * SCALE, a * a), X),
    "gated_gate_only": (lambda g: genfast.gated_residual(X, g * g, TOKENS), lambda g: reference.gated_residual(
        X, g * g, TOKENS), SHIFT),
    "attention_mask": (lambda q: genfast.attention(q, q[:, :, :1].expand(-1, -1, 6, -1) * K, V, key_padding_mask=MASK),
                       lambda q: reference.attention(q, q[:, :, :1].expand(-1, -1, 6, -1) * K, V,
                                                     key_padding_mask=MASK), _randn(8, 2, 2, 5, 8)),
    "attention_causal": (lambda q: genfast.attention(q, q, q * 2, causal=True, key_padding_mask=MASK[:, :5]),
                         lambda q: reference.attention(q, q, q * 2, causal=True, key_padding_mask=MASK[:, :5]),
                         _randn(9, 2, 2, 5, 8)),
    "reparam_kl": (lambda a: genfast.reparam_kl(a, a * 0.5, noise=EPS)[1], lambda a: reference.reparam_kl(
        a, a * 0.5, noise=EPS)[1], X),
    "reparam_kl_z_seed": (lambda a: genfast.reparam_kl(a, -a, seed=3, reduction="none")[0],
                          None, X),  # the reference on the kernel's noise: checked against an fp64 gradgradcheck-like run
    "reparam_kl_moments": (lambda a: _zk(genfast.reparam_kl_moments(torch.cat([a, a * 0.3], 1), noise=EPS)),
                           lambda a: _zk(reference.reparam_kl(a, a * 0.3, noise=EPS)), X),
    "gelu": (gelu.gelu_tanh, lambda a: F.gelu(a, approximate="tanh"), X),
    "flow_step": (lambda a: genfast.flow_euler_step(a, a * a, TOKENS, dt=0.3, guidance=1.5),
                  lambda a: reference.flow_euler_step(a, a * a, TOKENS, dt=0.3, guidance=1.5), X),
}


def _second_order(fn, a):
    """The gradient of a penalty on fn's input gradient, plus a second path: (grad, d penalty / d a)."""
    a = a.clone().requires_grad_()
    out = fn(a)
    (g,) = torch.autograd.grad((out * out.detach().cos()).sum() + out.sum() ** 2, a, create_graph=True)
    (g2,) = torch.autograd.grad(g.square().sum() + (a * a).sum(), a)
    return g.detach(), g2


def _kl_seed_reference(a):
    noise = genfast.reparam_kl(a, -a, seed=3, reduction="none")[0].detach() - a.detach()  # eps * exp(-a / 2)
    return reference.reparam_kl(a, -a, noise=noise * torch.exp(a.detach() / 2), reduction="none")[0]


class _PassThrough(torch.overrides.TorchFunctionMode):
    """A torch function mode: genfast's calls take the registered ops (torch.ops.genfast.*) and their
    torch.library autograd instead of the eager autograd.Functions."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("registered", [False, True], ids=["eager", "registered_op"])
@pytest.mark.parametrize("op", list(OPS))
def test_second_order_gradients_equal_reference(op, registered, use_backend):
    use_backend("cpu")
    ours, ref, a = OPS[op]
    ref = ref or _kl_seed_reference
    if registered:
        with _PassThrough():
            g_ours, g2_ours = _second_order(ours, a)
    else:
        g_ours, g2_ours = _second_order(ours, a)
    g_ref, g2_ref = _second_order(ref, a)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g2_ours, g2_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("onednn", [True, False])
def test_linear_second_order(onednn, monkeypatch):
    monkeypatch.setattr(linear, "USE_ONEDNN", onednn)
    w = W.clone().requires_grad_()
    res = []
    for fn in (linear.linear, F.linear):
        x = X.clone().requires_grad_()
        out = fn(x * x, w, None)
        gx, gw = torch.autograd.grad(out.square().sum(), (x, w), create_graph=True)
        res.append(torch.autograd.grad(gx.square().sum() + gw.square().sum(), (x, w)))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_first_order_backward_still_on_the_kernels(use_backend, monkeypatch):
    """Without create_graph the kernels' backward runs (graph_grads is not called)."""
    from genfast.ops import _common, modulate

    use_backend("cpu")
    called = []
    monkeypatch.setattr(modulate, "graph_grads", lambda *a: called.append(1))
    x = X.clone().requires_grad_()
    genfast.adaln_modulate(x, SHIFT, SCALE).sum().backward()
    assert not called and x.grad is not None and _common.graph_grads is not None


@pytest.mark.parametrize("attention_in_node", [True, False])
def test_fused_dit_block_gradient_penalty(attention_in_node, use_backend, monkeypatch):
    """An R1-style penalty through genfast.nn.DiTBlock on its fused path (a transformer discriminator):
    every parameter's second-order gradient equals the plain-PyTorch block's."""
    use_backend("cpu")
    monkeypatch.setattr(dit_block, "ATTENTION_IN_NODE", attention_in_node)
    torch.manual_seed(0)
    ours = genfast.nn.DiTBlock(32, 2)
    for p in ours.parameters():
        p.data.normal_(0, 0.1)
    ref = reference.DiTBlock(32, 2)
    ref.load_state_dict(ours.state_dict())
    x0, c = _randn(10, 2, 9, 32), _randn(11, 2, 32)
    assert dit_block.fused_block_ok(ours, x0, c)
    results = []
    for block in (ours, ref):
        x = x0.clone().requires_grad_()
        with sdpa_kernel(SDPBackend.MATH):  # torch's CPU flash kernel has no double backward
            (g,) = torch.autograd.grad(block(x, c).square().sum(), x, create_graph=True)
            results.append(torch.autograd.grad(g.square().sum(), [x, *block.parameters()]))
    names = ["x"] + [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, *results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
