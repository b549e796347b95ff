"""q, k, v as strided views of one fused qkv projection, laid out for genfast.attention.

DiT-style modules project x [B, N, C] with one Linear to [B, N, 3 * H * D] (columns in (3, H, D)
order, the DiT / timm layout) and attend over [B, H, N, D] views of it, read in place. On GPUs the
Triton kernels split head dims that are not powers of two (72 = 64 + 32) and, measured on Hopper
with Triton 3.6, need such q/k/v rows to start 16-element aligned (kernels/attention.py copies them
otherwise). With D = 72 the views of a plain projection are not aligned (heads 72 elements apart),
so qkv_projection zero-pads the weight and bias per head to D16 = 80 columns: the GEMM itself writes
aligned rows and the attention reads them in place, for (D16 - D) / D more projection work (11 % at
72) instead of a copy of q, k and v in the forward and again in the backward. The padding columns
are zeros that no one reads; gradients reach the real weight and bias through F.pad's backward.
Only where the Triton kernels would serve the unmasked call: by default torch's SDPA does on GPUs
(fp16/bf16, genfast.ops.attention), and it reads the plain views in place, so nothing is padded.
"""
import torch
import torch.nn.functional as F

from genfast.ops.linear import linear, linear_layer, plain_linear


def qkv_head_width(head_dim, dtype, device):
    """The per-head row width a fused projection should write: head_dim rounded up to a multiple of
    16 where genfast.attention's GPU kernels would otherwise copy the rows (CUDA tensors, fp16/bf16,
    the Triton kernels chosen for the unmasked case, a head dim they split that is not a multiple of
    16: 72, 88, ...), else head_dim."""
    if torch.device(device).type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or head_dim % 16 == 0:
        return head_dim
    from genfast.ops.attention import backend_name

    if backend_name("cuda", dtype, head_dim) != "triton":  # torch's SDPA (unmasked) reads any rows in place
        return head_dim
    from genfast.kernels.attention import head_dim_blocks  # imports triton: GPU callers only

    return -(-head_dim // 16) * 16 if head_dim_blocks(head_dim)[1] else head_dim


def _pad_heads(t, groups, num_heads, head_dim, width):
    """A [G * H * D, ...] weight or bias as [G * H * width, ...], each head's rows zero-padded."""
    rest = t.shape[1:]
    padded = F.pad(t.reshape(groups, num_heads, head_dim, -1), (0, 0, 0, width - head_dim))
    return padded.reshape(groups * num_heads * width, *rest)


def projection_heads(x, layer, num_heads, groups=1):
    """[B, N, G, H, D] view of layer(x), x [B, N, C], whose output columns are (G, H, D) ordered
    (G = 3 for a fused qkv projection, 1 for one of q, k, v). A plain nn.Linear runs genfast.ops.linear,
    with per-head padded rows where qkv_head_width says so; any other module (LoRA, quantised
    wrappers) runs its own forward."""
    b, n, _ = x.shape
    if plain_linear(layer) and layer.out_features % (groups * num_heads) == 0:
        d = layer.out_features // (groups * num_heads)
        w = qkv_head_width(d, x.dtype, x.device)
        if w != d:
            bias = _pad_heads(layer.bias, groups, num_heads, d, w) if layer.bias is not None else None
            out = linear(x, _pad_heads(layer.weight, groups, num_heads, d, w), bias)
            return out.view(b, n, groups, num_heads, w)[..., :d]
    return linear_layer(layer, x).view(b, n, groups, num_heads, -1)


def qkv_projection(x, layer, num_heads):
    """[3, B, H, N, D]: q, k, v as strided views of one fused projection layer(x), for genfast.attention."""
    return projection_heads(x, layer, num_heads, groups=3).permute(2, 0, 3, 1, 4)
