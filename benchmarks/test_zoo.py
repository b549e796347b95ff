"""End-to-end zoo cases: a DiT training step and CFG sampling, genfast vs the same model in eager
PyTorch and under torch.compile, in one run (issue 7's performance section).

  genfast  the zoo DiT (genfast.zoo.dit: genfast.nn.DiTBlock, adaln_modulate / gated_residual /
           attention) trained with rectified_flow.flow_loss and sampled with the zoo's sampler
           (rectified_flow.sample: the conditioning of all 50 steps computed up front, the image
           tokens embedded once for both CFG halves, the fused Euler / CFG step in place)
  eager    PlainDiT below: the same architecture written the way a user writes it from the DiT paper
           / facebookresearch DiT models.py (Conv2d patch embed, nn.LayerNorm + x * (1 + scale) +
           shift, F.scaled_dot_product_attention, x + gate * y, F.gelu(tanh)), loaded with the same
           weights, sampled by the plain loop genfast.reference.sample_rectified_flow (torch.cat of
           [x, x], x - dt * ((1 + w) v_c - w v_u)) under torch.no_grad
  compile  PlainDiT under torch.compile (fullgraph, static shapes), the same plain loop around it

Models: the demo's default (flow_job.DEFAULTS: 16x16 digits, patch 4, hidden 128, depth 4; batch 128
training, 50-step CFG sampling of 20 images = 40 rows per model call) and DiT-S/2 on 32x32x4 latents at
batch 8 (one training step; CFG sampling timed per step on the doubled batch of 16, since 50 steps of
S/2 take minutes on 2 cores: a 50-step run is 50 of these).
"""
import math

import pytest
import torch
from torch import nn

genfast = pytest.importorskip("genfast", reason="genfast is not importable: build and install it (pip install .)")

from genfast import reference  # noqa: E402
from genfast.zoo import flow_job  # noqa: E402
from genfast.zoo import rectified_flow as rf  # noqa: E402
from genfast.zoo.dit import DiT, flops_per_sample, sincos_pos_embed  # noqa: E402

CUDA = torch.cuda.is_available()
NULL = 10


PlainBlock = reference.DiTBlock  # the plain-PyTorch DiT block (timm attention through SDPA)


class PlainDiT(nn.Module):
    """The eager baseline: the zoo DiT's architecture and parameter names in plain PyTorch."""

    def __init__(self, cfg):
        super().__init__()
        hidden, p, ch = cfg["hidden_size"], cfg["patch_size"], cfg["in_channels"]
        self.p, self.ch = p, ch
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(ch, hidden, p, stride=p)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(cfg["num_classes"] + 1, hidden)
        self.register_buffer("pos_embed", sincos_pos_embed(hidden, cfg["input_size"] // p)[None], persistent=False)
        self.blocks = nn.ModuleList([PlainBlock(hidden, cfg["num_heads"], cfg["mlp_ratio"])
                                     for _ in range(cfg["depth"])])
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(hidden, p * p * ch)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)

    def forward(self, x, t, y):
        b, _, h, w = x.shape
        tok = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        half = 128
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
        a = (t * 1000.0)[:, None] * freqs[None]
        c = self.t_embedder.mlp(torch.cat([torch.cos(a), torch.sin(a)], -1)) + self.y_embedder.embedding_table(y)
        for blk in self.blocks:
            tok = blk(tok, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        out = self.final_layer.linear(self.norm(tok) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))
        p, ch = self.p, self.ch
        out = out.view(b, h // p, w // p, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, ch, h, w)


def _models(kind, device):
    """(genfast zoo DiT, PlainDiT with the same weights, image shape)."""
    torch.manual_seed(0)
    if kind == "demo":
        m, shape = flow_job.build(flow_job.DEFAULTS), (1, 16, 16)
    elif kind == "S/2":
        m, shape = DiT.from_config("S/2", input_size=32, in_channels=4), (4, 32, 32)
    else:
        m, shape = DiT.from_config("XL/2", input_size=32, in_channels=4), (4, 32, 32)
    for p in m.parameters():  # leave adaLN-Zero's zeros: every block must do real work
        p.data.add_(0.02 * torch.randn_like(p))
    plain = PlainDiT(m.config)
    plain.load_state_dict(m.state_dict())
    return m.to(device), plain.to(device), shape


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
    model, plain, shape = _models(kind, dev)
    x = torch.randn(batch, *shape, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # an optimizer that changes little: same work each call
    opt_plain = torch.optim.SGD(plain.parameters(), lr=1e-6)
    g = torch.Generator(device=dev).manual_seed(0)
    compiled = torch.compile(plain, fullgraph=True, dynamic=False)
    torch.testing.assert_close(_train_step(model, opt, x, y, torch.Generator(device=dev).manual_seed(1)),
                               _train_step(plain, opt_plain, x, y, torch.Generator(device=dev).manual_seed(1)),
                               atol=1e-4, rtol=1e-4)  # the same model: the same loss
    flops = 3 * flops_per_sample(model, shape[-1]) * batch
    targets = ({"eager": 1.3 if kind == "demo" else 1.1, "compile": 1.0} if not CUDA else {"eager": 1.2})
    compare(f"DiT {kind} train step, batch {batch}, fp32", {
        "genfast": lambda: _train_step(model, opt, x, y, g),
        "eager": lambda: _train_step(plain, opt_plain, x, y, g),
        "compile": lambda: _train_step(compiled, opt_plain, x, y, g),
    }, flops=flops, targets=targets, note="SGD step included; eager = PlainDiT (see module docstring)")


def _sampler(model, shape, n, steps, eager):
    labels = torch.arange(n, device=next(model.parameters()).device) % 10

    def run():
        g = torch.Generator(device=labels.device).manual_seed(1)
        if eager:
            with torch.no_grad():
                return reference.sample_rectified_flow(model, (n, *shape), steps=steps, guidance=3.0, labels=labels,
                                                       null_label=NULL, generator=g, device=labels.device)
        return rf.sample(model, (n, *shape), steps=steps, guidance=3.0, labels=labels, null_label=NULL, generator=g,
                         device=labels.device)  # the zoo's sampler, as the demo runs it
    return run


CASES_SAMPLE = [("demo", 20, 50), ("S/2", 8, 1)] + ([("XL/2", 32, 50)] if CUDA else [])


@pytest.mark.parametrize("kind,n,steps", CASES_SAMPLE, ids=lambda v: str(v).replace("/", ""))
def test_dit_cfg_sampling(compare, kind, n, steps):
    dev = compare.device
    model, plain, shape = _models(kind, dev)
    model.eval()
    plain.eval()
    compiled = torch.compile(plain, fullgraph=True, dynamic=False)
    a = _sampler(model, shape, n, steps, eager=False)()
    b = _sampler(plain, shape, n, steps, eager=True)()
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)  # the benchmarked runs give the same samples
    flops = 2 * n * steps * flops_per_sample(model, shape[-1])
    targets = ({"eager": 1.3 if kind == "demo" else 1.1, "compile": 1.0} if not CUDA else {"eager": 1.3, "compile": 1.1})
    compare(f"DiT {kind} CFG sampling, {n} images x {steps} steps, fp32", {
        "genfast": _sampler(model, shape, n, steps, eager=False),
        "eager": _sampler(plain, shape, n, steps, eager=True),
        "compile": _sampler(compiled, shape, n, steps, eager=True),
    }, flops=flops, targets=targets, note="CFG: one model call on the doubled batch per step, guidance 3")
