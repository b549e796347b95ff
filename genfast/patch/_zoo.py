"""genfast's own zoo DiT (genfast/zoo/dit.py). Its blocks are genfast.nn.DiTBlock, which already
run genfast's kernels (reported as such); where a zoo block is the plain-PyTorch fallback class
(same parameter names), its forward is swapped for one on genfast's ops, which also ignores the
zoo's eager switch (genfast.zoo._ops.use_genfast(False))."""
import sys


import genfast
from genfast.ops.gelu import gelu_tanh_inference
from genfast.patch._handle import already_patched
from genfast.patch._support import module_reasons, runnable


def fallback_block_forward(self, x, c):
    if x.dim() != 3 or not runnable(x) or not runnable(x, "attention") or c.dtype != x.dtype:
        return self._genfast_original_forward(x, c)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
    h = genfast.adaln_modulate(x, shift_a, scale_a)
    b, n, ch = h.shape
    attn = self.attn
    q, k, v = attn.qkv(h).view(b, n, 3, attn.num_heads, ch // attn.num_heads).permute(2, 0, 3, 1, 4)
    a = attn.proj(genfast.attention(q, k, v).transpose(1, 2).reshape(b, n, ch))
    x = genfast.gated_residual(x, gate_a, a)
    h = genfast.adaln_modulate(x, shift_m, scale_m)
    return genfast.gated_residual(x, gate_m, self.mlp.fc2(gelu_tanh_inference(self.mlp.fc1(h))))


def patch_modules(handle, model, kinds):
    zoo = sys.modules.get("genfast.zoo.dit")
    if zoo is None or not kinds["block"]:
        return
    gnn_block = getattr(sys.modules.get("genfast.nn"), "DiTBlock", None)
    for path, mod in model.named_modules():
        if gnn_block is not None and type(mod) is gnn_block:
            handle.add(path, "block", "genfast.nn.DiTBlock", False, "already runs genfast's kernels")
        elif type(mod) is zoo.DiTBlock:
            if already_patched(mod):
                handle.add(path, "block", "DiTBlock", False, "already patched by another genfast.patch handle")
                continue
            why = module_reasons(mod) + module_reasons(mod, "attention")
            if why:
                handle.add(path, "block", "DiTBlock", False, "; ".join(why))
                continue
            handle.set_forward(mod, fallback_block_forward)
            handle.add(path, "block", "DiTBlock", True, "-> genfast.attention + adaln_modulate + gated_residual")
