"""genfast.ops._common.reused_buffer / pooled_buffer: a cached buffer comes back only once nothing but
the cache holds its memory (so a saved activation or a live output is never overwritten)."""
import torch

from genfast.ops._common import REUSE_MIN_BYTES, pooled_buffer, reused_buffer

R = REUSE_MIN_BYTES // 4 // 64  # rows of 64 fp32s: [R, 64] is the smallest buffer that is reused


def test_reused_buffer_comes_back_only_when_free():
    cache = {}
    a = reused_buffer(cache, "k", (2 * R, 64), torch.float32, "cpu")
    b = reused_buffer(cache, "k", (2 * R, 64), torch.float32, "cpu")  # a is held: a new buffer, now the cached one
    assert a.data_ptr() != b.data_ptr() and a.shape == b.shape == (2 * R, 64)
    ptr = b.data_ptr()
    del a
    c = reused_buffer(cache, "k", (2 * R, 64), torch.float32, "cpu")  # b still held: not b's memory
    assert c.data_ptr() != ptr
    ptr = c.data_ptr()
    view = c[1:]  # a view of it holds the memory too
    del b, c
    assert reused_buffer(cache, "k", (2 * R, 64), torch.float32, "cpu").data_ptr() != ptr
    ptr = cache["k"].buf.data_ptr()
    del view
    d = reused_buffer(cache, "k", (R * 96,), torch.float32, "cpu")  # smaller: a view of the free buffer
    assert d.data_ptr() == ptr and d.shape == (R * 96,) and d.is_contiguous()
    del d
    e = reused_buffer(cache, "k", (R * 129,), torch.float32, "cpu")  # larger: a new one
    assert e.data_ptr() != ptr and e.shape == (R * 129,)


def test_reused_buffer_saved_by_autograd_is_busy():
    cache = {}
    w = torch.randn(R * 64, requires_grad=True)
    buf = reused_buffer(cache, "k", (R * 64,), torch.float32, "cpu").copy_(torch.arange(R * 64.0))
    loss = (buf * w).sum()  # autograd saves buf for w's gradient
    ptr = buf.data_ptr()
    del buf
    other = reused_buffer(cache, "k", (R * 64,), torch.float32, "cpu").fill_(-1)
    assert other.data_ptr() != ptr
    loss.backward()
    assert torch.equal(w.grad, torch.arange(R * 64.0))


def test_reused_buffer_under_inference_mode_stays_a_normal_tensor():
    cache = {}
    with torch.inference_mode():
        a = reused_buffer(cache, "k", (R * 64,), torch.float32, "cpu")
        ptr = a.data_ptr()
        del a
        b = reused_buffer(cache, "k", (R * 64,), torch.float32, "cpu")
        assert b.data_ptr() == ptr
        del b
    c = reused_buffer(cache, "k", (R * 64,), torch.float32, "cpu")
    assert not c.is_inference() and c.data_ptr() == ptr
    c.add_(1)  # usable outside inference mode


def test_reused_buffer_not_kept():
    cache = {}
    a = reused_buffer(cache, "k", (R * 64,), torch.float32, "cpu", keep=False)
    assert "k" not in cache and a.shape == (R * 64,)


def test_pooled_buffer_keeps_up_to_limit():
    pool = {}
    held = [pooled_buffer(pool, "p", (R * 64,), torch.float32, "cpu", limit=2) for _ in range(3)]
    assert len({t.data_ptr() for t in held}) == 3 and len(pool["p"]) == 2
    kept = [k.buf.data_ptr() for k in pool["p"]]
    del held[0]
    again = pooled_buffer(pool, "p", (R * 64,), torch.float32, "cpu", limit=2)
    assert again.data_ptr() == kept[0]
    assert pooled_buffer(pool, "p", (R * 64,), torch.float32, "cpu", limit=2).data_ptr() not in kept  # both busy


def test_small_buffers_are_fresh_and_not_cached():
    cache, pool = {}, {}
    a = reused_buffer(cache, "k", (R - 1, 64), torch.float32, "cpu")
    b = pooled_buffer(pool, "k", (R - 1, 64), torch.float32, "cpu", limit=4)
    assert a.shape == b.shape == (R - 1, 64) and not cache and not pool.get("k")
