"""The 'cpu' backend of genfast.attention: torch's GEMMs around genfast's fused softmax rows, or
torch's fused flash kernel where that is faster. Picked per case by measured cost (2-core AVX-512
machine, benchmarks/test_attention.py):

  "heads"   chunks of whole (batch, head) score matrices: for a group of heads, s = q k^T by
            torch's batched GEMM in the input dtype (oneDNN; bf16 runs on the AVX-512 BF16 units,
            ~4x the fp32 rate), ONE fused C++ pass per score row (csrc/cpu/attention.cpp: scale,
            causal and key masks, softmax in fp32, log-sum-exp) writing p over s in place, then
            out = p v. The backward recomputes s and dp = dout v^T per group, one fused pass turns
            them into p and ds = p (dp - rowsum(p dp)) scale, and dv = p^T dout, dq = ds k,
            dk = ds^T q are single GEMMs per group written straight into the gradients (no
            accumulation over query blocks). The plain matmul-softmax-matmul path pays for its
            passes between the GEMMs (scale, softmax, softmax backward: round trips over B H N^2
            that do not fit any cache) and for page-faulting its N^2 temporaries in; here one
            score buffer per call is reused by every group and small enough to stay in L2/L3.
            Used where one head's scores fit the budget below.
  "rows"    blocks of query rows of all heads (when one head's scores do not fit the budget):
            the same GEMMs and rows, dk/dv summed over the blocks in fp32. (Both ways live in
            attention_cpu_heads.py; this module picks the way and holds the buffers.)
  "sdpa"    torch's fused CPU flash kernel (aten::_scaled_dot_product_flash_attention_for_cpu and
            its backward), which returns the fp32 log-sum-exp too. fp16; fp32 under 64 keys.
  "small"   fp32 and bf16 (attention_cpu_fp32.py): ONE C++ call, a thread per (batch, head), each
            head's GEMMs on genfast's own AVX-512 micro-kernel (bf16: AVX-512 BF16 dot products,
            csrc/cpu/attention_bf16_small.cpp, or AMX tiles where the CPU has them,
            csrc/cpu/attention_bf16_amx.cpp), query blocks bounded per thread.
  "onednn"  fp32 only (attention_cpu_fp32.py): per-head oneDNN GEMMs around the softmax rows; where
            the CPU lacks AVX-512 (the "small" kernels need it), within SCORE_BYTES.

Which way (FITS / LONG / FUSED_FROM_KEYS / FUSED_BELOW_KEYS below): fp16 takes "sdpa" everywhere,
fp32 "small" from 64 keys on ("sdpa" below: call overhead), bf16 "small" at every length (an odd
head dim, a CPU without AVX-512 BF16, or fewer (batch, head) pairs than SMALL16_FROM_HEADS per
thread: "heads", or "rows" where one head's scores do not fit). The tables depend on the CPU
(tables_for_cpu): on Intel CPUs fp32 takes "small" only from 2 (batch, head) pairs per thread and
2^18 scores on, and its backward only where the forward kept p (SMALL32_FROM; "sdpa" otherwise),
and with AMX bf16 takes "small" (on AMX tiles) at any head count, except small forwards that keep
no p: "sdpa" (FUSED_WITHOUT_P), their backward "small", and the tiniest cases: "sdpa" (TINY16). The tables below are the AMD EPYC's; the Intel Xeon's (AMX) are in
tables_for_cpu.
bf16 per way, GENFAST_BENCH_WAYS=1 pytest benchmarks/test_attention.py -k "attention_forward and
bf16", 2026-11-26 (ms, fwd+bwd / fwd, one run, glibc's default malloc; the machine ran slow that
day, so compare within a row):

  shape [B, H, N, D]     torch SDPA      plain           "heads"        "small"
  bf16 2x16x256x72       14.8 / 4.54     4.94 / 5.70     4.79 / 2.26    4.43 / 1.29
  bf16 2x16x1024x72      147 / 60.3      179 / 86.5      61.2 / 19.8    55.0 / 16.7
  bf16 1x8x1024x64       33.0 / 13.9     14.1 / 22.1     13.0 / 4.80    12.6 / 3.97

(2x16x256x72 with --bench-malloc raise, the heap warm: plain 3.70 / 1.51, "heads" 3.44 / 1.15,
"small" 3.11 / 1.01. In the whole suite, after the fp32 cases, that fwd+bwd case measures "heads"
and "small" alike at 4.4-5.0 ms and the plain path at 4.0-5.0 (0.98-1.05x, results/*-91eed5d.json):
the kernels run ~0.7 ms slower when the previous impl has evicted the L3 and q, k, v, p come from
DRAM, while the plain path's temporaries live in DRAM anyway and its page faults are gone once
earlier cases have raised glibc's thresholds.) The "small" kernels run ~420-490 GFLOP/s a core on these GEMMs (oneDNN's
bf16 bmm: 350-460 on the same shapes) and keep the scores of a query block in fp32 in the core's
L2: no bf16 round trip of s, no second pass to normalise p (p v is scaled per row in the GEMM's
epilogue), no library call per GEMM. The fp32 table, same command, 2026-11-25:

  shape [B, H, N, D]     torch SDPA      plain           "sdpa"         "onednn"       "small"
  fp32 2x16x256x72       12.6 / 3.67     12.9 / 5.82     12.7 / 3.82    13.5 / 4.01    7.78 / 2.21
  fp32 2x16x1024x72      183 / 52.2      367 / 167       182 / 52.3     106 / 30.4     110 / 32.0
  fp32 1x8x1024x64       40.7 / 11.5     78.6 / 41.5     40.6 / 11.7    23.0 / 6.88    22.6 / 6.93

("small" at 2x16x1024x72 after packing k/v once per head: ~100 / 28 by hand.) Why it wins: torch's
fp32 flash kernel runs at ~90 % of MKL's sgemm rate, ~204 GFLOP/s on these 2 cores (MKL takes its
AVX2 path on this AMD CPU); the "small" way runs ~300 GFLOP/s with no library call per head.
Earlier measurements of the other ways (the fp32 rows are from before "onednn"/"small"), with
`GENFAST_BENCH_WAYS=1 pytest benchmarks/test_attention.py -k test_attention_forward` (2 threads,
ms, fwd+bwd / fwd, medians of interleaved rounds of one run; the machine was shared, mostly quiet
for these cases, same-path rows differ by up to ~5 %):

  shape [B, H, N, D]     torch SDPA      plain            "sdpa" way      "heads" way
  fp32 2x16x256x72       11.6 / 3.46     20.2 / 11.0      12.7 / 3.60     13.7 / 4.21
  fp32 2x16x1024x72      186 / 52.7      394 / 175        185 / 52.8      198 / 52.7
  fp32 1x8x1024x64       39.5 / 11.3     77.4 / 42.3      39.5 / 11.5     40.9 / 12.4
  bf16 2x16x256x72       11.8 / 3.52     8.10 / 1.45      11.9 / 3.55     3.72 / 1.14
  bf16 2x16x1024x72      292 / 112       352 / 159        294 / 111       206 / 64     (others 50 %)
  bf16 1x8x1024x64       69.4 / 25.7     62.9 / 45.8      67.3 / 24.4     55.1 / 15.0  (others 50 %)

fp32 "heads" (torch.bmm = MKL) cannot win: it ties at best and loses on one thread and on a
loaded machine (4+ parallel regions a call against the fused kernel's one). The "small" way has
one parallel region a call too, and wins on one thread as well (1 thread: 2x16x256x72 fwd+bwd
14.2 vs SDPA 25.4 ms, 1x8x1024x64 43.0 vs 81.9). Where fp32 does take the fused kernel (short
keys), the output and gradients keep that kernel's layouts (genfast.ops.attention's _out_layout
and _grad_strides; fp32 gradients are always in that layout, whichever way ran) and eager calls
without a key mask call torch's SDPA itself (genfast.ops.attention._fused_directly). bf16:
AVX-512 BF16 dot products run at ~4x the fp32 rate, and both "heads" (oneDNN's bf16 GEMMs) and
"small" beat SDPA and the plain path.

Memory: besides its inputs and outputs, a call uses at most SCORE_BYTES of score buffers
(forward: one [heads, Nq, Nk] buffer in q's dtype; backward: two), whatever B, H and N are ("small":
per thread two [rows, Nk] fp32 blocks within min(SMALL_BLOCK_BYTES, SCORE_BYTES / threads), bf16
18 bytes per key and row within SMALL16_BLOCK_BYTES, kept by each thread between calls, plus its
packed k/v panels and fp32 dk / dv sums, O(Nk D)). One
exception, asked for by genfast.ops.attention when a gradient is needed ("keep_p"): in the "heads"
and "small" ways the forward may keep the probabilities p [B, H, Nq, Nk] (q's dtype) for the backward when they
take at most KEEP_P_BYTES. That is what plain PyTorch keeps for its backward anyway (and more); it
saves the backward the q k^T GEMM and the exp pass (measured ~1/7 of a bf16 forward + backward;
"small", 2x16x256x72: backward 1.86 vs 2.36 ms recomputing, forward +0.03 ms). Both ways keep the
normalised p, so either way's backward reads what the other's forward kept.
Above the budget the backward recomputes p from the log-sum-exp and memory stays O(N) per call.

Workspace: fresh pages cost page faults (a bmm into a fresh 16 MiB runs at half the rate of one
into warm memory), so the score buffer and the last p buffer are kept between calls: per (device,
dtype) at most SCORE_BYTES of scores and KEEP_P_BYTES of p stay allocated after a call.
free_workspace() drops them; KEEP_WORKSPACE = False keeps nothing. A buffer in use is never handed
to another call (nested, re-entrant or concurrent): scores leave the cache while in use, and p,
which autograd saves, is reused only when no tensor but the cache's own holds its memory. In a
model with several attention layers only one layer's p is reused a step (the others are alive
until their backward).

Numerics: q k^T leaves the GEMM rounded to q's dtype and p is rounded to it before p v, as in
plain PyTorch code of that dtype (and FlashAttention on GPUs); softmax and lse are fp32. The tests
hold bf16 to 2x the error of plain bf16 PyTorch.

Any strides are accepted (q/k/v as views of one fused qkv projection are read in place); the fused
aten kernel needs a unit last-dim stride (it reads garbage otherwise, torch 2.13), so such views
are copied first.
"""
import math
import threading
from contextlib import contextmanager

