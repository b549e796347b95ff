"""genfast.patch on a diffusers transformer (issue 8, performance): a DiT-S-sized
DiTTransformer2DModel forward (hidden 384 = 6 heads x 64, depth 12, 32x32x4 latents with patch 2
= 256 tokens, batch 4, random weights, fp32 on the CPU; DiT-XL/2 sizes in bf16 on a GPU).

  patched          genfast.patch(model): genfast processors (one q/k/v GEMM, genfast.attention),
                   adaln_modulate and gated_residual in the block forwards
  eager            the same weights, unpatched (diffusers' own code)
  patched+compile  torch.compile(patched model, fullgraph=True)
  compile          torch.compile(unpatched model, fullgraph=True)

Targets (issue 8): CPU fp32: patched >= 1.15x eager, patched+compile >= 1.0x compile;
GPU bf16: >= 1.3x eager and >= 1.1x compile.
"""
import copy

import pytest
import torch

genfast = pytest.importorskip("genfast", reason="genfast is not importable: build and install it (pip install .)")
diffusers = pytest.importorskip("diffusers", reason="needs the diffusers extra: pip install .[diffusers]")

CUDA = torch.cuda.is_available()
# (heads, head dim, depth, latent size, batch): DiT-S/2 at 32x32 latents on the CPU;
# DiT-XL/2 at 256 and 1024 tokens on a GPU
SIZES = [("DiT-XL/2-256tok", (16, 72, 28, 32, 8)), ("DiT-XL/2-1024tok", (16, 72, 28, 64, 4))] if CUDA else \
    [("DiT-S/2-256tok", (6, 64, 12, 32, 4))]


def _models(heads, head_dim, depth, size, batch, device, dtype):
    torch.manual_seed(0)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                        num_layers=depth, sample_size=size, patch_size=2)
    for p in m.parameters():  # random weights everywhere (the adaLN-Zero init would zero the blocks out)
        torch.nn.init.normal_(p, std=0.02)
    m = m.to(device=device, dtype=dtype).eval()
    patched = copy.deepcopy(m)
    genfast.patch(patched)
    x = torch.randn(batch, 4, size, size, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    return m, patched, (x, t, y)


def _run(model, args):
    @torch.no_grad()
    def fn():
        return model(*args, return_dict=False)[0]
    return fn


def _flops(heads, head_dim, depth, size, batch):
    c, n = heads * head_dim, (size // 2) ** 2
    return 2 * batch * depth * (12 * n * c * c + 2 * n * n * c)


@pytest.mark.parametrize("name,cfg", SIZES, ids=[s[0] for s in SIZES])
def test_dit_forward_eager(compare, name, cfg):
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    m, patched, args = _models(*cfg, device, dtype)
    compare(f"diffusers {name} forward {str(dtype)[6:]}", {"patched": _run(patched, args), "eager": _run(m, args)},
            flops=_flops(*cfg), targets={"eager": 1.3 if CUDA else 1.15})


@pytest.mark.parametrize("name,cfg", SIZES, ids=[s[0] for s in SIZES])
def test_dit_forward_compile(compare, name, cfg):
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    m, patched, args = _models(*cfg, device, dtype)
    compare(f"diffusers {name} forward {str(dtype)[6:]} compiled",
            {"patched+compile": _run(torch.compile(patched, fullgraph=True), args),
             "compile": _run(torch.compile(m, fullgraph=True), args),
             "patched": _run(patched, args)},
            flops=_flops(*cfg), targets={"compile": 1.1 if CUDA else 1.0})


@pytest.mark.skipif(not CUDA, reason="the Flux-sized case needs a GPU (bf16, 4096 + 512 tokens)")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_flux_forward_gpu(compare, compiled):
    """Reduced Flux: hidden 3072 = 24 heads x 128, 2 double + 2 single blocks, 4096 image + 512 text
    tokens, batch 1, bf16."""
    torch.manual_seed(0)
    m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                         pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
    m = m.to("cuda", torch.bfloat16).eval()
    patched = copy.deepcopy(m)
    genfast.patch(patched)
    n, t = 4096, 512
    ids = torch.stack(torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij"), -1).reshape(n, 2)
    kw = dict(hidden_states=torch.randn(1, n, 64), encoder_hidden_states=torch.randn(1, t, 4096),
              pooled_projections=torch.randn(1, 768), timestep=torch.tensor([0.5]),
              img_ids=torch.cat([torch.zeros(n, 1), ids.float()], 1), txt_ids=torch.zeros(t, 3))
    kw = {k: v.cuda() if k.endswith("_ids") else v.to("cuda", torch.bfloat16) for k, v in kw.items()}

    def run(model):
        @torch.no_grad()
        def fn():
            return model(**kw, return_dict=False)[0]
        return fn
    if compiled:
        impls = {"patched+compile": run(torch.compile(patched, fullgraph=True)),
                 "compile": run(torch.compile(m, fullgraph=True))}
    else:
        impls = {"patched": run(patched), "eager": run(m)}
    compare(f"diffusers Flux-reduced forward bf16{' compiled' if compiled else ''}", impls,
            targets={"compile": 1.1} if compiled else {"eager": 1.3})
