"""genfast attention for diffusers: processors for its Attention layers, and a "genfast" backend in
its attention dispatcher (diffusers.models.attention_dispatch), used by Flux's processor.

Waste avoided against diffusers' AttnProcessor2_0 / JointAttnProcessor2_0:
  * q, k, v come from ONE GEMM over the concatenated weights (k, v from one for cross attention):
    on the CPU the concatenation is cached and rebuilt when a weight's storage or version changes;
    with autograd on, or under torch.compile, it is concatenated per call (differentiable, cheap
    next to the GEMM); on GPUs the separate GEMMs are kept (no second copy of large weights).
  * q, k, v are strided views of that output (genfast.attention reads any strides: no transposes);
    where genfast's Triton kernels serve attention on GPUs at head dim 72 (PixArt, fp16/bf16), each
    projection writes per-head padded rows that they read in place (genfast.ops.qkv) instead of
    copying misaligned ones (by default torch's SDPA serves unmasked calls there: no padding).
  * no division by rescale_output_factor when it is 1, no .to() no-ops.
The answers are those of the original processor (within the tests' tolerance rule); a call it
cannot serve exactly (a 4-D input, a bool or general float mask, dropout) runs the original.
"""
import torch

import genfast
from genfast.ops.linear import linear, linear_layer
from genfast.ops import qkv as _qkv
from genfast.patch import _support

_LINEAR = torch.nn.Linear
PAD_BIAS = -1.0e4  # an additive bias at or below this is exactly padding: exp() underflows to 0


# ------------------------------------------------------------------------------- fused weights
class FusedLinear:
    """The GEMM of several Linears over the same input, as one."""

    def __init__(self, *linears):
        self.linears = linears
        self._key = self._w = self._b = None

    def weights(self):
        ws = [lin.weight for lin in self.linears]
        bs = [lin.bias for lin in self.linears]
        has_bias = all(b is not None for b in bs)
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in ws + bs if p is not None)
        if torch.compiler.is_compiling() or grad:
            return torch.cat(ws), torch.cat(bs) if has_bias else None
        try:
            key = tuple((p.data_ptr(), p._version) for p in ws + bs if p is not None)
        except RuntimeError:  # inference tensors have no version counter: no cache
            return torch.cat(ws), torch.cat(bs) if has_bias else None
        if key != self._key:
            self._w, self._b, self._key = torch.cat(ws), (torch.cat(bs) if has_bias else None), key
        return self._w, self._b

    def __call__(self, x):
        w, b = self.weights()
        return linear(x, w, b)  # oneDNN's fp32 GEMM on the CPU (genfast.ops.linear)


MAX_FUSED_BYTES = 8 << 20  # the cached copy costs memory; past DiT-B sizes the separate GEMMs are efficient anyway


def can_fuse(*linears):
    """Same type (plain Linear: LoRA / quantised wrappers are left alone), bias, dtype, device;
    small enough for a cached copy."""
    if not all(type(lin) is _LINEAR for lin in linears):
        return False
    if sum(lin.weight.numel() * lin.weight.element_size() for lin in linears) > MAX_FUSED_BYTES:
        return False
    first = linears[0]
    return all((lin.bias is None) == (first.bias is None) and lin.in_features == first.in_features
               and lin.weight.dtype == first.weight.dtype and lin.weight.device == first.weight.device
               for lin in linears)


def project(x, fused, linears):
    """The outputs [B, N, C] of `linears` on x: column slices of one GEMM over the concatenated
    weights on the CPU in eager mode (measured to pay there), else the separate GEMMs (under
    torch.compile a per-call concatenation would copy the weights every call; on GPUs a cached
    one would double their memory). Either way no copy follows: the heads are strided views."""
    if fused is not None and x.device.type == "cpu" and not torch.compiler.is_compiling():
        return fused(x).chunk(len(linears), -1)
    return [linear_layer(lin, x) for lin in linears]


def _split(t, heads, norm=None):
    """[B, N, H * D] -> [B, N, H, D] (a view), with the per-head norm applied over D."""
    t = t.unflatten(-1, (heads, -1))
    return t if norm is None else norm(t)


