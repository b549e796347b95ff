"""genfast.nn.VectorQuantizer: forward layouts, the EMA step against plain PyTorch, dead codes,
usage statistics and the explicit DDP synchronisation."""
import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

import genfast
from genfast import reference
from genfast.nn import VectorQuantizer


def _batch(n=64, d=8, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_forward_matches_functional(ema, metric):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 32, beta=0.3, metric=metric, ema=ema).eval()
    z = torch.randn(2, 5, 8, requires_grad=True)
    zq, idx, loss = vq(z)
    assert zq.shape == z.shape and idx.shape == (2, 5) and loss.dim() == 0
    cb = vq.codebook.detach()
    z_in = F.normalize(z.detach(), dim=-1, eps=1e-12) if metric == "cosine" else z.detach()
    cb_in = F.normalize(cb, dim=-1, eps=1e-12) if metric == "cosine" else cb
    torch.testing.assert_close(idx, reference.vq_nearest(z_in, cb_in), rtol=0, atol=0)
    torch.testing.assert_close(zq.detach(), cb_in[idx])
    torch.testing.assert_close(vq.decode(idx), cb_in[idx])
    want = ((z_in - cb_in[idx]) ** 2).mean() * (0.3 if ema else 1.3)
    torch.testing.assert_close(loss.detach(), want)
    zq.sum().backward()  # straight-through: gradient reaches z
    assert z.grad is not None and z.grad.abs().sum() > 0


