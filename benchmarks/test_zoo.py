"""End-to-end zoo cases: a DiT training step and CFG sampling, genfast vs the same model in eager
PyTorch and under torch.compile, in one run (issue 7's performance section).

  genfast  the zoo DiT with its hot ops through genfast (genfast.zoo._ops forwarding to every merged
           op; genfast.nn.DiTBlock once merged) and the fused Euler / CFG sampling step
  eager    the same module, same weights, with the plain-PyTorch versions of those ops (the seam
           switched off: F.layer_norm + modulate, SDPA, x + gate * y, the plain sampling loop)
  compile  that eager model under torch.compile (fullgraph), the sampling loop around it eager

Models: the demo's default (16x16 digits, batch 128 training, 50-step CFG sampling of 40 images)
and DiT-S/2 on 32x32x4 latents at batch 8 (one training step; CFG sampling timed per step on the
doubled batch of 16, since 50 steps of S/2 take minutes on 2 cores: a 50-step run is 50 of these).
"""
import pytest
import torch

genfast = pytest.importorskip("genfast", reason="genfast is not importable: build and install it (pip install .)")

from genfast import reference  # noqa: E402
from genfast.zoo import _ops, flow_job  # noqa: E402
from genfast.zoo import rectified_flow as rf  # noqa: E402
from genfast.zoo.dit import DiT, flops_per_sample  # noqa: E402

CUDA = torch.cuda.is_available()
NULL = 10


def _seam(enabled, fn):
    def run(*a, **k):
        with _ops.use_genfast(enabled):
            return fn(*a, **k)
    return run


def _model(kind, device):
    torch.manual_seed(0)
    if kind == "demo":
        m, shape = flow_job.build(flow_job.DEFAULTS), (1, 16, 16)
    elif kind == "S/2":
        m, shape = DiT.from_config("S/2", input_size=32, in_channels=4), (4, 32, 32)
    else:
        m, shape = DiT.from_config("XL/2", input_size=32, in_channels=4), (4, 32, 32)
    for p in m.parameters():  # leave adaLN-Zero's zeros: every block must do real work
        p.data.add_(0.02 * torch.randn_like(p))
    return m.to(device), shape


def _train_step(model, opt, x, y, g):
    loss = rf.flow_loss(model, x, y, null_label=NULL, label_dropout=0.1, generator=g)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


CASES_TRAIN = [("demo", 128), ("S/2", 8)] + ([("XL/2", 32)] if CUDA else [])


@pytest.mark.parametrize("kind,batch", CASES_TRAIN, ids=lambda v: str(v).replace("/", ""))
def test_dit_train_step(compare, kind, batch):
    dev = compare.device
    model, shape = _model(kind, dev)
    x = torch.randn(batch, *shape, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # an optimizer that changes little: same work each call
    g = torch.Generator(device=dev).manual_seed(0)
    with _ops.use_genfast(False):
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
    flops = 3 * flops_per_sample(model, shape[-1]) * batch
    targets = ({"eager": 1.3 if kind == "demo" else 1.1, "compile": 1.0} if not CUDA else {"eager": 1.2})
    compare(f"DiT {kind} train step, batch {batch}, fp32", {
        "genfast": _seam(True, lambda: _train_step(model, opt, x, y, g)),
        "eager": _seam(False, lambda: _train_step(model, opt, x, y, g)),
        "compile": _seam(False, lambda: _train_step(compiled, opt, x, y, g)),
    }, flops=flops, targets=targets, note="SGD step included; the seam switched per impl (see module docstring)")


def _sampler(model, shape, n, steps, eager):
    labels = torch.arange(n, device=next(model.parameters()).device) % 10

    def run():
        g = torch.Generator(device=labels.device).manual_seed(1)
        with torch.no_grad():
            if eager:
                return reference.sample_rectified_flow(model, (n, *shape), steps=steps, guidance=3.0, labels=labels,
                                                       null_label=NULL, generator=g, device=labels.device)
            return genfast.sample_rectified_flow(model, (n, *shape), steps=steps, guidance=3.0, labels=labels,
                                                 null_label=NULL, generator=g, device=labels.device)
    return run


CASES_SAMPLE = [("demo", 20, 50), ("S/2", 8, 1)] + ([("XL/2", 32, 50)] if CUDA else [])


@pytest.mark.parametrize("kind,n,steps", CASES_SAMPLE, ids=lambda v: str(v).replace("/", ""))
def test_dit_cfg_sampling(compare, kind, n, steps):
    dev = compare.device
    model, shape = _model(kind, dev)
    model.eval()
    with _ops.use_genfast(False):
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
    a = _sampler(model, shape, n, steps, eager=False)()
    with _ops.use_genfast(False):
        b = _sampler(model, shape, n, steps, eager=True)()
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)  # the benchmarked runs give the same samples
    flops = 2 * n * steps * flops_per_sample(model, shape[-1])
    targets = ({"eager": 1.3 if kind == "demo" else 1.1, "compile": 1.0} if not CUDA else {"eager": 1.3, "compile": 1.1})
    compare(f"DiT {kind} CFG sampling, {n} images x {steps} steps, fp32", {
        "genfast": _seam(True, _sampler(model, shape, n, steps, eager=False)),
        "eager": _seam(False, _sampler(model, shape, n, steps, eager=True)),
        "compile": _seam(False, _sampler(compiled, shape, n, steps, eager=True)),
    }, flops=flops, targets=targets, note="CFG: one model call on the doubled batch per step, guidance 3")
