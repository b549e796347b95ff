"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") as a rectified-flow velocity
model: patchify, adaLN-Zero blocks, final layer, unpatchify.

Parameter names follow the reference DiT (facebookresearch/DiT models.py): x_embedder.proj,
t_embedder.mlp.{0,2}, y_embedder.embedding_table, blocks.i.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
adaLN_modulation.1}, final_layer.{linear, adaLN_modulation.1}, so its checkpoints map over.
The blocks are genfast.nn.DiTBlock when genfast has it; otherwise the block below, which reaches
the hot ops (modulate, attention, gated residual) through genfast.zoo._ops.

The model predicts the rectified-flow velocity v = noise - data at t in [0, 1] (t = 1 is noise);
labels == num_classes is the null class of classifier-free guidance.
"""
import torch
import torch.nn.functional as F
from torch import nn

import genfast.nn as gnn
from genfast.ops.linear import linear
from genfast.zoo import _ops

CONFIGS = {
    # name: (depth, hidden, heads, patch)
    "tiny": (4, 96, 4, 2),        # the CPU demo on 16x16 digits
    "S/2": (12, 384, 6, 2),
    "B/2": (12, 768, 12, 2),
    "XL/2": (28, 1152, 16, 2),
}


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection; q, k, v are strided views of it."""

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = _ops.qkv_projection(x, self.qkv, self.num_heads)
        o = _ops.attention(qkv[0], qkv[1], qkv[2])  # [B, H, N, D] views, no copy
        return _ops.linear(o.transpose(1, 2).reshape(b, n, c), self.proj)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return _ops.linear(_ops.gelu_tanh(_ops.linear(x, self.fc1)), self.fc2)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate * attn(modulate(LN(x))); x += gate * mlp(modulate(LN(x)))."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = _ops.gated_residual(x, gate_a, self.attn(_ops.adaln_modulate(x, shift_a, scale_a)))
        return _ops.gated_residual(x, gate_m, self.mlp(_ops.adaln_modulate(x, shift_m, scale_m)))


def block_class():
    """genfast.nn.DiTBlock once merged (same state dict), else the block above."""
    return getattr(gnn, "DiTBlock", DiTBlock)


def modulated_block(blk, x, mod):
    """blk's adaLN-Zero forward given its modulation adaLN_modulation(c) [B, 6C] (sampling computes
    those of every block and step at once, see DiT.sampling_conditioning)."""
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=1)
    x = _ops.gated_residual(x, gate_a, blk.attn(_ops.adaln_modulate(x, shift_a, scale_a)))
    return _ops.gated_residual(x, gate_m, blk.mlp(_ops.adaln_modulate(x, shift_m, scale_m)))


def _plain_adaln(module):
    """module.adaLN_modulation is SiLU + Linear (what sampling_conditioning folds together)."""
    seq = getattr(module, "adaLN_modulation", None)
    return (isinstance(seq, nn.Sequential) and len(seq) == 2 and isinstance(seq[0], nn.SiLU)
            and isinstance(seq[1], nn.Linear))


class SamplingConditioning:
    """The adaLN modulations of every block and of the final layer for a fixed time schedule and a
    fixed label batch: mod[s, u] for each step s and distinct label u, gathered per step."""

    def __init__(self, mod, inverse):
        self.mod, self.inverse = mod, inverse  # [S, U, K], [B] indices into U
        self.buf = mod.new_empty(len(inverse), mod.shape[-1])

    def __len__(self):
        return self.mod.shape[0]

    def __getitem__(self, step):
        return torch.index_select(self.mod[step], 0, self.inverse, out=self.buf)  # reused: no allocation


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        # t in [0, 1]; scaled to DiT's 0..1000 range so the frequencies resolve it
        return self.mlp(_ops.timestep_features(t * 1000.0, self.freq_dim))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)  # last row: the null class

    def forward(self, y):
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """The stride-p convolution of DiT, computed as one Linear over the flattened patches: the
    weight is the Conv2d's (same state dict), the output is [B, N, hidden] with no transpose copy,
    and the small GEMM beats the convolution at these sizes (mkldnn ~230 us vs ~30 us on the demo)."""

    def __init__(self, in_channels, hidden, patch):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, hidden, patch, stride=patch)

    def forward(self, x):
        b, c, h, w = x.shape
        p = self.patch
        if not _ops.enabled():  # the plain model: the convolution as DiT writes it
            return self.proj(x).flatten(2).transpose(1, 2)
        # [B, C, H/p, p, W/p, p] -> [B, (H/p)(W/p), C p p], the conv weight's (c, py, px) order
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return linear(patches, self.proj.weight.view(self.proj.out_channels, -1), self.proj.bias)


