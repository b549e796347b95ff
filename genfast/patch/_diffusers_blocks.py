"""Per-instance forwards for diffusers' adaLN norms and transformer blocks on genfast.adaln_modulate
and genfast.gated_residual. diffusers writes the modulation `norm(x) * (1 + scale) + shift` and the
gated residual `x + gate * y` inline (three and two passes over the activations, each with a new
temporary); these are one pass each. Each forward first checks the call is one it serves exactly
(3-D tokens, a dtype genfast runs, matching modulation dtype, no extra kwargs) and otherwise calls
the class's own forward, so an answer never changes.
"""
import torch
from torch import nn

import genfast
from genfast.ops import gelu as _gelu
from genfast.ops import linear as _linear
from genfast.ops._common import dispatcher_needed, needs_grad
from genfast.ops.dit_block import _temp
from genfast.ops.gelu import gelu_tanh_inference
from genfast.ops.linear import has_hooks, linear_layer, plain_linear
from genfast.patch._diffusers_attn import GenfastAttnProcessor, GenfastJointAttnProcessor
from genfast.patch._support import runnable


def plain_layer_norm(mod):
    """An nn.LayerNorm over the last dim with no affine parameters (what adaLN norms use)."""
    return type(mod) is nn.LayerNorm and mod.weight is None and mod.bias is None and len(mod.normalized_shape) == 1


def _norm_kind(mod):
    """("layer" | "rms", eps) for an affine-free LayerNorm / diffusers or torch RMSNorm, else None."""
    if plain_layer_norm(mod):
        return "layer", mod.eps
    rms = type(mod).__name__ == "RMSNorm"
    if rms and getattr(mod, "weight", None) is None and getattr(mod, "eps", None) is not None:
        return "rms", float(mod.eps)
    return None


def _ok(x, *dtypes_from):
    """The call may take the genfast path: [B, N, C] tokens genfast runs, modulation in x's dtype."""
    return x.dim() == 3 and runnable(x) and all(t.dtype == x.dtype for t in dtypes_from)


def _hooked(*mods):
    """Whether any of the modules a genfast forward skips calling has hooks (then the original runs)."""
    return any(m is not None and has_hooks(m) for m in mods)


# fp32 CPU inference on torch's BLAS: the first Linear without its bias into a kept buffer, the bias
# added in the GELU pass (feed_forward); False: linear_layer + gelu_tanh_inference (tests compare them).
FOLD_FC1_BIAS = True


def _fc1_folds(fc1, h):
    """Whether feed_forward's first Linear (a plain biased nn.Linear, no autograd here) runs as a GEMM
    into a kept buffer with its bias in the GELU pass: fp32 contiguous CPU h on torch's BLAS (Intel's
    MKL, genfast.ops.linear; oneDNN adds a bias in its epilogue), plain eager (no compile, mode,
    transform or subclass: dispatcher_needed), genfast's GELU kernel. A BLAS addmm copies its bias
    into a fresh [B*N, 4C] output first, which page-faults in on every call. The same bits as the
    addmm where its BLAS adds the bias to the finished product (MKL at DiT sizes, tested); fp32
    rounding otherwise."""
    return (FOLD_FC1_BIAS and h.device.type == "cpu" and h.dtype == torch.float32 and plain_linear(fc1)
            and fc1.bias is not None and not needs_grad(fc1.bias) and fc1.weight.dtype == fc1.bias.dtype == torch.float32
            and fc1.weight.device == h.device and h.is_contiguous() and h.numel() > 0 and not dispatcher_needed(h)
            and not _linear.own_gemm_case(h, fc1.weight, fc1.bias) and _gelu._uses_kernel(h))


