"""DiT conditioned on a sequence of condition tokens (text-like), in the two ways current models do:

  cross  PixArt-alpha style: adaLN-Zero self-attention on the image tokens, then cross-attention
         from image tokens (queries) to the condition tokens (keys/values, with a key padding
         mask), then the MLP. Timestep conditioning stays in adaLN.
  joint  MMDiT (SD3) style: image and condition tokens keep separate weights (adaLN modulation,
         qkv, proj, MLP per stream) but attend jointly over the concatenated sequence.

Both use genfast's attention through the seam (Nq != Nk for cross; a padding mask over the
condition part for joint). For the digits, the condition tokens come from the class label (a
learned sequence of `context_len` tokens per class, the last class being CFG's null condition),
which stands in for a text encoder's output; `context=` / `context_mask=` take real ones.
"""
import torch
from torch import nn

from genfast.zoo import _ops
from genfast.zoo.dit import Attention, DiT, DiTBlock, Mlp


def _heads(t, b, n, h):
    return t.view(b, n, h, -1).transpose(1, 2)  # [B, H, N, D] view


class CrossAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, ctx, mask=None):
        b, n, c = x.shape
        m = ctx.shape[1]
        q = _heads(self.q(x), b, n, self.num_heads)
        kv = self.kv(ctx).view(b, m, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        o = _ops.attention(q, kv[0], kv[1], key_padding_mask=mask)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class CrossAttentionBlock(DiTBlock):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.cross_attn = CrossAttention(hidden_size, num_heads)

    def forward(self, x, c, ctx=None, ctx_mask=None):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = _ops.gated_residual(x, gate_a, self.attn(_ops.adaln_modulate(x, shift_a, scale_a)))
        x = x + self.cross_attn(x, ctx, ctx_mask)
        return _ops.gated_residual(x, gate_m, self.mlp(_ops.adaln_modulate(x, shift_m, scale_m)))


class JointBlock(nn.Module):
    """Two streams (x: image tokens, ctx: condition tokens), one attention over [ctx; x]."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.num_heads = num_heads
        self.x_attn, self.c_attn = Attention(hidden_size, num_heads), Attention(hidden_size, num_heads)
        hid = int(hidden_size * mlp_ratio)
        self.x_mlp, self.c_mlp = Mlp(hidden_size, hid), Mlp(hidden_size, hid)
        self.x_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.c_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def _qkv(self, attn, h):
        b, n, c = h.shape
        return attn.qkv(h).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)

    def forward(self, x, c, ctx=None, ctx_mask=None):
        mx = self.x_adaLN_modulation(c).chunk(6, dim=1)
        mc = self.c_adaLN_modulation(c).chunk(6, dim=1)
        b, n, d = x.shape
        m = ctx.shape[1]
        qx = self._qkv(self.x_attn, _ops.adaln_modulate(x, mx[0], mx[1]))
        qc = self._qkv(self.c_attn, _ops.adaln_modulate(ctx, mc[0], mc[1]))
        q, k, v = (torch.cat([qc[i], qx[i]], dim=2) for i in range(3))  # [B, H, M + N, D]
        mask = None
        if ctx_mask is not None:  # image tokens are always real keys
            mask = torch.cat([ctx_mask.to(torch.bool), torch.ones(b, n, dtype=torch.bool, device=x.device)], 1)
        o = _ops.attention(q, k, v, key_padding_mask=mask).transpose(1, 2).reshape(b, m + n, d)
        oc, ox = o[:, :m], o[:, m:]
        x = _ops.gated_residual(x, mx[2], self.x_attn.proj(ox))
        ctx = _ops.gated_residual(ctx, mc[2], self.c_attn.proj(oc))
        x = _ops.gated_residual(x, mx[5], self.x_mlp(_ops.adaln_modulate(x, mx[3], mx[4])))
        ctx = _ops.gated_residual(ctx, mc[5], self.c_mlp(_ops.adaln_modulate(ctx, mc[3], mc[4])))
        return x, ctx


class ConditionedDiT(DiT):
    """DiT whose class label becomes `context_len` condition tokens, used by cross or joint attention.
    forward(x, t, y) like DiT (so the samplers and CFG work unchanged), or forward(x, t, y, context=,
    context_mask=) with externally computed condition tokens [B, M, hidden] and a mask [B, M]."""

    def __init__(self, *, mode="cross", context_len=4, **kw):
        if mode not in ("cross", "joint"):
            raise ValueError(f"mode must be 'cross' or 'joint', got {mode!r}")
        if isinstance(context_len, bool) or not isinstance(context_len, int) or context_len < 1:
            raise ValueError(f"context_len must be a positive int (condition tokens per class), got {context_len!r}")
        super().__init__(**kw)
        hidden, heads = kw.get("hidden_size", 96), kw.get("num_heads", 4)
        depth, ratio = kw.get("depth", 4), kw.get("mlp_ratio", 4.0)
        self.mode, self.context_len = mode, context_len
        self.config.update(mode=mode, context_len=context_len)
        block = CrossAttentionBlock if mode == "cross" else JointBlock
        self.blocks = nn.ModuleList([block(hidden, heads, mlp_ratio=ratio) for _ in range(depth)])
        self.context_table = nn.Embedding(self.num_classes + 1, context_len * hidden)
        nn.init.normal_(self.context_table.weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero for the new blocks too
            for mod in ([blk.adaLN_modulation] if mode == "cross" else [blk.x_adaLN_modulation, blk.c_adaLN_modulation]):
                nn.init.zeros_(mod[-1].weight)
                nn.init.zeros_(mod[-1].bias)

    def forward(self, x, t, y, context=None, context_mask=None):
        h, w = x.shape[-2:]
        tok = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        ctx = context if context is not None else self.context_table(y).view(len(y), self.context_len, -1)
        for blk in self.blocks:
            if self.mode == "cross":
                tok = blk(tok, c, ctx, context_mask)
            else:
                tok, ctx = blk(tok, c, ctx, context_mask)
        return self.unpatchify(self.final_layer(tok, c), h, w)