import torch

from genfast.ops import attention_cpu_fp32, attention_cpu_heads
from genfast.ops._common import DTYPE_CODE, cpu_flags, cpu_vendor, reused_buffer, unit_last
from genfast.ops import linear as _linear
from genfast.ops.linear import onednn_available

# Score buffers a call may hold (see the module docstring). Measured: 4-16 MiB chunks run the
# GEMMs as fast as one big call while the scores stay in the 32 MiB L3.
SCORE_BYTES = 8 << 20


def tables_for_cpu(vendor, amx):
    """(FITS, LONG, FUSED_WITHOUT_P, SMALL16_FROM_HEADS, SMALL32_FROM) below for a CPU of this
    vendor, with AMX-BF16 or not.

    Measured on a 2-core AMD EPYC (AVX-512 BF16): the module docstring's tables. On a 2-core Intel
    Xeon with AMX (benchmarks/test_attention.py, GENFAST_BENCH_WAYS=1, 2026-11-26, ms fwd+bwd / fwd):
      fp32 2x16x256x72   torch SDPA 10.1 / 2.66   "small" 12.6 / 3.11   "heads" 10.6 / 3.30
      fp32 1x8x1024x64   torch SDPA 28.7 / 8.58   "small" 36.0 / 9.79
    MKL's sgemm takes its AVX-512 path on Intel CPUs (AVX2 on AMD), and torch's fused kernel runs
    at ~2/3 of the sgemm rate there. The fp32 "small" kernel ties it until it keeps p for its
    backward (no q k^T and no exponentials there; p streamed out by the forward) and passes its
    micro-kernel's operands as scalars (a struct argument's copy had stalled each call), session
    13, paired, 2 threads, torch SDPA time / "small" time, forward / forward + backward:
      2x16x256x72 1.09 / 1.11, 8x6x256x64 1.16 / 1.16, 1x6x256x64 1.11 / 1.04,
      2x16x256 x 77 keys 1.56 / 1.30, 1x8x1024x64 1.10 / 1.01 (p kept, 32 MiB),
      2x16x1024x72 1.08 / 0.91 (p over KEEP_P_BYTES: recomputed; 1.02 once the score blocks' rows
      were padded off 4 KiB strides, 1x8x1024x64 then 1.05), 2x4x128x64 1.10 / 0.98,
      1x1x512x72 1.01 / 0.87 (one head: the backward runs a head per thread),
      1x2x64x64 0.77 / 0.61, 2x16x17x72 0.82 / 0.71 (call overhead).
    So fp32 takes "small" from 2 (batch, head) pairs per thread and 2^18 scores on, and its
    backward only with p kept (torch's backward from the "small" forward's lse otherwise):
    SMALL32_FROM = (2, 2^18). bf16 "small" runs on AMX tiles
    where the CPU has them (attention_bf16_amx.cpp); with its tile operands 64-byte aligned it
    beats torch's fused kernel on a forward alone too (paired, 2 threads, 2026-11-26, session 12):
    1.29x / 1.26x / 1.36x at 2x16x256x72 / 2x16x1024x72 / 1x8x1024x64, 1.37x at 8x6x256x64,
    1.45x at 1x16x4096x64, 1.9-2.4x against 77-120 text keys, 1.18-1.20x with 2-4 (batch, head)
    pairs from 2^20 scores on, and forward + backward wherever measured, with any head count
    (SMALL16_FROM_HEADS 0: "small" 1.16-1.94x torch's SDPA there, "heads" 0.60-1.69x). Small
    forwards that keep no p lose it to call overhead: 0.41x at 1x2x64x64, 0.68x at 1x1x512x72,
    0.89x at 1x3x256x64, 0.93x at 2x16x17x17, 1.0x at 2x4x128x128; they take torch's kernel
    (FUSED_WITHOUT_P: under 2^18 scores, or 2^20 with fewer than 4 (batch, head) pairs a thread)."""
    fits = {torch.float32: "small", torch.float16: "sdpa", torch.bfloat16: "small"}
    small32_from = (2, 1 << 18) if vendor == "GenuineIntel" else None
    return fits, dict(fits), {torch.bfloat16: (4, 1 << 20, 1 << 18)} if amx else {}, 0 if amx else 2, small32_from


