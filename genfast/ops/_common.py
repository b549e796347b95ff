"""What every op module shares: the torch.library namespace, argument checks that raise
ValueError/TypeError naming the argument, dtype codes for the compiled modules, and 2-D views."""
import functools
import math
import threading

import torch
from torch.autograd import forward_ad as _forward_ad

from genfast import backends

LIB = torch.library.Library("genfast", "DEF")

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
KERNEL_DTYPES = tuple(DTYPE_CODE)


def check_float_tensor(name, t, *, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64)):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have a floating dtype ({allowed}), got {str(t.dtype).replace('torch.', '')}")


def check_like(name, t, ref_name, ref):
    """t must match ref's shape, dtype and device."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; expected the same device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; expected the same dtype")
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}; expected the same shape")


def _span(t):
    """[first, last] byte addresses t can touch (t non-empty)."""
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.numel() * t.element_size() - 1
    last = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size() - 1


def overlaps(a, *others):
    """True if a shares memory with any of the (non-None) others."""
    if a.numel() == 0:
        return False
    a0, a1 = _span(a)
    for b in others:
        if b is not None and b.numel():
            b0, b1 = _span(b)
            if a0 <= b1 and b0 <= a1:
                return True
    return False


@functools.lru_cache(maxsize=None)
def _cpuinfo(field):
    """The value of the first `field : value` line of /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_vendor():
    """The CPU's vendor_id ("GenuineIntel", "AuthenticAMD", ...; "" where /proc/cpuinfo has none).
    Some defaults depend on it: MKL, behind torch's fp32 CPU GEMMs, runs its AVX-512 code on Intel
    CPUs only (genfast.ops.linear, genfast.ops.attention_cpu)."""
    return _cpuinfo("vendor_id")


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo ("avx512f", "avx2", ...; empty where it has none)."""
    return frozenset(_cpuinfo("flags").split())


def unit_last(t):
    """t, or a contiguous copy where its last dim is strided (kernels that read rows as vectors)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def rows_strides(t):
    """(row stride, column stride) of t seen as [rows, cols] (rows = dim 0, cols = the rest merged)
    without a copy, or None when the non-batch dims cannot merge into one strided dim. Plain ints:
    cheaper than building a view on the launch-bound path."""
    if t.dim() and t.shape[0] and t.is_contiguous():  # the common case: one C call, no loop
        return t.numel() // t.shape[0] if t.dim() > 1 else 1, 1
    shape, stride = t.shape, t.stride()
    col_stride = expect = None
    for size, st in zip(reversed(shape[1:]), reversed(stride[1:])):
        if size == 1:
            continue
        if col_stride is not None and st != expect:
            return None
        if col_stride is None:
            col_stride = st
        expect = st * size
    return stride[0], 1 if col_stride is None else col_stride


def rows_view(t):
    """t as a 2-D [rows, cols] strided view without a copy (rows = dim 0), or None when the
    non-batch dims cannot be merged into one strided dim (then callers copy)."""
    if t.dim() == 1:
        return t.unsqueeze(1)
    try:
        return t.view(t.shape[0], -1) if t.shape[0] != 0 else None
    except RuntimeError:
        return None


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # CUDA builds of torch only


def cuda_stream(t):
    """The current CUDA stream of t's device as an integer handle: one C call (torch.cuda.current_stream
    builds a Stream object, several us on the launch-bound path)."""
    if _RAW_STREAM is not None:
        return _RAW_STREAM(t.device.index)
    return torch.cuda.current_stream(t.device).cuda_stream


def dispatcher_needed(*tensors):
    """True when a call must go through torch.ops.genfast.*: under torch.compile, a torch function
    or dispatch mode, a functorch transform (vmap, grad), forward-mode AD, or with a tensor subclass
    (fake tensors). Otherwise plain eager calls may skip the dispatcher and call the kernel (or an
    autograd.Function with the op's forward and backward) directly, which saves ~5-40 us a call.
    (A raw kernel call on a dual tensor would drop its tangent without a word.)"""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return True
    if torch._C._len_torch_dispatch_stack() or _transform_active():
        return True
    for t in tensors:  # (a loop: any() over a generator costs ~0.5 us more a call)
        if t is not None and type(t) is not torch.Tensor:
            return True
    return False


