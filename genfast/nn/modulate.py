"""AdaLNModulate: the adaLN-Zero norm + modulation of a DiT block as one module.

In the reference DiT block (Peebles & Xie, arXiv:2212.09748) every branch starts with

    self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    ...
    h = modulate(self.norm1(x), shift_msa, scale_msa)      # norm(x) * (1 + scale) + shift

`AdaLNModulate(hidden_size, eps=1e-6)` replaces the LayerNorm and the modulate call with one
fused pass, `self.norm1(x, shift_msa, scale_msa)`. It has no parameters (the LayerNorm it stands
for has none either), so state dicts of the reference block load unchanged.
"""
import torch

from genfast.ops.modulate import adaln_modulate


class AdaLNModulate(torch.nn.Module):
    """norm(x, no affine) * (1 + scale) + shift over the last dim, fused (genfast.adaln_modulate).

    Args:
        hidden_size: C, the channel count x must have.
        eps: added to the variance (mean square for rms); DiT uses 1e-6.
        norm: "layer" (LayerNorm without affine, DiT/PixArt/SD3) or "rms" (RMSNorm without weight).
    forward(x, shift, scale): x [B, N, C]; shift [B, C] / [B, N, C] or None; scale [B, C] / [B, N, C].
        Modulation in another dtype than x (a bf16 adaLN Linear under autocast next to an fp32
        residual stream) is cast to x's dtype, as the reference's type promotion would compute
        it in x's precision. The result has x's dtype.
    """

    def __init__(self, hidden_size, eps=1e-6, norm="layer"):
        super().__init__()
        if norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size, self.eps, self.norm = hidden_size, float(eps), norm

    def forward(self, x, shift, scale):
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] != self.hidden_size:
            raise ValueError(f"x has {x.shape[-1]} channels but this AdaLNModulate has hidden_size={self.hidden_size}")
        if isinstance(x, torch.Tensor):
            shift = shift.to(x.dtype) if isinstance(shift, torch.Tensor) and shift.dtype != x.dtype else shift
            scale = scale.to(x.dtype) if isinstance(scale, torch.Tensor) and scale.dtype != x.dtype else scale
        return adaln_modulate(x, shift, scale, eps=self.eps, norm=self.norm)

    def extra_repr(self):
        return f"{self.hidden_size}, eps={self.eps:g}, norm={self.norm!r}"