# Way for a case whose heads fit SCORE_BYTES, and for one whose heads do not; per dtype, (pairs per
# thread, scores below which a case with fewer pairs, scores below which any case) takes torch's
# fused kernel for a "small" forward that keeps no p (the backward still runs "small", from that
# kernel's log-sum-exp: fused_without_p); and from how many (batch,
# head) pairs per thread bf16 takes "small" (fewer take "heads" / "rows"; the small backward runs
# a head per thread). Without AMX, 2 threads, ms fwd / bwd, small vs heads: 1x1x512x72 0.32 / 0.57
# vs 0.27 / 0.48; 1x2x1024x64 1.50 / 2.28 vs 1.26 / 2.13; 2x2x512x64 0.76 / 1.22 vs 0.73 / 1.39.
# SMALL32_FROM: (pairs per thread, scores) from which fp32 takes "small", its backward only with p
# kept (see tables_for_cpu); None: wherever FITS / LONG say.
FITS, LONG, FUSED_WITHOUT_P, SMALL16_FROM_HEADS, SMALL32_FROM = tables_for_cpu(
    cpu_vendor(), attention_cpu_fp32.AMX_AVAILABLE)
# bf16 on AMX CPUs: "small" cases with fewer (batch, head) pairs per thread than TINY16[0] and under
# TINY16[1] scores take torch's fused kernel both ways (torch's C++ autograd when called directly):
# a "small" forward + backward has a ~190 us floor there (a Python node, buffers, two C++ calls)
# where torch's costs ~30 us a head. Xeon, 2 threads, paired, torch SDPA time / "small" time:
# 1x1x16x32 0.64, 1x2x16x32 0.73, 1x2x32x64 0.74 (0.86-0.89 on torch's kernel through
# genfast.attention), but 1x4x16x32 1.04, 2x2x16x64 1.05, 1x1x64x64 1.12, 1x2x64x64 1.04, and
# 1.6-4.3 from 2048 scores and 4 pairs on. Not with a key mask: torch's kernel around an additive
# mask lost there (1x2x16x32 358 vs 218 us; causal a tie). None: unmeasured (no AMX).
TINY16 = (2, 4096) if attention_cpu_fp32.AMX_AVAILABLE else None
# From this many keys on, torch's fused kernel whatever FITS says: it runs an fp32 1024-token
# forward at ~92 % of the sgemm peak, which two GEMMs and a softmax pass between them cannot beat
# (matters only where FITS picks "heads" for that dtype; see the table above).
FUSED_FROM_KEYS = {}
# Below this many keys, torch's fused kernel whatever FITS says (fp32: the per-head oneDNN calls of
# the "onednn" way cost more than they save on short sequences, see attention_cpu_fp32.py).
FUSED_BELOW_KEYS = {torch.float32: 64}
# Score blocks per thread of the fp32 "small" way (attention_cpu_fp32.py): query rows are taken in
# blocks whose two [rows, Nk] fp32 blocks fit this (about a core's L2), and at most SCORE_BYTES over
# all threads. Each thread keeps its blocks between calls.
SMALL_BLOCK_BYTES = 1 << 20
# The same for the bf16 "small" way (its blocks per row: see attention_cpu_fp32.small_forward).
# Measured at 256 and 1024 keys: blocks of 128-256 rows beat 32-64 by 5-15 % (fewer passes over
# the dk / dv sums and fewer B panels), even where they spill the L2.
SMALL16_BLOCK_BYTES = 4 << 20
# Causal cases from this many keys on take torch's fused kernel, which skips the masked half of
# the scores. Empty: the "small" way skips the keys after each query block's last row too and
# wins causal cases by 1.5-2.4x (the "onednn" way does not skip: 0.9-1.07x at 1024 keys).
CAUSAL_FUSED_FROM_KEYS = {}
# Without AVX-512, "small" could fall back to "onednn" from this many keys on ("sdpa" below); None:
# never. Chosen at 384 on an AVX-512 AMD EPYC with "small" switched off (0.8-1.0x at 256 keys); on a
# real AVX2-only CPU (2-core AMD EPYC) "onednn" ran 0.36-0.39x torch's fused kernel forward and
# 0.48-0.52x forward + backward at 1024 keys, so torch's kernel serves those CPUs.
ONEDNN_FROM_KEYS = None
# Whether torch's bf16 GEMMs are fast here (oneDNN on AVX-512 BF16 or AMX): the "heads" / "rows" ways
# run on them. Without (AVX2-only 2-core AMD EPYC) they ran 0.03x torch's fused kernel forward and
# 0.27x forward + backward (2x16x256x72 and 1024 tokens): bf16 takes torch's kernel there.
BF16_GEMMS = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
# p kept for the backward up to this many bytes (see the module docstring); 0: never.
KEEP_P_BYTES = 64 << 20


