"""The CPU attention backend's routing (genfast/ops/attention_cpu.py variant() and its measured
tables): which way each shape, dtype and CPU takes. The ways' answers are tested in
test_attention_cpu.py."""
import torch

from genfast.ops import attention_cpu


def test_fp32_routing_by_shape(monkeypatch):
    """Default choice for fp32 (measured, see attention_cpu.py): very short key sequences take torch's
    fused kernel (call overhead), everything else the "small" way where the CPU has AVX-512; without
    it torch's fused kernel ("onednn" from ONEDNN_FROM_KEYS on, within the score budget, where set)."""
    from genfast.ops import attention_cpu_fp32

    def way(nq, nk, causal=False, buffers=1):
        return attention_cpu.variant(torch.empty(2, 16, nq, 72, device="meta"), nk, buffers, causal)

    fits, long, *_, small32_from = attention_cpu.tables_for_cpu("AuthenticAMD", False)  # the tables below: an AMD CPU's
    monkeypatch.setattr(attention_cpu, "FITS", fits)
    monkeypatch.setattr(attention_cpu, "LONG", long)
    monkeypatch.setattr(attention_cpu, "SMALL32_FROM", small32_from)
    assert way(256, 32) == way(17, 17) == "sdpa"
    assert way(1024, 1024, buffers=2) == way(1024, 1024, causal=True) == (
        "small" if attention_cpu_fp32.small_available() else "sdpa")
    monkeypatch.setattr(attention_cpu_fp32, "_SMALL", True)
    assert way(256, 256) == way(1024, 77) == way(4096, 4096) == "small"
    monkeypatch.setattr(attention_cpu_fp32, "_SMALL", False)  # a CPU without AVX-512: torch's kernel
    assert way(256, 256) == way(1024, 1024, buffers=2) == way(4096, 4096) == "sdpa"
    monkeypatch.setattr(attention_cpu, "ONEDNN_FROM_KEYS", 384)  # "onednn" switched on
    assert way(256, 256) == "sdpa" and way(1024, 1024, buffers=2) == "onednn"
    assert way(4096, 4096) == "sdpa"  # "onednn" is held to SCORE_BYTES


def test_routing_by_cpu(monkeypatch):
    """On Intel CPUs fp32 takes "small" only with enough (batch, head) pairs per thread and scores,
    and its backward only where the forward keeps p (MKL's AVX-512 sgemm makes torch's fused kernel
    the faster elsewhere; on AMD MKL takes AVX2 and "small" wins everywhere); with AMX, bf16 takes
    "small" at any head count, and only small forwards that keep no p take torch's kernel (such a
    forward feeds the "small" backward its log-sum-exp)."""
    from genfast.ops import attention_cpu_fp32

    monkeypatch.setattr(attention_cpu_fp32, "_SMALL", True)
    monkeypatch.setattr(attention_cpu, "_threads", lambda: 2)
    monkeypatch.setattr(attention_cpu, "FUSED_BELOW_KEYS", {})

    def way(b, h, n, nk=None, buffers=1):
        return attention_cpu.variant(torch.empty(b, h, n, 72, device="meta"), nk or n, buffers)

    for vendor, amx in (("GenuineIntel", True), ("GenuineIntel", False), ("AuthenticAMD", False)):
        fits, long, fused_without_p, small16_from_heads, small32_from = attention_cpu.tables_for_cpu(vendor, amx)
        intel = vendor == "GenuineIntel"
        assert fits[torch.float32] == long[torch.float32] == "small"
        assert fits[torch.bfloat16] == long[torch.bfloat16] == "small"
        assert set(fused_without_p) == ({torch.bfloat16} if amx else set())
        assert small16_from_heads == (0 if amx else 2)
        assert small32_from == ((2, 1 << 18) if intel else None)
        for name, table in (("FITS", fits), ("LONG", long), ("SMALL32_FROM", small32_from)):
            monkeypatch.setattr(attention_cpu, name, table)
        # enough pairs and scores, p within KEEP_P_BYTES (64 MiB): "small" both ways
        assert way(2, 16, 256) == way(2, 16, 256, buffers=2) == way(1, 8, 1024, buffers=2) == "small"
        assert way(2, 16, 256, 77, buffers=2) == way(1, 4, 256) == "small"
        # p over the budget (2x16x1024^2 fp32: 128 MiB): forward "small", backward torch's on its lse
        assert way(2, 16, 1024) == "small"
        assert way(2, 16, 1024, buffers=2) == ("sdpa" if intel else "small")
        # one head for two threads, or few scores: torch's kernel on Intel
        assert way(1, 1, 512) == way(2, 16, 17) == way(2, 4, 128) == ("sdpa" if intel else "small")