def project_heads(x, fused, linears, heads, norms):
    """[B, N, H, D] per linear (project() split into heads, each with its per-head norm or None). Where
    genfast.attention's Triton kernels want q/k/v rows aligned (GPUs, head dim 72 in fp16/bf16:
    PixArt, genfast.ops.qkv.qkv_head_width), a layer with no norm writes per-head padded rows itself:
    read in place, no copy."""
    lin = linears[0]
    if (all(norm is None for norm in norms) and type(lin) is _LINEAR and lin.out_features % heads == 0
            and _qkv.qkv_head_width(lin.out_features // heads, x.dtype, x.device) != lin.out_features // heads):
        return [_qkv.projection_heads(x, layer, heads)[:, :, 0] for layer in linears]
    return [_split(t, heads, norm) for t, norm in zip(project(x, fused, linears), norms)]


# ------------------------------------------------------------------------------------- masks
_checked = [None, None]  # (mask, version) of the last mask found exact: PixArt passes one mask to every layer


def key_padding_mask(mask, batch, nk):
    """A diffusers / SDPA attention mask over keys -> (bool [B, Nk] True = attend, ok). ok is False
    when genfast.attention cannot give the original answer with a key padding mask: a mask that
    varies over queries or heads, a bool mask (fully masked rows: NaN in SDPA), or an additive
    float mask with values other than 0 (attend) and <= -1e4 (padding). A sample whose keys are all
    padding attends every key, which is what softmax over equally shifted scores does."""
    if mask is None:
        return None, True
    if mask.dtype == torch.bool or not mask.is_floating_point():
        return None, False
    if mask.shape[-1] != nk or mask.numel() != batch * nk or mask.dim() < 2 or mask.shape[0] != batch:
        return None, False
    m = mask.reshape(batch, nk)
    real = m == 0
    if not torch.compiler.is_compiling():
        key = (mask, mask._version) if not mask.is_inference() else None
        last = _checked[0]
        if key is None or last is None or last[0] is not mask or last[1] != key[1]:
            pad = m <= PAD_BIAS
            no_real = ~real.any(-1, keepdim=True)
            ok = bool(((real | pad) & (~no_real | (m == m[:, :1]))).all())
            if not ok:
                return None, False
            _checked[0] = key
    return real | ~real.any(-1, keepdim=True), True


# -------------------------------------------------------------------------------- processors
class GenfastAttnProcessor:
    """Replaces AttnProcessor2_0 on one Attention layer (self or cross attention)."""

    def __init__(self, attn, original):
        self.original = original
        self.qkv = FusedLinear(attn.to_q, attn.to_k, attn.to_v) if can_fuse(attn.to_q, attn.to_k, attn.to_v) else None
        self.kv = FusedLinear(attn.to_k, attn.to_v) if can_fuse(attn.to_k, attn.to_v) else None

    @staticmethod
    def reasons(attn):
        """Why a layer keeps its processor ([] = it can be swapped)."""
        out = []
        for name in ("spatial_norm", "group_norm", "norm_cross"):
            if getattr(attn, name, None):
                out.append(f"has {name}")
        if getattr(attn, "residual_connection", False):
            out.append("residual_connection=True")
        if getattr(attn, "to_out", None) is None or len(attn.to_out) != 2:
            out.append("no to_out projection")
        return out

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        x = hidden_states
        ctx = x if encoder_hidden_states is None else encoder_hidden_states
        if args or kwargs.get("scale") is not None or x.dim() != 3 or not _support.runnable(x, "attention"):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        b, n, _ = x.shape
        kpm, ok = key_padding_mask(attention_mask, b, ctx.shape[1])
        if not ok:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        h = attn.heads
        # diffusers normalises q / k per head over D: the same on [B, N, H, D] as on [B, H, N, D]
        if encoder_hidden_states is None:
            q, k, v = project_heads(x, self.qkv, (attn.to_q, attn.to_k, attn.to_v), h, (attn.norm_q, attn.norm_k, None))
        else:
            (q,) = project_heads(x, None, (attn.to_q,), h, (attn.norm_q,))
            k, v = project_heads(ctx, self.kv, (attn.to_k, attn.to_v), h, (attn.norm_k, None))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = genfast.attention(q, k, v, key_padding_mask=kpm)
        out = attn.to_out[1](linear_layer(attn.to_out[0], out.transpose(1, 2).reshape(b, n, -1)))
        if attn.rescale_output_factor != 1.0:
            out = out / attn.rescale_output_factor
        return out


class GenfastJointAttnProcessor:
    """Replaces JointAttnProcessor2_0 (SD3): image and text tokens attend jointly. Like the
    original it ignores attention_mask."""

    def __init__(self, attn, original):
        self.original = original
        self.qkv = FusedLinear(attn.to_q, attn.to_k, attn.to_v) if can_fuse(attn.to_q, attn.to_k, attn.to_v) else None
        self.added = None
        added = (getattr(attn, "add_q_proj", None), getattr(attn, "add_k_proj", None), getattr(attn, "add_v_proj", None))
        if added[0] is not None and can_fuse(*added):
            self.added = FusedLinear(*added)

    reasons = staticmethod(lambda attn: [])

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        x, c = hidden_states, encoder_hidden_states
        if x.dim() != 3 or not _support.runnable(x, "attention"):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        b, n, _ = x.shape
        h = attn.heads
        q, k, v = project(x, self.qkv, (attn.to_q, attn.to_k, attn.to_v))
        q, k, v = _split(q, h, attn.norm_q), _split(k, h, attn.norm_k), _split(v, h)
        if c is not None:  # image then text tokens, concatenated along the tokens as the original does
            cq, ck, cv = project(c, self.added, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            cq, ck, cv = _split(cq, h, attn.norm_added_q), _split(ck, h, attn.norm_added_k), _split(cv, h)
            q, k, v = torch.cat([q, cq], 1), torch.cat([k, ck], 1), torch.cat([v, cv], 1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = genfast.attention(q, k, v).transpose(1, 2).reshape(b, q.shape[2], -1)
        hs = attn.to_out[1](linear_layer(attn.to_out[0], out[:, :n]))
        if c is None:
            return hs
        ctx = out[:, n:]
        if not attn.context_pre_only:
            ctx = linear_layer(attn.to_add_out, ctx)
        return hs, ctx


def processor_for(attn):
    """(genfast processor class, None) for a layer whose processor genfast replaces, else
    (None, reason)."""
    from diffusers.models import attention_processor as ap

    proc = attn.processor
    table = {ap.AttnProcessor2_0: GenfastAttnProcessor, ap.JointAttnProcessor2_0: GenfastJointAttnProcessor}
    cls = table.get(type(proc))
    if cls is None:
        return None, f"processor {type(proc).__name__} is not one genfast replaces"
    why = cls.reasons(attn)
    return (cls, None) if not why else (None, "; ".join(why))


# ------------------------------------------------------------------ diffusers' backend registry
BACKEND_NAME = "genfast"


def _native_fn():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]


def genfast_backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, _parallel_config=None):
    """diffusers' attention-backend contract: [B, N, H, D] in and out. Calls genfast cannot serve
    exactly (dropout, GQA head counts, context parallelism, general masks) go to the native one."""
    b, nk = key.shape[0], key.shape[1]
    kpm, ok = key_padding_mask(attn_mask, b, nk)
    if (not ok or dropout_p or _parallel_config is not None or query.dim() != 4 or key.shape[2] != query.shape[2]
            or (is_causal and kpm is not None) or not _support.runnable(query, "attention")):
        return _native_fn()(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p,
                            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, _parallel_config=_parallel_config)
    out = genfast.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=bool(is_causal),
                            scale=scale, key_padding_mask=kpm)
    return out.transpose(1, 2)


def register_backend():
    """Adds "genfast" to diffusers' AttentionBackendName and registry (idempotent), without
    touching diffusers' files: then model.set_attention_backend("genfast") and
    `with attention_backend("genfast")` select it. Returns the enum member."""
    from diffusers.models.attention_dispatch import AttentionBackendName as names
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

    member = names._value2member_map_.get(BACKEND_NAME)
    if member is None:
        # Enums cannot grow through their API; add the member the way the Enum machinery stores one.
        member = str.__new__(names, BACKEND_NAME)
        member._name_, member._value_ = BACKEND_NAME.upper(), BACKEND_NAME
        names._member_map_[member._name_] = member
        names._value2member_map_[BACKEND_NAME] = member
        names._member_names_.append(member._name_)
        type.__setattr__(names, member._name_, member)
    if registry._backends.get(member) is not genfast_backend:
        registry.register(member, constraints=[])(genfast_backend)
    return member


def dispatch_processor_reasons(proc):
    """Why a processor that calls the dispatcher cannot be pointed at genfast ([] = it can)."""
    out = []
    if getattr(proc, "_parallel_config", None) is not None:
        out.append("context parallelism is configured")
    if getattr(proc, "_attention_backend", None) not in (None, BACKEND_NAME) and \
            str(getattr(proc._attention_backend, "value", proc._attention_backend)) != BACKEND_NAME:
        out.append(f"the user chose attention backend {proc._attention_backend}")
    return out