def _transform_active():
    """A functorch transform (vmap, grad, jvp, ...) or a forward-mode AD level is active."""
    return torch._C._functorch.peek_interpreter_stack() is not None or _forward_ad._current_level >= 0


def transformed():
    """True under a torch.func transform (grad, vjp, jvp, vmap, jacrev, jacfwd, hessian, ...) or
    inside torch.autograd.forward_ad.dual_level(). genfast's kernels have autograd formulas but no
    forward-mode (JVP) or batching rules, and torch.library's autograd glue refuses functorch's grad
    transforms, while its JVP gave zero tangents without an error. So the differentiable ops compute
    such calls with their plain-PyTorch reference (genfast.reference), which every transform handles:
    the reference's numbers (the kernels' within the tolerance rule, DESIGN.md §5) at eager
    PyTorch's speed and memory (attention materialises the Nq x Nk scores there). Consistency-model
    and MeanFlow training (torch.func.jvp through a DiT) and per-sample gradients (vmap of grad) take
    this path. Not under torch.compile, which traces the registered ops."""
    return not torch.compiler.is_compiling() and _transform_active()


_LEGACY_BATCHED = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)


def backward_by_reference(*grads):
    """Inside an autograd.Function's backward with these incoming gradients: whether it must recompute
    through the reference (graph_grads) instead of calling the kernels: create_graph=True (grad mode is
    on in the backward), a functorch transform around the backward, or batched gradients
    (torch.autograd.grad(..., is_grads_batched=True), jacobian(vectorize=True): tensors without
    storage of their own, which the kernels cannot read)."""
    if torch.is_grad_enabled() or transformed():
        return True
    if _LEGACY_BATCHED is not None:
        return any(g is not None and _LEGACY_BATCHED(g) for g in grads)
    return any(g is not None and torch._C._dispatch_keys(g).has(torch._C.DispatchKey.Batched) for g in grads)


def graph_grads(fn, inputs, needs, grads):
    """For a backward called with create_graph=True (a double backward: gradient penalties such as
    R1 / WGAN-GP, Hessian-vector products), where torch.is_grad_enabled() holds inside backward: the
    gradients of fn(*inputs) for the inputs flagged in needs, recomputed through fn in plain PyTorch
    and differentiated by autograd, so that they are themselves differentiable. The kernels' gradients
    would enter that graph as constants and the second-order terms through them would be lost without
    a word. grads: the outputs' gradients (None: an output without one). inputs: the saved tensors
    (the forward's own inputs, with their autograd history); non-tensors pass through to fn."""
    with torch.enable_grad():
        # each wanted input through an alias of its own: autograd.grad with respect to the inputs
        # themselves would add the paths through another input computed from this one (mu and
        # logvar = f(mu)), a total derivative where the backward owes the partial one
        inputs = [t.view_as(t) if n else t for t, n in zip(inputs, needs)]
        outs = fn(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    wanted = [t for t, n in zip(inputs, needs) if n]
    if not pairs or not wanted:
        return tuple(None for _ in needs)
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                   create_graph=torch.is_grad_enabled(), allow_unused=True))
    return tuple(next(got) if n else None for n in needs)


def finite(v):
    """math.isfinite(v) written with arithmetic and a comparison, so that torch.compile(dynamic=True),
    which traces Python floats symbolically, checks it without a graph break (math.isfinite on a
    symbolic float breaks the graph): inf - inf and NaN - NaN are NaN, which equals nothing."""
    return v - v == 0


def needs_grad(*tensors):
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False


def kernel_dtype_reasons(dtype):
    return [] if dtype in KERNEL_DTYPES else [f"dtype {dtype} is not supported (fp32, fp16, bf16 only)"]


_KERNEL_REASONS = {}