@torch.compiler.assume_constant_result  # a way choice (same numbers either way): no graph break
def _threads():
    return torch.get_num_threads()


def variant(q, nk, buffers=1, causal=False, masked=False):
    """'small', 'heads', 'rows', 'onednn' or 'sdpa' for q [B, H, Nq, D] against nk keys (buffers: 1
    fwd, 2 bwd; masked: with a key padding mask)."""
    if nk >= FUSED_FROM_KEYS.get(q.dtype, nk + 1) or nk < FUSED_BELOW_KEYS.get(q.dtype, 0):
        return "sdpa"
    if causal and nk >= CAUSAL_FUSED_FROM_KEYS.get(q.dtype, nk + 1):
        return "sdpa"
    fits = buffers * q.shape[2] * nk * q.element_size() <= SCORE_BYTES
    way = (FITS if fits else LONG).get(q.dtype, "sdpa")
    if way == "small":
        if q.dtype == torch.bfloat16 and TINY16 is not None and not masked and _tiny(q, nk, TINY16):
            return "sdpa"
        supported = attention_cpu_fp32.small_supports(q.dtype, q.shape[3])
        if q.dtype == torch.bfloat16 and (not supported or q.shape[0] * q.shape[1] < SMALL16_FROM_HEADS * _threads()):
            # no AVX-512 BF16, an odd head dim (the kernels read pairs), or too few heads to keep
            # every thread busy (the small backward runs a head per thread): torch's bf16 GEMMs
            # where they are fast, else torch's fused kernel
            return ("heads" if fits else "rows") if BF16_GEMMS else "sdpa"
        if not supported:  # fp32 without AVX-512: oneDNN's GEMMs where enabled, within the budget
            way = "onednn" if fits and ONEDNN_FROM_KEYS is not None and nk >= ONEDNN_FROM_KEYS else "sdpa"
        elif q.dtype == torch.float32 and SMALL32_FROM is not None and not _small32_pays(q, nk, buffers):
            way = "sdpa"
    if way == "onednn" and not (q.dtype == torch.float32 and onednn_available()):
        way = "sdpa"  # fp32 only; a torch build without oneDNN keeps the fused kernel
    return way


