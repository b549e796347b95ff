"""DiT modules on genfast's ops: DiTAttention and DiTBlock (adaLN-Zero), drop-in for the reference
DiT block (Peebles & Xie, "Scalable Diffusion Models with Transformers", arXiv:2212.09748;
facebookresearch/DiT models.py): same parameter names and shapes, so a plain-PyTorch block's
state dict loads unchanged:

    adaLN_modulation.1.{weight,bias}  [6C, C], [6C]   SiLU + Linear: shift/scale/gate for attn and MLP
    attn.qkv.{weight,bias}            [3C, C], [3C]
    attn.proj.{weight,bias}           [C, C], [C]
    mlp.fc1.{weight,bias}             [hidden, C]     GELU(tanh) between
    mlp.fc2.{weight,bias}             [C, hidden]

The path through a block (plain eager calls): three autograd nodes, genfast.ops.dit_block -
adaln_modulate + the qkv Linear in one, attention over strided q/k/v views of the qkv output (no
transpose copy; torch's SDPA on GPUs), and proj, gated_residual (x + gate * y in one pass),
adaln_modulate, fc1, GELU(tanh), fc2 and gated_residual in the other, whose backwards call the
kernels and GEMMs in a row. Under torch.compile, autocast, with tensor subclasses or wrapped
Linears (LoRA) the block runs op by op on the registered genfast ops (the per-op path below).

Measured on an H200 (bf16, DiT-XL/2, batch 32, benchmarks/gpu/NOTES.md): forward 1.38x / 1.32x
eager and 1.15x / 1.12x torch.compile at 256 / 1024 tokens; forward + backward 1.05x / 1.18x eager,
0.93x / 1.00x compile (GEMMs and cuDNN attention are ~75 % of its GPU time; at 256 tokens the
step is bound by host time).

Measured on the 2-core CPU (torch 2.13, benchmarks/test_attention.py, DiT-S; the machine was shared
and loaded, so only paired ratios of one run count):
  - GELU(tanh): torch's CPU kernel for approximate="tanh" is slow (bf16: 4.1 ms forward, 4.1 ms
    backward over the 2048 x 1536 fc1 output on one core, vs 1.4 / 2.4 ms for genfast's single
    AVX-512 pass, genfast.ops.gelu); without autograd it runs in place over the fc1 output (no
    second 4C-wide buffer to page-fault in: fp32 9.2 -> 7.9 ms even out of place).
  - attention: bf16 uses the CPU path's "heads" way with p kept for the backward (~2-3x SDPA's bf16
    CPU kernel, which eager DiT calls); fp32 uses torch's flash kernel, as eager SDPA does.
  - The Linears (qkv, proj, fc1, fc2) run genfast.ops.linear: oneDNN's fp32 GEMM forward and
    backward on the CPU. torch's MKL sgemm reaches ~210 GFLOP/s on 2 threads of this AMD EPYC,
    oneDNN ~470: DiT-S block fp32 forward 1.02x -> 1.7-2.0x eager, forward + backward
    0.99x -> 1.56-1.58x (benchmarks/test_attention.py -k dit_block, quiet machine).
  - bf16 / fp16 where the CPU has no 16-bit GEMM instructions (AVX2 only): the Linears' GEMMs widened
    to fp32 and the attention's backward on torch's fp32 kernel (genfast.ops.linear.WIDENED): DiT-S
    bf16 4.0x eager forward and 16.4x forward + backward (2-core AVX2-only AMD EPYC, c6fe231).
  - Folding the modulation into the qkv / fc1 weights or the gate into proj means a per-sample copy
    of the weight (B x C x C), larger than the activation pass it saves at DiT sizes: not done.
  - Tried and dropped: a token-tiled MLP (fc1, GELU, fc2 and their backward over tiles of 128-512
    rows, so the 4C-wide intermediates stay in the L2). On the Xeon, fp32, per block, full GEMMs vs
    the best tile (512 rows): demo size (2048 x 128) forward 1.79-1.89 vs 1.81-1.91 ms, backward
    4.17-4.27 vs 4.85-5.01 ms; DiT-S (2048 x 384) 14.9-15.3 vs 15.6-15.9 and 31.4-31.6 vs 32.0-32.7
    ms (smaller tiles lose more). The smaller GEMMs lose more rate than the cache saves.
"""
import torch
import torch.nn.functional as F
from torch import nn

import genfast
from genfast.ops.dit_block import block_forward, fused_block_ok
from genfast.ops.gelu import gelu_tanh_inference
from genfast.ops.linear import has_hooks, linear_layer
from genfast.ops.qkv import qkv_projection


def _adaln_modulate(x, shift, scale, eps=1e-6):
    return genfast.adaln_modulate(x, shift, scale, eps=eps)


def _gated_residual(x, gate, y):
    return genfast.gated_residual(x, gate, y)


class DiTAttention(nn.Module):
    """Multi-head self-attention with the reference DiT/timm parameter names (qkv, proj)."""

    def __init__(self, hidden_size, num_heads, qkv_bias=True):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, *, key_padding_mask=None, causal=False):
        b, n, c = x.shape
        # [B, N, 3, H, D] -> three [B, H, N, D] views of the one qkv output: read in place (rows
        # padded per head where the GPU kernels want them aligned: genfast.ops.qkv).
        q, k, v = qkv_projection(x, self.qkv, self.num_heads)
        out = genfast.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
        return linear_layer(self.proj, out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, hidden_size, mlp_hidden):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x):
        # genfast's GELU(tanh): torch's CPU kernel for it is slow (genfast/ops/gelu.py)
        # in place over the fc1 output when no gradient is recorded (inference)
        return linear_layer(self.fc2, gelu_tanh_inference(linear_layer(self.fc1, x)))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning: forward(x [B, N, C], c [B, C]) -> [B, N, C]."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.attn = DiTAttention(hidden_size, num_heads, qkv_bias=True)
        self.mlp = _Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        # plain eager calls with the block's own submodules: three autograd nodes (genfast.ops.dit_block);
        # a replaced attn / mlp / adaLN activation keeps its own forward on the per-op path
        # (submodules read from _modules: nn.Module attribute access costs ~1 us each, host-bound on GPUs)
        mods = self._modules
        ada = mods["adaLN_modulation"]
        silu_linear = type(ada) is nn.Sequential and len(ada._modules) == 2 and type(ada._modules["0"]) is nn.SiLU
        if (type(mods["attn"]) is DiTAttention and type(mods["mlp"]) is _Mlp and silu_linear
                and fused_block_ok(self, x, c)):
            return block_forward(self, x, c)
        # SiLU + Linear through genfast.ops.linear where it is the plain pair (its CPU GEMMs; hooks keep
        # the modules' calls)
        if silu_linear and not has_hooks(ada) and not has_hooks(ada._modules["0"]):
            mods = linear_layer(ada._modules["1"], F.silu(c)).chunk(6, dim=1)
        else:
            mods = ada(c).chunk(6, dim=1)
        # Under autocast the Linears give bf16/fp16 while x stays fp32: the modulation and branch outputs
        # are upcast to x's dtype (exact), as eager's type promotion does (its gate * y product is
        # rounded to bf16 first; here it is fp32)
        cast = torch.is_autocast_enabled(x.device.type)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (m.to(x.dtype) for m in mods) if cast else mods
        y = self.attn(_adaln_modulate(x, shift_msa, scale_msa))
        x = _gated_residual(x, gate_msa, y.to(x.dtype) if cast else y)
        y = self.mlp(_adaln_modulate(x, shift_mlp, scale_mlp))
        return _gated_residual(x, gate_mlp, y.to(x.dtype) if cast else y)