class FinalLayer(nn.Module):
    def __init__(self, hidden, patch, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return _ops.linear(_ops.adaln_modulate(x, shift, scale), self.linear)


def sincos_pos_embed(hidden, grid):
    """Fixed 2-D sine-cosine position embedding [grid*grid, hidden] (MAE / DiT)."""
    if hidden % 4:
        raise ValueError(f"hidden size {hidden} must be a multiple of 4 for the 2-D sincos embedding")
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(hidden // 4, dtype=torch.float64) / (hidden / 4))

    def emb(pos):
        a = pos.reshape(-1, 1) * omega[None]
        return torch.cat([a.sin(), a.cos()], 1)
    return torch.cat([emb(gy), emb(gx)], 1).float()


class DiT(nn.Module):
    """v = DiT(x [B, C, H, W], t [B] in [0, 1], y [B] int64) -> [B, C, H, W]."""

    def __init__(self, input_size=16, in_channels=1, patch_size=2, hidden_size=96, depth=4, num_heads=4,
                 mlp_ratio=4.0, num_classes=10):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.in_channels, self.patch, self.num_classes = in_channels, patch_size, num_classes
        self.config = dict(input_size=input_size, in_channels=in_channels, patch_size=patch_size,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes)
        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        grid = input_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed(hidden_size, grid)[None], persistent=False)
        block = block_class()
        self.blocks = nn.ModuleList([block(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    @classmethod
    def from_config(cls, name, **kwargs):
        depth, hidden, heads, patch = CONFIGS[name]
        return cls(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **kwargs)

    def initialize_weights(self):
        # DiT's init: xavier linears, zeroed adaLN-Zero modulation and output layer
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    def unpatchify(self, x, h, w):
        p, c = self.patch, self.in_channels
        b = x.shape[0]
        x = x.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)

    def forward(self, x, t, y, *, cond=None):
        """cond: a row of sampling_conditioning(...) instead of (t, y); it may have 2x the rows of x
        (classifier-free guidance: the image tokens are embedded once and used for both halves)."""
        h, w = x.shape[-2:]
        tok = self.x_embedder(x)
        tok = tok.add_(self.pos_embed) if _ops.enabled() else tok + self.pos_embed  # a fresh [B, N, C]: in place
        if cond is None:
            c = self.t_embedder(t) + self.y_embedder(y)
            for blk in self.blocks:
                tok = blk(tok, c)
            return self.unpatchify(self.final_layer(tok, c), h, w)
        if cond.shape[0] != tok.shape[0]:
            tok = tok.repeat(cond.shape[0] // tok.shape[0], 1, 1)
        mods = cond.split(6 * tok.shape[-1], dim=1)
        for blk, mod in zip(self.blocks, mods):
            tok = modulated_block(blk, tok, mod)
        shift, scale = mods[-1].chunk(2, dim=1)
        out = _ops.linear(_ops.adaln_modulate(tok, shift, scale), self.final_layer.linear)
        return self.unpatchify(out, h, w)

    @torch.no_grad()
    def sampling_conditioning(self, t, y):
        """The conditioning of a whole sampling run at times t [S] for labels y [B], or None where
        this model cannot take it (a subclass with its own forward). Computed once for the distinct
        labels: the timestep MLP on S rows, one GEMM for every block's adaLN (S x U rows) instead
        of depth GEMMs on B rows at every step; model(x, None, None, cond=result[s]) then runs step s."""
        if type(self).forward is not DiT.forward or not all(map(_plain_adaln, [*self.blocks, self.final_layer])):
            return None
        labels, inverse = torch.unique(y, return_inverse=True)
        c = self.t_embedder(t)[:, None, :] + self.y_embedder(labels)[None]  # [S, U, C]
        lins = [m.adaLN_modulation[1] for m in (*self.blocks, self.final_layer)]
        mod = F.linear(F.silu(c), torch.cat([m.weight for m in lins]), torch.cat([m.bias for m in lins]))
        return SamplingConditioning(mod, inverse)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(model, hw):
    """Approximate forward FLOPs per image (2 per multiply-add): linears over tokens plus attention."""
    cfg = model.config
    n = (hw // cfg["patch_size"]) ** 2
    hdim, depth = cfg["hidden_size"], cfg["depth"]
    lin = depth * (n * (3 + 1 + 2 * cfg["mlp_ratio"]) * hdim * hdim + 2 * n * n * hdim)
    return 2 * lin + 4 * n * hdim * cfg["patch_size"] ** 2 * cfg["in_channels"]  # + patch embed, final