def _tiny(q, nk, limits):
    """Fewer (batch, head) pairs per thread than limits[0] and fewer scores than limits[1]."""
    b, h, nq, _ = q.shape
    return b * h < limits[0] * _threads() and b * h * nq * nk < limits[1]


def _small32_pays(q, nk, buffers):
    """SMALL32_FROM (Intel): enough (batch, head) pairs per thread and scores for the fp32 "small"
    way, and for its backward (buffers 2) p kept by the forward (keeps_p's budget)."""
    pairs, scores = SMALL32_FROM
    b, h, nq, _ = q.shape
    return b * h >= pairs * _threads() and b * h * nq * nk >= scores and (buffers == 1 or _p_fits(q, nk))


def fused_without_p(q, way, nk):
    """A forward of variant() `way` against nk keys that keeps no p (and has no key mask: forward()
    checks) runs torch's fused kernel instead (FUSED_WITHOUT_P: small bf16 "small" cases on AMX
    CPUs); its backward stays `way`'s."""
    limits = FUSED_WITHOUT_P.get(q.dtype)
    if way != "small" or limits is None:
        return False
    pairs, few_scores, scores = limits
    b, h, nq, _ = q.shape
    return b * h * nq * nk < (few_scores if b * h < pairs * _threads() else scores)