def feed_forward(ff, h):
    """diffusers' FeedForward (Linear, GELU, Dropout, Linear). GELU(tanh) is genfast's gelu_tanh op.
    Without autograd the GELU runs in place on the first Linear's output, which only this function
    holds: one [B, N, 4C] temporary instead of two (on the CPU every fresh large tensor pays page faults;
    where _fc1_folds, that temporary is a kept buffer and the Linear's bias goes into the GELU pass)."""
    net = tuple(ff.net._modules.values())  # (slicing the ModuleList itself builds a new one a call)
    act = net[0]
    grad = torch.is_grad_enabled() and (h.requires_grad or act.proj.weight.requires_grad)
    simple = (type(act).__name__ == "GELU" and type(act.proj) is nn.Linear and len(net) in (3, 4)
              and all(type(d) is nn.Dropout and not (d.training and d.p) for d in net[1::2])
              and not _hooked(ff, act, *net[1::2]))  # modules this path skips calling
    tanh = simple and act.approximate == "tanh"
    if (grad and not tanh) or not simple or h.device.type == "mps":
        return ff(h)
    if tanh and not grad and _fc1_folds(act.proj, h):
        w, h2 = act.proj.weight, h.view(-1, h.shape[-1])
        u = torch.mm(h2, w.t(), out=_temp("ff_fc1", (h2.shape[0], w.shape[0]), h))
        return linear_layer(net[2], _gelu.fwd_bias_fp32(u, act.proj.bias, inplace=True).view(*h.shape[:-1], -1))
    u = linear_layer(act.proj, h)  # oneDNN's fp32 GEMM on the CPU (genfast.ops.linear)
    if tanh:  # genfast's op (torch's CPU kernel for the tanh form is slow): in place without autograd
        u = gelu_tanh_inference(u)
    else:
        torch._C._nn.gelu_(u, approximate=act.approximate)
    return linear_layer(net[2], u)


# ------------------------------------------------------------------------------------- norms
def norm_reasons(mod):
    name = type(mod).__name__
    if name in ("AdaLayerNormZero", "AdaLayerNormZeroSingle"):
        ok = plain_layer_norm(mod.norm)
        return [] if ok else [f"its norm is {type(mod.norm).__name__}, not an affine-free LayerNorm"]
    if name == "AdaLayerNormContinuous":
        return [] if _norm_kind(mod.norm) else ["its norm has affine parameters (genfast.adaln_modulate has none)"]
    return [f"{name} is not a norm genfast replaces"]


def ada_zero_forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    if not _ok(x, self.linear.weight) or has_hooks(self.norm):  # a hooked norm is called
        return self._genfast_original_forward(x, timestep, class_labels, hidden_dtype, emb)
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(emb)).chunk(6, dim=1)
    x = genfast.adaln_modulate(x, shift_msa, scale_msa, eps=self.norm.eps)
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def ada_zero_single_forward(self, x, emb=None):
    if not _ok(x, self.linear.weight) or has_hooks(self.norm):  # a hooked norm is called
        return self._genfast_original_forward(x, emb)
    shift_msa, scale_msa, gate_msa = self.linear(self.silu(emb)).chunk(3, dim=1)
    return genfast.adaln_modulate(x, shift_msa, scale_msa, eps=self.norm.eps), gate_msa


def ada_continuous_forward(self, x, conditioning_embedding):
    if not _ok(x, self.linear.weight) or has_hooks(self.norm):  # a hooked norm is called
        return self._genfast_original_forward(x, conditioning_embedding)
    scale, shift = self.linear(self.silu(conditioning_embedding).to(x.dtype)).chunk(2, dim=1)
    kind, eps = _norm_kind(self.norm)
    return genfast.adaln_modulate(x, shift, scale, eps=eps, norm=kind)


NORM_FORWARDS = {"AdaLayerNormZero": ada_zero_forward, "AdaLayerNormZeroSingle": ada_zero_single_forward,
                 "AdaLayerNormContinuous": ada_continuous_forward}


