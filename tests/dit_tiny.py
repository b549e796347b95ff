"""A plain-PyTorch DiT block and genfast.nn.DiTBlock with the same random weights, and the fixtures
and helpers of the fused-block tests (test_dit_block_fused.py, test_dit_block_fusions.py), which
import them (not a test module; tests/conftest.py puts this folder on sys.path)."""
import pytest
import torch
from torch import nn

import genfast.nn
from genfast import reference
from genfast.ops import dit_block


def block_pair(hidden=64, heads=4, dtype=torch.float32, seed=0, std=0.2):
    """(reference.DiTBlock, genfast.nn.DiTBlock) in dtype, weights ~ N(0, std) (adaLN-Zero's zero
    initialisation would make the modulation trivial)."""
    torch.manual_seed(seed)
    ref = reference.DiTBlock(hidden, heads)
    for p in ref.parameters():
        nn.init.normal_(p, std=std)
    ours = genfast.nn.DiTBlock(hidden, heads)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(dtype), ours.to(dtype)


@pytest.fixture(autouse=True, name="_onednn_gemms")
def onednn_gemms(monkeypatch):
    """fp32 CPU GEMMs on oneDNN, the default but on Intel CPUs (MKL there), which these tests' bit
    and call-sequence claims describe; test_fused_equals_eager_fp32 also runs torch's GEMMs."""
    monkeypatch.setattr(genfast.ops.linear, "USE_ONEDNN", True)


@pytest.fixture
def path(monkeypatch):
    """path(True | False): DiTBlock takes (or not) the fused path on every device for the test."""
    def set_path(fused):
        monkeypatch.setattr(dit_block, "USE_FUSED", {"cpu": fused, "cuda": fused})
    return set_path


def _run(block, x, c, g, leaves=True):
    """[out, dx, dc, *dparams] (None for an input or parameter that does not require grad)."""
    xi, ci = x.clone().requires_grad_(x.requires_grad), c.clone().requires_grad_(c.requires_grad)
    out = block(xi, ci)
    wrt = [t for t in (xi, ci, *block.parameters()) if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wrt, g)) if wrt else iter(())
    return [out] + [next(grads) if t.requires_grad else None for t in (xi, ci, *block.parameters())]


def _names(block):
    return ["out", "x", "c", *dict(block.named_parameters())]


def _nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is not None and f not in seen:
            seen.add(f)
            todo.extend(n for n, _ in f.next_functions)
    return {type(f).__name__ for f in seen}


def _bias_in_gated(monkeypatch, on):
    """proj / fc2 bias gradients from the gated-residual backward (on) or torch's column sums."""
    monkeypatch.setattr(dit_block, "BIAS_IN_GATED", {"cpu": on, "cuda": on})