def _small_block_bytes(dtype=torch.float32):
    per_thread = SCORE_BYTES // max(1, torch.get_num_threads())
    return min(SMALL_BLOCK_BYTES if dtype == torch.float32 else SMALL16_BLOCK_BYTES, per_thread)


def may_use_fused(dtype):
    """True when some shape of this dtype takes torch's fused kernel. genfast.ops.attention then lays
    out the gradients as that kernel's backward writes them ([B, N, H, D] memory) and the other
    ways' gradients are copied into it: the layout stays a function of the dtype, not the shape."""
    # fp32 always: its short key sequences take the fused kernel, and its own ways write any layout
    return (dtype == torch.float32 or FITS.get(dtype, "sdpa") == "sdpa" or LONG.get(dtype, "sdpa") == "sdpa"
            or dtype in FUSED_FROM_KEYS)


def _p_fits(q, nk):
    """p [B, H, Nq, nk] in q's dtype within KEEP_P_BYTES."""
    b, h, nq, _ = q.shape
    return b * h * nq * nk * q.element_size() <= KEEP_P_BYTES


def keeps_p(q, nk):
    """Whether the forward keeps p for the backward (shape, dtype and the budgets only)."""
    return variant(q, nk) in ("heads", "small") and _p_fits(q, nk)


# Score buffers kept between calls (see "Workspace" above); False: a fresh one every call.
KEEP_WORKSPACE = True
_workspace = {}  # (device, dtype) -> a free 1-D buffer of at most SCORE_BYTES
_workspace_lock = threading.Lock()


_kept_p = {}  # (device, dtype) -> the last p buffer handed out, reused once nothing else holds it
_kept_grads = {}  # ("dq" | "dk" | "dv", device, dtype) -> the last gradient buffer of the kernel ways


def free_workspace():
    """Drops the buffers kept between calls (per dtype: scores, at most SCORE_BYTES; p, at most
    KEEP_P_BYTES; the gradients of the last backward)."""
    with _workspace_lock:
        _workspace.clear()
        _kept_p.clear()
        _kept_grads.clear()


def _grad_buffers(q, k, v, tokens_outer):
    """dq, dk, dv for the ways that write any strides: [B, N, H, D] memory (tokens_outer) or
    contiguous. Reused, as p, once nothing holds the last step's (a DiT block's qkv projection
    reads them and drops them; a leaf's .grad keeps its own): a fresh 3 x 3 MB every DiT-S step
    page-faulted ~200-700 times on the Xeon VM (~3 us a fault)."""
    out = []
    for name, t in zip(("dq", "dk", "dv"), (q, k, v)):
        b, h, n, d = t.shape
        shape = (b, n, h, d) if tokens_outer else (b, h, n, d)
        g = reused_buffer(_kept_grads, (name, t.device, t.dtype), shape, t.dtype, t.device, keep=KEEP_WORKSPACE)
        out.append(g.transpose(1, 2) if tokens_outer else g)
    return out


def _p_buffer(shape, dtype, device):
    """The buffer for p kept for the backward: p is an output that autograd saves, so the last one
    is reused only when no tensor but the cache's own holds its memory any more (its backward ran
    or its graph was freed), else a new one takes its place. Saves the page faults of a fresh
    buffer every training step (p is the largest tensor the call makes)."""
    return reused_buffer(_kept_p, (device, dtype), shape, dtype, device, keep=KEEP_WORKSPACE)