# ------------------------------------------------------------------------------------ blocks
def basic_block_reasons(blk):
    """BasicTransformerBlock (DiT: ada_norm_zero; PixArt: ada_norm_single)."""
    out = []
    if blk.norm_type not in ("ada_norm_zero", "ada_norm_single"):
        out.append(f"norm_type {blk.norm_type!r} has no adaLN modulation to fuse")
    if blk.pos_embed is not None or hasattr(blk, "fuser"):
        out.append("positional embedding / GLIGEN fuser inside the block")
    if blk.norm_type == "ada_norm_zero":
        if norm_reasons(blk.norm1) or blk.norm1.emb is None or not plain_layer_norm(blk.norm3):
            out.append("its norms have affine parameters")
    elif blk.norm_type == "ada_norm_single":
        if not (plain_layer_norm(blk.norm1) and plain_layer_norm(blk.norm2)):
            out.append("its norms have affine parameters")
    return out


_GENFAST_PROCESSORS = (GenfastAttnProcessor, GenfastJointAttnProcessor)


def _attend(attn, h, **kwargs):
    """attn(h, **kwargs). With one of genfast's processors, no hooks on the layer and no keyword beyond
    encoder_hidden_states / attention_mask, the processor is called directly: diffusers'
    Attention.forward runs inspect.signature on its processor every call (to drop keyword arguments it
    does not take; none here) — ~55 us of a ~230 us attention call on the CPU host of tests/ (tiny
    tensors), a fifth of what a patched DiT block added to eager's host time there."""
    proc = attn.processor
    if (type(proc) in _GENFAST_PROCESSORS and kwargs.keys() <= {"encoder_hidden_states", "attention_mask"}
            and not has_hooks(attn)):
        return proc(attn, h, **kwargs)
    return attn(h, **kwargs)


