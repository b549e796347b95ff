"""Which implementation runs an op: cuda | triton | cpu | cuda_emu | sdpa | reference (DESIGN.md §3).

Each op declares, per backend, a function `reasons(**case) -> list[str]` (empty: it can run the
case). `choose` walks the op's preference order for the tensors' device and takes the first backend
with no reasons; the reference can run everything, so the fallback is always the same answer.
`GENFAST_BACKEND=<name>` forces a backend: if it cannot run the case, one ValueError lists every
reason instead of silently running something else.

  GENFAST_BACKEND=triton   with TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors
  GENFAST_BACKEND=cuda_emu runs the CUDA kernels on CPU tensors through csrc/emu
  GENFAST_BACKEND=sdpa     attention only: torch's scaled_dot_product_attention (no key mask)
"""
import os

from genfast import _native

NAMES = ("cuda", "triton", "cpu", "cuda_emu", "sdpa", "reference")

# Preference per op and device type, until the benchmarks on a GPU say otherwise: CUDA first for
# elementwise and norm ops, Triton first for attention (DESIGN.md §3).
PREFERENCE = {
    "flow_euler_step": {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")},
    "adaln_modulate": {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")},
    "gated_residual": {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")},
    # Triton first for VQ: faster than the SIMT CUDA kernel at every benchmark shape (H200, fp32, N = 65,536,
    # K = 8,192, d = 8 / 32 / 256: 1.62 / 2.21 / 13.9 vs 1.70 / 3.13 / 24.7 ms; benchmarks/gpu/vq_sweep.py).
    "vq_nearest": {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")},
    "reparam_kl": {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")},
    # The MLP backward's GELU(tanh)' + bias sum and the qkv bias sums (genfast/ops/gelu.py).
    "gelu_tanh_backward_bias": {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")},
    "column_sums": {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")},
    # Attention on GPUs: torch's SDPA (cuDNN / flash) first where it can run the case (fp16/bf16, no
    # key mask): measured faster than genfast's Triton and CUDA kernels at every benchmark shape on
    # an H200 (benchmarks/gpu/NOTES.md); genfast's kernels serve masks, fp32 and forced backends.
    "attention": {"cuda": ("sdpa", "triton", "cuda", "reference"), "cpu": ("cpu", "reference")},
}


try:  # os.environ.get costs ~0.5 us (it encodes the key); the launch-bound path reads the raw dict
    _RAW_ENV = os.environ._data
    _ENCODE = os.environ.encodekey
    _DECODE = os.environ.decodevalue
except AttributeError:  # not CPython on POSIX
    _RAW_ENV = None


# The encoded keys of the variables genfast reads, made at import: a cache filled on first use was
# filled inside torch.compile's trace when a compiled function made the process's first genfast call
# (genfast.attention), and dynamo failed its own guard on that dict ("Guard failed on the same frame
# it was created").
_KEYS = {name: _ENCODE(name) for name in ("GENFAST_BACKEND", "TRITON_INTERPRET")} if _RAW_ENV is not None else {}


def getenv(name):
    """os.environ.get(name), but cheap enough for a per-call check; sees changes made at any time."""
    key = _KEYS.get(name)
    if key is None:  # another name (or not CPython on POSIX): the plain lookup
        return os.environ.get(name)
    value = _RAW_ENV.get(key)
    return None if value is None else _DECODE(value)


def forced():
    name = (getenv("GENFAST_BACKEND") or "").strip().lower()
    if name and name not in NAMES:
        raise ValueError(f"GENFAST_BACKEND={name!r} is not a genfast backend; expected one of {', '.join(NAMES)}")
    return name or None


def triton_reasons(device_type):
    """Why the Triton kernels cannot run on tensors of this device type (empty list: they can)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return [f"triton is not installed ({e})"]
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type == "cpu" and not interpreted:
        return ["CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)"]
    if device_type == "cuda" and interpreted:
        return ["TRITON_INTERPRET=1 is set: the interpreter runs on CPU tensors only"]
    if device_type not in ("cpu", "cuda"):
        return [f"device type {device_type!r} is not supported"]
    return []


def module_reasons(name, device_type, wanted_device):
    """Reasons a compiled module cannot serve tensors on `device_type`."""
    if device_type != wanted_device:
        return [f"runs on {wanted_device} tensors, got {device_type} tensors"]
    mod, why = _native.status(name)
    return [] if mod is not None else [why]


def choose(op, device_type, reasons_by_backend):
    """The backend name to run `op` on; reasons_by_backend maps name -> callable returning reasons."""
    name = forced()
    if name is not None:
        if name not in reasons_by_backend:
            raise ValueError(f"genfast.{op}: GENFAST_BACKEND={name} has no implementation of this op")
        reasons = reasons_by_backend[name]()
        if reasons:
            raise ValueError(f"genfast.{op}: the forced backend {name!r} cannot run this case: " + "; ".join(reasons))
        return name
    order = PREFERENCE[op].get(device_type, ("reference",))
    tried = []
    for candidate in order:
        if candidate not in reasons_by_backend:  # a way this caller cannot take (attention's op: sdpa)
            continue
        reasons = reasons_by_backend[candidate]()
        if not reasons:
            return candidate
        tried.append(f"{candidate}: " + "; ".join(reasons))
    raise ValueError(f"genfast.{op}: no backend can run this case ({' | '.join(tried)})")


_CHOICES = {}  # choose_cached: (op, device type, key, GENFAST_BACKEND, TRITON_INTERPRET) -> backend


def choose_cached(op, device_type, key, reasons):
    """choose(op, device_type, reasons(device_type, *key)) remembered per (op, device type, key,
    GENFAST_BACKEND, TRITON_INTERPRET), for ops that ask on every call (the launch-bound flow step
    among them: raw environment strings, nothing built on a hit): key holds whatever else the
    reasons depend on (dtype, head dim, ...). A backend that cannot run raises every time (not cached)."""
    full = (op, device_type, key, getenv("GENFAST_BACKEND"), getenv("TRITON_INTERPRET"))
    name = _CHOICES.get(full)
    if name is None:
        name = _CHOICES[full] = choose(op, device_type, reasons(device_type, *key))
    return name


def explain(op, device_type, reasons_by_backend):
    """[(backend, reasons)] in preference order, for genfast.info()."""
    order = PREFERENCE[op].get(device_type, ("reference",))
    return [(name, reasons_by_backend[name]()) for name in order if name in reasons_by_backend]