@contextmanager
def _scores(shape, dtype, device):
    """An uninitialised [shape] buffer for the with-block: the kept one of (device, dtype) when it is
    free and large enough (fresh pages cost page faults: a bmm into a fresh 16 MiB runs at half
    the rate of one into warm memory), else a new one. A buffer in use is out of the cache, so a
    nested, re-entrant or concurrent call never gets it; afterwards the larger one is kept."""
    n, key = math.prod(shape), (device, dtype)
    with _workspace_lock:
        buf = _workspace.pop(key, None)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # reusable outside inference mode too
            buf = torch.empty(n, dtype=dtype, device=device)
    try:
        yield buf[:n].view(shape)
    finally:
        if KEEP_WORKSPACE and buf.numel() * buf.element_size() <= SCORE_BYTES:
            with _workspace_lock:
                kept = _workspace.get(key)
                if kept is None or kept.numel() < buf.numel():
                    _workspace[key] = buf


def _additive_mask(mask, dtype):
    # [B, 1, 1, Nk]: 0 where a key is real, -inf on padding (the fused kernel wants q's dtype).
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))[:, None, None, :]


def _sdpa_operands(wide, mask, dtype):
    """(cast, attn_mask) for torch's fused kernel: cast(t) gives its unit-last operand, an exact fp32
    copy where wide (the widened 16-bit ways); the additive mask in the dtype the kernel runs in."""
    cast = (lambda t: unit_last(t.float())) if wide else unit_last
    return cast, (_additive_mask(mask, torch.float32 if wide else dtype) if mask is not None else None)


def _mask_bytes(mask):
    return mask.contiguous().view(torch.uint8) if mask is not None else None


def forward(q, k, v, mask, causal, scale, fully_masked, out, keep_p=False):
    """Writes out (genfast.ops' [B, H, Nq, D] output, whatever its memory layout); returns (out, lse
    [B, H, Nq] fp32 contiguous, +inf on fully masked rows), and p [B, H, Nq, Nk] with keep_p
    (only where keeps_p() says so)."""
    way = variant(q, k.shape[2], causal=causal, masked=mask is not None)
    # with a key mask, torch's kernel needs an additive mask and fixes for fully masked rows around
    # it: "small" (masks in its rows) is faster there at every size measured (bf16 1x2x64x64 49 vs
    # 82 us, 2x16x17x72 75 vs 146, 1x1x512x72 246 vs 263)
    if not keep_p and mask is None and fused_without_p(q, way, k.shape[2]):
        way = "sdpa"
    if way == "sdpa":
        wide = widened_forward(q.dtype)
        cast, am = _sdpa_operands(wide, mask, q.dtype)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            cast(q), cast(k), cast(v), 0.0, causal, attn_mask=am, scale=scale)
        if not wide and o.stride() == out.stride():
            out = o  # the kernel wrote the layout the op promises (q's): no copy, no fresh pages touched
        else:
            out.copy_(o)
        lse = lse.contiguous()
        if fully_masked is not None:
            out.masked_fill_(fully_masked[..., None], 0.0)
            lse = lse.masked_fill(fully_masked, float("inf"))
        return out, lse
    if way == "onednn":
        return attention_cpu_fp32.forward(q, k, v, _mask_bytes(mask), causal, scale, out)
    if way == "small":
        if keep_p:  # p is an output (saved for the backward), a buffer of its own
            b, h, nq, _ = q.shape
            p = _p_buffer((b * h, nq, k.shape[2]), q.dtype, q.device)
            out, lse = attention_cpu_fp32.small_forward(q, k, v, _mask_bytes(mask), causal, scale, out,
                                                        _small_block_bytes(q.dtype), p)
            return out, lse, p.view(b, h, nq, -1)
        return attention_cpu_fp32.small_forward(q, k, v, _mask_bytes(mask), causal, scale, out,
                                                _small_block_bytes(q.dtype))
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    lse = torch.empty((b * h, nq), dtype=torch.float32, device=q.device)
    m = _mask_bytes(mask)
    common = dict(scale=float(scale), causal=bool(causal), dtype=DTYPE_CODE[q.dtype])
    if way == "rows":
        attention_cpu_heads.forward_rows(q, k, v, m, out, lse, common, SCORE_BYTES)
        return out, lse.view(b, h, nq)
    per_head = max(1, SCORE_BYTES // (nq * nk * q.element_size()))
    if keep_p:  # p is an output (saved for the backward): a buffer of its own
        buf = _p_buffer((b * h, nq, nk), q.dtype, q.device)
        attention_cpu_heads.forward_heads(q, k, v, out, m, lse, per_head, common, lambda g0, g1: buf[g0:g1])
        return out, lse.view(b, h, nq), buf.view(b, h, nq, nk)
    with _scores((min(per_head, b * h), nq, nk), q.dtype, q.device) as buf:
        attention_cpu_heads.forward_heads(q, k, v, out, m, lse, per_head, common, lambda g0, g1: buf[:g1 - g0])
    return out, lse.view(b, h, nq)


# 16-bit dtypes whose "sdpa" forward, where genfast widens their GEMMs (genfast.ops.linear.WIDENED),
# runs torch's fp32 kernel on exact fp32 copies, the output rounded once. fp16 only: on a 2-core
# AVX2-only AMD EPYC torch's fp16 forward ran 1.5-1.8x slower than that (2x16x256x72 19.0 vs 10.3 ms,
# 2x16x1024x72 180 vs 122, 1x8x1024x64 50.5 vs 31.4, conversions included); its bf16 one was as fast
# or faster (10.4 vs 17.0, 104 vs 112, 33.7 vs 34.8).
WIDE_FORWARD = frozenset({torch.float16})


def widened_forward(dtype):
    return dtype in WIDE_FORWARD and dtype in _linear.WIDENED


def _sdpa_backward(dout, q, k, v, out, lse, mask, causal, scale):
    """torch's fused backward. 16-bit dtypes whose CPU GEMMs genfast widens (genfast.ops.linear.WIDENED:
    no 16-bit GEMM instructions here) run the fp32 kernel on exact fp32 copies of dout, q, k, v and
    out (the 16-bit forward's output and fp32 log-sum-exp), the gradients rounded once: torch's bf16
    backward ran 3.9-7.8x slower than that on a 2-core AVX2-only AMD EPYC (bf16 forward + backward,
    8x6x256x64 181 vs 38 ms, 2x16x256x72 91 vs 24, 2x16x1024x72 1879 vs 526, 1x8x1024x64 422 vs 77,
    conversions included). Its bf16 forward stays 16-bit (faster than fp32's there: 10 vs 19 ms); fp16's
    is widened too (WIDE_FORWARD)."""
    dt = q.dtype
    wide = dt in _linear.WIDENED
    cast, am = _sdpa_operands(wide, mask, dt)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        cast(dout), cast(q), cast(k), cast(v), cast(out), lse, 0.0, causal, attn_mask=am, scale=scale)
    return tuple(g.to(dt) for g in grads) if wide else grads