def kernel_reasons(device_type, dtype):
    """{backend: callable -> reasons} for the ops whose four kernels take fp32/fp16/bf16 whatever
    the shape; the callables read the environment each time they run, so the table is cached."""
    key = (device_type, dtype)
    table = _KERNEL_REASONS.get(key)
    if table is None:
        table = _KERNEL_REASONS[key] = {
            "cuda": lambda: backends.module_reasons("_cuda", device_type, "cuda") + kernel_dtype_reasons(dtype),
            "cpu": lambda: backends.module_reasons("_C", device_type, "cpu") + kernel_dtype_reasons(dtype),
            "cuda_emu": lambda: backends.module_reasons("_cuda_emu", device_type, "cpu") + kernel_dtype_reasons(dtype),
            "triton": lambda: backends.triton_reasons(device_type) + kernel_dtype_reasons(dtype),
            "reference": lambda: [],
        }
    return table


# ------------------------------------------------------------- output buffers reused between calls
_reuse_lock = threading.Lock()
_use_count = torch._C._storage_Use_Count


class _Kept:
    """A cached buffer with its storage's handle (read once: untyped_storage() builds a Python
    object, ~1 us a call on the launch-bound path)."""
    __slots__ = ("buf", "cdata")

    def __init__(self, buf):
        self.buf, self.cdata = buf, buf.untyped_storage()._cdata

    def free_view(self, n, shape):
        """A [shape] view of the buffer's first n elements when it is large enough and nothing but
        the cache holds its memory (a view: holding it makes the buffer busy for the next call),
        else None. The view of a buffer of exactly that shape is a detach() (~0.4 us; a slice and
        a view: ~2.5 us)."""
        buf = self.buf
        if buf.numel() < n or _use_count(self.cdata) != _FREE_REFS:
            return None
        return buf.detach() if buf.shape == shape else buf.view(-1)[:n].view(shape)


def _free_refs():
    probe = _Kept(torch.empty(1))
    return _use_count(probe.cdata)


_FREE_REFS = _free_refs()  # the storage use count of a buffer that nothing but its cache holds


# Below this size a buffer is a plain torch.empty (~1 us): glibc serves such blocks from its heap
# without page faults, and the reuse bookkeeping costs more (~3 us a buffer, tiny DiT block on the CPU).
REUSE_MIN_BYTES = 64 * 1024


def _small(n, dtype):
    return n * dtype.itemsize < REUSE_MIN_BYTES


def _fresh(shape, dtype, device):
    with torch.inference_mode(False):  # a cached buffer must stay usable outside inference mode
        return torch.empty(shape, dtype=dtype, device=device)


def reused_buffer(cache, key, shape, dtype, device, keep=True):
    """An uninitialised [shape] tensor for a large op output (a plain torch.empty below REUSE_MIN_BYTES):
    the one cached under key when nothing but the cache holds its memory any more (its consumer ran and
    dropped it), else a new one, cached when keep. Saves a fresh buffer's page faults on every training
    step; the caller's cache dict is its own (one buffer per key), freed by clearing it."""
    shape = torch.Size(shape)
    n = math.prod(shape)
    if _small(n, dtype):
        return torch.empty(shape, dtype=dtype, device=device)
    with _reuse_lock:
        kept = cache.get(key)
        view = kept.free_view(n, shape) if kept is not None else None
        if view is not None:
            return view
        buf = _fresh(shape, dtype, device)
        if keep:
            cache[key] = _Kept(buf)
        return buf.detach()


def pooled_buffer(pool, key, shape, dtype, device, limit):
    """reused_buffer with up to `limit` buffers per key (pool[key] a list): for outputs that autograd
    saves, of which a model holds one per layer until its backward (a DiT's blocks). The first free
    one of the key that is large enough, else a new one, kept while the key has fewer than limit."""
    shape = torch.Size(shape)
    n = math.prod(shape)
    if _small(n, dtype):
        return torch.empty(shape, dtype=dtype, device=device)
    with _reuse_lock:
        kept_list = pool.setdefault(key, [])
        for kept in kept_list:
            view = kept.free_view(n, shape)
            if view is not None:
                return view
        buf = _fresh(shape, dtype, device)
        if len(kept_list) < limit:
            kept_list.append(_Kept(buf))
        return buf.detach()
