"""Run genfast's CUDA kernels once on small, odd shapes, for compute-sanitizer (memcheck, racecheck):
  compute-sanitizer --tool racecheck python3 benchmarks/gpu/sanitize.py
Covers the attention forward/backward (cp.async pipelines, shared-memory tiles) over every head-dim
instantiation, both dtypes, causal and key masks, and the elementwise/norm kernels. Prints one line per
case; the sanitizer's own summary says whether any hazard or bad access was seen."""
import sys

import torch

import genfast
from genfast.ops import attention_cuda
from genfast.testing import with_backend


def attention_cases(quick):
    dims = (64, 72) if quick else (32, 64, 72, 80, 96, 128)
    for d in dims:
        for dtype in (torch.bfloat16, torch.float16):
            for nq, nk, causal, masked in ((17, 17, False, False), (65, 130, False, True), (33, 33, True, False)):
                yield d, dtype, nq, nk, causal, masked
                if quick:
                    break


def main():
    quick = "--quick" in sys.argv
    g = torch.Generator(device="cuda").manual_seed(0)
    for d, dtype, nq, nk, causal, masked in attention_cases(quick):
        q = torch.randn(2, 2, nq, d, device="cuda", dtype=dtype, generator=g)
        k, v = (torch.randn(2, 2, nk, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
        mask = (torch.rand(2, nk, device="cuda", generator=g) > 0.3) if masked else None
        out, lse = attention_cuda.forward("cuda", q, k, v, mask, causal, d ** -0.5)
        attention_cuda.backward("cuda", torch.randn_like(out), q, k, v, out, lse, mask, causal, d ** -0.5)
        torch.cuda.synchronize()
        print(f"attention d={d} {dtype} nq={nq} nk={nk} causal={causal} mask={masked}: ok", flush=True)
    # modulate + gated residual: the warp-per-row and 16-byte pack kernels (C = 200 fp32, 1152 bf16: DiT-XL),
    # per-sample and per-token modulation, and a view one column off (the element fallbacks)
    cases = [(torch.float32, 200, False, False), (torch.bfloat16, 1152, False, False), (torch.bfloat16, 1152, True, False),
             (torch.bfloat16, 1152, False, True), (torch.float16, 2100, False, False)]
    for backend in ("cuda", "triton") if not quick else ("cuda",):
        for dtype, c, per_token, offset in cases[:2] if quick else cases:
            base = torch.randn(3, 37, c + offset, device="cuda", dtype=dtype, generator=g)
            x = base[..., offset:].detach().requires_grad_()
            mod = (3, 37, c) if per_token else (3, c)
            shift, scale, gate = (torch.randn(mod, device="cuda", dtype=dtype, generator=g).requires_grad_()
                                  for _ in range(3))
            y = with_backend(backend, lambda: genfast.gated_residual(x, gate, genfast.adaln_modulate(x, shift, scale)))()
            with_backend(backend, lambda: y.float().sum().backward())()
            torch.cuda.synchronize()
            print(f"modulate + gated residual via {backend}, {dtype}, C={c}, per_token={per_token}, "
                  f"offset={offset}: ok", flush=True)


if __name__ == "__main__":
    main()