def test_fused_without_p_by_size(monkeypatch):
    """FUSED_WITHOUT_P (AMX tables): a bf16 "small" forward without p takes torch's fused kernel only
    when the case is small (few (batch, head) pairs per thread, or few scores); the others and every
    other dtype and way keep their own."""
    _, _, limits, *_ = attention_cpu.tables_for_cpu("GenuineIntel", True)
    monkeypatch.setattr(attention_cpu, "FUSED_WITHOUT_P", limits)
    monkeypatch.setattr(attention_cpu, "_threads", lambda: 2)

    def fused(b, h, nq, nk, dtype=torch.bfloat16, way="small"):
        return attention_cpu.fused_without_p(torch.empty(b, h, nq, 72, dtype=dtype, device="meta"), way, nk)

    assert fused(1, 2, 64, 64) and fused(1, 1, 512, 512) and fused(1, 3, 256, 256)  # few pairs a thread
    assert not fused(1, 2, 1024, 1024) and not fused(2, 2, 512, 512)  # ... with enough scores
    assert fused(2, 16, 17, 17) and fused(2, 4, 128, 128)  # few scores
    assert not fused(2, 16, 256, 256) and not fused(2, 16, 256, 77) and not fused(8, 6, 256, 256)
    assert not fused(1, 2, 64, 64, dtype=torch.float32) and not fused(1, 2, 64, 64, way="heads")
    monkeypatch.setattr(attention_cpu, "FUSED_WITHOUT_P", {})  # the AMD tables: never
    assert not fused(1, 2, 64, 64)


def test_tiny_bf16_takes_torchs_kernel(monkeypatch):
    """TINY16 (AMX CPUs): unmasked bf16 cases with fewer than 2 (batch, head) pairs a thread and under
    4096 scores take torch's fused kernel both ways; masked ones, more pairs or more scores keep
    "small"; None (the other CPUs' tables) never; fp32 is not affected."""
    from genfast.ops import attention_cpu_fp32

    monkeypatch.setattr(attention_cpu_fp32, "_SMALL", True)
    monkeypatch.setattr(attention_cpu, "_threads", lambda: 2)
    monkeypatch.setattr(attention_cpu, "FITS", {**attention_cpu.FITS, torch.bfloat16: "small"})
    monkeypatch.setattr(attention_cpu, "SMALL16_FROM_HEADS", 0)
    monkeypatch.setattr(attention_cpu, "TINY16", (2, 4096))

    def way(b, h, n, buffers=1, d=32, dtype=torch.bfloat16, masked=False):
        return attention_cpu.variant(torch.empty(b, h, n, d, dtype=dtype, device="meta"), n, buffers, masked=masked)

    assert way(1, 1, 16) == way(1, 2, 16, buffers=2) == way(1, 2, 32, d=64, buffers=2) == "sdpa"
    assert way(1, 1, 16, masked=True) == way(1, 2, 16, buffers=2, masked=True) == "small"
    assert way(1, 4, 16) == way(2, 2, 16, d=64) == way(1, 1, 64) == way(1, 2, 64, buffers=2) == "small"
    monkeypatch.setattr(attention_cpu, "SMALL32_FROM", None)
    monkeypatch.setattr(attention_cpu, "FUSED_BELOW_KEYS", {})
    assert way(1, 1, 16, dtype=torch.float32) == "small"
    monkeypatch.setattr(attention_cpu, "TINY16", None)
    assert way(1, 1, 16) == "small"


def test_small_block_rows():
    """Query rows per block of the "small" way: within the budget, at least one, at most Nq; from 32
    rows on a multiple of 32 (AMX tiles take 16 / 32 rows) unless the block is the whole head."""
    from genfast.ops.attention_cpu_fp32 import block_rows

    assert block_rows(300, 300, 70 * 18 * 300, 18) == 64
    assert block_rows(300, 300, 31 * 18 * 300, 18) == 31
    assert block_rows(50, 300, 70 * 18 * 300, 18) == 50  # the whole head: no rounding
    assert block_rows(300, 300, 1, 18) == 1 and block_rows(7, 0, 1 << 20, 8) == 7


def test_bf16_routing(monkeypatch):
    """bf16 takes the "small" way on AVX-512 BF16 CPUs at every length, except an odd head dim (its
    dot products read element pairs): there, and on other CPUs, torch's bf16 GEMMs around genfast's
    rows ("heads", or "rows" where one head's scores do not fit SCORE_BYTES) where those GEMMs are fast
    (BF16_GEMMS), else torch's fused kernel."""
    from genfast.ops import attention_cpu_fp32

    def way(nq, nk, d=72, buffers=1):
        return attention_cpu.variant(torch.empty(2, 16, nq, d, dtype=torch.bfloat16, device="meta"), nk, buffers)

    monkeypatch.setattr(attention_cpu_fp32, "_SMALL", True)
    monkeypatch.setattr(attention_cpu, "BF16_GEMMS", True)
    assert way(256, 256) == way(17, 77, d=32) == way(4096, 4096, buffers=2) == "small"
    assert way(256, 256, d=33) == "heads" and way(4096, 4096, d=33) == "rows"
    # fewer (batch, head) pairs than SMALL16_FROM_HEADS per thread: "heads" (measured faster there)
    few = torch.empty(1, 1, 512, 72, dtype=torch.bfloat16, device="meta")
    want = "heads" if attention_cpu.SMALL16_FROM_HEADS * torch.get_num_threads() > 1 else "small"
    assert attention_cpu.variant(few, 512) == want
    monkeypatch.setattr(attention_cpu_fp32, "_SMALL", False)
    assert way(256, 256) == "heads" and way(4096, 4096) == "rows"
    # without fast bf16 GEMMs (no AVX-512 BF16 / AMX): torch's fused kernel
    monkeypatch.setattr(attention_cpu, "BF16_GEMMS", False)
    assert way(256, 256) == way(4096, 4096, buffers=2) == way(256, 256, d=33) == "sdpa"