@pytest.mark.parametrize("precision", ["bf16-screen", "tf32x3"])
@pytest.mark.parametrize("ema", [False, True])
def test_precision_reaches_the_search(precision, ema, monkeypatch):
    """VectorQuantizer(precision=...) and vector_quantize(precision=...) hand the mode to the search
    (seen by the op's precision argument); on the CPU both modes return the fp32 indices, so the
    outputs equal the default quantizer's. A bad mode is a ValueError naming the argument."""
    seen = []
    real = torch.ops.genfast.vq_nearest

    class Spy:
        def __call__(self, *args):
            seen.append(args[4] if len(args) > 4 else 0)
            return real(*args)

    from genfast.ops import vq as vq_ops
    monkeypatch.setattr(torch.ops.genfast, "vq_nearest", Spy(), raising=False)
    torch.manual_seed(0)
    fast = VectorQuantizer(8, 32, ema=ema, precision=precision).eval()
    plain = VectorQuantizer(8, 32, ema=ema).eval()
    plain.load_state_dict(fast.state_dict())
    z = torch.randn(3, 7, 8)
    for a, b in zip(fast(z), plain(z)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert seen[0] == vq_ops.PRECISIONS[precision] and seen[1] == 0, seen
    assert precision in repr(fast)
    cb = plain.codebook
    for a, b in zip(genfast.vector_quantize(z, cb, precision=precision), genfast.vector_quantize(z, cb)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="precision"):
        VectorQuantizer(8, 32, precision="tf32")
    with pytest.raises(ValueError, match="precision"):
        genfast.vector_quantize(z, plain.codebook, precision="fp16")


def test_image_fmap_layout():
    torch.manual_seed(0)
    vq = VectorQuantizer(6, 20, accept_image_fmap=True).eval()
    x = torch.randn(2, 6, 4, 3)
    zq, idx, _ = vq(x)
    assert zq.shape == x.shape and idx.shape == (2, 4, 3)
    vq.accept_image_fmap = False
    zq2, idx2, _ = vq(x.permute(0, 2, 3, 1).contiguous())
    torch.testing.assert_close(idx, idx2, rtol=0, atol=0)
    torch.testing.assert_close(zq, zq2.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="dim"):
        vq(torch.randn(2, 5, 7))


def test_ema_step_equals_plain_pytorch():
    torch.manual_seed(1)
    vq = VectorQuantizer(8, 16, ema=True, decay=0.9, eps=1e-5).train()
    cs, es = vq.cluster_size.clone(), vq.embed_avg.clone()
    for step in range(3):
        z = _batch(40, 8, seed=step)
        idx = reference.vq_nearest(z, vq.codebook)
        cs, es, cb = reference.ema_codebook_step(cs, es, z, idx, decay=0.9, eps=1e-5)
        _, got_idx, _ = vq(z)
        torch.testing.assert_close(got_idx, idx, rtol=0, atol=0)
        torch.testing.assert_close(vq.cluster_size, cs)
        torch.testing.assert_close(vq.embed_avg, es)
        torch.testing.assert_close(vq.codebook, cb)
        torch.testing.assert_close(vq.last_counts, torch.bincount(idx, minlength=16), rtol=0, atol=0)


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_trains_after_a_dtype_cast(ema, dtype):
    """.to(dtype) casts the statistics buffers too; training updates them (in fp32, fp64 for fp64) and keeps
    their dtype. fp64 follows the fp32 module's steps; bf16 follows them to bf16's resolution."""
    torch.manual_seed(0)
    ref = VectorQuantizer(8, 16, ema=ema, dead_code_threshold=0.5)
    vq = VectorQuantizer(8, 16, ema=ema, dead_code_threshold=0.5)
    vq.load_state_dict(ref.state_dict())
    vq = vq.to(dtype)
    for step in range(3):
        z = _batch(64, seed=step)
        torch.manual_seed(step)  # the same dead-code draws
        zq_ref, idx_ref, loss_ref = ref(z)
        torch.manual_seed(step)
        zq, idx, loss = vq(z.to(dtype))
        assert zq.dtype == dtype and vq.cluster_size.dtype == dtype and vq.codebook.dtype == dtype
        if dtype == torch.float64:  # the same codes, statistics to fp32 rounding
            assert torch.equal(idx, idx_ref)
            torch.testing.assert_close(vq.cluster_size, ref.cluster_size.double(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(vq.codebook, ref.codebook.detach().double(), rtol=1e-5, atol=1e-6)
        if not ema:
            (zq.float().sum() + loss.float()).backward()
    assert torch.isfinite(vq.codebook).all() and torch.isfinite(vq.cluster_size).all()
    if dtype == torch.bfloat16:
        torch.testing.assert_close(vq.cluster_size.float(), ref.cluster_size, rtol=2 ** -7, atol=2 ** -7)


def test_eval_does_not_update():
    vq = VectorQuantizer(8, 16, ema=True).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(_batch())
    for k, v in vq.state_dict().items():
        torch.testing.assert_close(v, before[k])


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_are_reseeded_with_their_state(ema):
    torch.manual_seed(2)
    vq = VectorQuantizer(8, 64, ema=ema, decay=0.5, dead_code_threshold=0.6).train()
    z = _batch(10, 8) + 100.0  # far from every code: only a few codes get used
    vq(z)
    # after one step every code unused in the batch has cluster size 0.5 < 0.6: re-seeded
    reseeded = vq._reseeded.clone()
    assert reseeded.sum() >= 64 - 10
    torch.testing.assert_close(vq.cluster_size[reseeded], torch.full((int(reseeded.sum()),), 0.6))
    cb = vq.codebook.detach()
    for k in reseeded.nonzero().flatten().tolist():  # each seed is a vector of the batch
        assert ((z - cb[k]).abs().amax(1) < 1e-2).any()  # ema: up to the Laplace smoothing
    if ema:
        torch.testing.assert_close(vq.embed_avg[reseeded], cb[reseeded] * 0.6, rtol=1e-4, atol=1e-3)
    assert vq.usage()["dead_codes"] == 0


def test_usage_statistics():
    vq = VectorQuantizer(4, 8)
    counts = torch.tensor([4, 4, 0, 0, 0, 0, 0, 0])
    u = vq.usage(counts)
    assert math.isclose(u["perplexity"], 2.0, rel_tol=1e-9) and u["used_fraction"] == 0.25
    assert math.isclose(vq.usage(torch.ones(8, dtype=torch.long))["perplexity"], 8.0, rel_tol=1e-9)


def test_learnable_codebook_trains():
    torch.manual_seed(3)
    vq = VectorQuantizer(4, 16, beta=0.25).train()
    opt = torch.optim.SGD(vq.parameters(), lr=20.0)  # codebook grads are 2 (c - z) / numel: small
    z = _batch(128, 4, seed=4)
    first = None
    for _ in range(30):
        _, _, loss = vq(z)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.75 * first, (first, loss.item())  # 16 codes in 4-D: ~0.64 is k-means level


def test_bad_arguments():
    with pytest.raises(ValueError, match="metric"):
        VectorQuantizer(4, 8, metric="dot")
    with pytest.raises(ValueError, match="codebook_size"):
        VectorQuantizer(4, 0)
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(4, 8, decay=1.0)


# The ranks run as separate scripts: under pytest's importlib mode the test module itself is not
# importable by name in a child process (mp.spawn would need to pickle a function from it).
_DDP_WORKER = """
import sys, torch, torch.distributed as dist
from genfast.nn import VectorQuantizer
rank, world, path, ema, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1", sys.argv[5]
dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
torch.manual_seed(0)  # same initial codebook on every rank
vq = VectorQuantizer(4, 32, ema=ema, decay=0.8, dead_code_threshold=0.5).train()
torch.manual_seed(100 + rank)  # different data (and re-seed draws) per rank
for _ in range(3):
    vq(torch.randn(16, 4) * (1 + rank))
    vq.sync_statistics_()
torch.save({k: v for k, v in vq.state_dict().items()}, f"{out}.{rank}")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("ema", [True, False])
def test_sync_statistics_two_ranks(ema):
    """Two gloo ranks with different data end with identical statistics and codebooks."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        out, script = os.path.join(tmp, "state"), os.path.join(tmp, "worker.py")
        with open(script, "w") as f:
            f.write(_DDP_WORKER)
        args = [str(2), os.path.join(tmp, "init"), "1" if ema else "0", out]
        procs = [subprocess.Popen([sys.executable, script, str(r)] + args, cwd=tmp) for r in range(2)]
        assert all(p.wait(timeout=120) == 0 for p in procs)
        a, b = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    for k in ("cluster_size", "codebook") + (("embed_avg",) if ema else ()):
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_sync_without_distributed_is_a_no_op():
    vq = VectorQuantizer(4, 8, ema=True, dead_code_threshold=0.5).train()
    vq(_batch(8, 4))
    before = vq.codebook.clone()
    vq.sync_statistics_()
    torch.testing.assert_close(vq.codebook, before)
    assert not vq._reseeded.any()