def basic_block_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                        encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
                        added_cond_kwargs=None):
    x = hidden_states
    single = self.norm_type == "ada_norm_single"
    mod_dtype = timestep if single else self.norm1.linear.weight
    skipped = (self.norm1, getattr(self.norm1, "norm", None), self.norm2, getattr(self, "norm3", None))
    if cross_attention_kwargs or self._chunk_size is not None or not _ok(x, mod_dtype) or _hooked(*skipped):
        return self._genfast_original_forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                  timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
    if single:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)
        eps1, eps_mlp = self.norm1.eps, self.norm2.eps
    else:
        n1 = self.norm1
        emb = n1.emb(timestep, class_labels, hidden_dtype=x.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = n1.linear(n1.silu(emb)).chunk(6, dim=1)
        eps1, eps_mlp = n1.norm.eps, self.norm3.eps
    h = genfast.adaln_modulate(x, shift_msa, scale_msa, eps=eps1)
    a = _attend(self.attn1, h, encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                attention_mask=attention_mask)
    x = genfast.gated_residual(x, gate_msa, a)
    if self.attn2 is not None:
        h = x if single else self.norm2(x)  # PixArt does not normalise before its cross attention
        x = _attend(self.attn2, h, encoder_hidden_states=encoder_hidden_states,
                    attention_mask=encoder_attention_mask) + x
    h = genfast.adaln_modulate(x, shift_mlp, scale_mlp, eps=eps_mlp)
    return genfast.gated_residual(x, gate_mlp, feed_forward(self.ff, h))


def joint_block_reasons(blk):
    """SD3's JointTransformerBlock and Flux's FluxTransformerBlock (the same dataflow)."""
    out = []
    if getattr(blk, "use_dual_attention", False):
        out.append("SD3.5 dual attention (its norm returns 7 values)")
    if norm_reasons(blk.norm1) or blk.norm1.emb is not None:
        out.append("norm1 is not an embedding-free adaLN-Zero over an affine-free LayerNorm")
    if norm_reasons(blk.norm1_context):
        out.append("norm1_context: " + "; ".join(norm_reasons(blk.norm1_context)))
    if not plain_layer_norm(blk.norm2) or (blk.norm2_context is not None and not plain_layer_norm(blk.norm2_context)):
        out.append("its norms have affine parameters")
    return out


def _joint(self, x, c, temb, attn_kwargs, flux):
    n1 = self.norm1
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = n1.linear(n1.silu(temb)).chunk(6, dim=1)
    h = genfast.adaln_modulate(x, shift_msa, scale_msa, eps=n1.norm.eps)
    pre_only = getattr(self, "context_pre_only", False)
    nc = self.norm1_context
    if pre_only:  # AdaLayerNormContinuous: (scale, shift) order
        ch = ada_continuous_forward(nc, c, temb)
    else:
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
            nc.linear(nc.silu(temb)).chunk(6, dim=1)
        ch = genfast.adaln_modulate(c, c_shift_msa, c_scale_msa, eps=nc.norm.eps)
    outs = _attend(self.attn, h, encoder_hidden_states=ch, **attn_kwargs)
    attn_out, ctx_out = outs[0], outs[1]
    x = genfast.gated_residual(x, gate_msa, attn_out)
    h = genfast.adaln_modulate(x, shift_mlp, scale_mlp, eps=self.norm2.eps)
    x = genfast.gated_residual(x, gate_mlp, feed_forward(self.ff, h))
    if len(outs) == 3:  # Flux IP-adapter output
        x = x + outs[2]
    if pre_only:
        return None, x
    c = genfast.gated_residual(c, c_gate_msa, ctx_out)
    ch = genfast.adaln_modulate(c, c_shift_mlp, c_scale_mlp, eps=self.norm2_context.eps)
    c = genfast.gated_residual(c, c_gate_mlp, feed_forward(self.ff_context, ch))
    if flux and c.dtype == torch.float16:
        c = c.clip(-65504, 65504)
    return c, x


def _joint_hooked(blk):
    """Hooks on a joint block's norms, which _joint does not call (its FeedForwards: feed_forward)."""
    n1, nc = blk.norm1, blk.norm1_context
    return _hooked(n1, n1.norm, nc, getattr(nc, "norm", None), blk.norm2, getattr(blk, "norm2_context", None))


def sd3_block_forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
    if (self._chunk_size is not None or encoder_hidden_states is None or _joint_hooked(self)
            or not _ok(hidden_states, encoder_hidden_states, temb, self.norm1.linear.weight)):
        return self._genfast_original_forward(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
    return _joint(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs or {}, flux=False)


def flux_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                       joint_attention_kwargs=None):
    if not _ok(hidden_states, encoder_hidden_states, temb, self.norm1.linear.weight) or _joint_hooked(self):
        return self._genfast_original_forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                  joint_attention_kwargs)
    kwargs = dict(joint_attention_kwargs or {}, image_rotary_emb=image_rotary_emb)
    return _joint(self, hidden_states, encoder_hidden_states, temb, kwargs, flux=True)


def flux_single_reasons(blk):
    return norm_reasons(blk.norm)


def flux_single_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                        joint_attention_kwargs=None):
    if not _ok(hidden_states, encoder_hidden_states, temb, self.norm.linear.weight):
        return self._genfast_original_forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                  joint_attention_kwargs)
    text_len = encoder_hidden_states.shape[1]
    x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    shift, scale, gate = self.norm.linear(self.norm.silu(temb)).chunk(3, dim=1)
    h = genfast.adaln_modulate(x, shift, scale, eps=self.norm.norm.eps)
    mlp = self.act_mlp(self.proj_mlp(h))
    a = self.attn(hidden_states=h, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    x = genfast.gated_residual(x, gate, self.proj_out(torch.cat([a, mlp], dim=2)))
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x[:, :text_len], x[:, text_len:]


BLOCKS = {  # class name -> (reasons, forward)
    "BasicTransformerBlock": (basic_block_reasons, basic_block_forward),
    "JointTransformerBlock": (joint_block_reasons, sd3_block_forward),
    "FluxTransformerBlock": (joint_block_reasons, flux_block_forward),
    "FluxSingleTransformerBlock": (flux_single_reasons, flux_single_forward),
}