def backward(dout, q, k, v, out, lse, mask, causal, scale, p=None, grads=None):
    """(dq, dk, dv) in q's dtype, in the layout the way writes them: torch's fused kernel [B, N, H,
    D] memory, the others contiguous (a batched GEMM into a strided view runs a naive loop in fp32,
    ~30x slower, torch 2.13). lse as forward() returned it (either way: the flash kernel's
    log-sum-exp and the rows' are the same quantity); p as kept by forward() (normalised
    probabilities whichever way kept them, so either way's backward reads them). grads: None or
    (dq, dk, dv) buffers with unit last strides that the "small" and "onednn" ways write into
    (and return); the other ways return their own."""
    way = variant(q, k.shape[2], buffers=2, causal=causal, masked=mask is not None)
    if way == "small" and q.dtype == torch.bfloat16:
        grads = _grad_buffers(q, k, v, tokens_outer=False) if grads is None else grads
        return attention_cpu_fp32.small_backward(dout, q, k, v, out, lse, _mask_bytes(mask), causal, scale, grads,
                                                 _small_block_bytes(q.dtype), p)
    if p is not None and way != "small":
        return attention_cpu_heads.backward_from_p(dout, q, k, v, p, scale, SCORE_BYTES, _scores)
    if way == "sdpa":
        return _sdpa_backward(dout, q, k, v, out, lse, mask, causal, scale)
    if way in ("onednn", "small"):  # gradients straight into the fused kernel's layout (may_use_fused(fp32))
        grads = _grad_buffers(q, k, v, tokens_outer=True) if grads is None else grads
        if way == "onednn":
            return attention_cpu_fp32.backward(dout, q, k, v, out, lse, _mask_bytes(mask), causal, scale, grads)
        return attention_cpu_fp32.small_backward(dout, q, k, v, out, lse, _mask_bytes(mask), causal, scale, grads,
                                                 _small_block_bytes(), p)
    m = _mask_bytes(mask)
    lse = lse.contiguous()
    common = dict(scale=float(scale), causal=bool(causal), dtype=DTYPE_CODE[q.dtype])
    if way == "rows":
        return attention_cpu_heads.backward_rows(dout, q, k, v, lse, m, common, SCORE_BYTES)
    return attention_cpu_heads.backward_heads(dout, q, k, v, lse, m, common, SCORE_BYTES, _scores)
