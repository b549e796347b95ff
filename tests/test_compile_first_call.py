"""torch.compile(fullgraph=True) of code whose genfast call is the first one of the process: nothing
genfast caches lazily may be filled inside dynamo's trace. Before the fix, genfast.backends.getenv
filled its key cache there and dynamo failed its own guard ("Guard failed on the same frame it was
created") for genfast.attention and genfast.nn.DiTBlock. Each case runs in a fresh interpreter."""
import subprocess
import sys
import textwrap

import pytest

CASES = {  # (setup, the call): nothing of genfast runs before the compiled call
    "attention": ("", "out = genfast.attention(x4, x4, x4)"),
    "attention_mask": ("", "out = genfast.attention(x4, x4, x4, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))"),
    "dit_block": ("block = genfast.nn.DiTBlock(8, 2)", "out = block(x, x[:, 0])"),
    # oneDNN linears (the default on non-Intel CPUs): their availability check ran lazily in the trace
    "dit_block_onednn": ("block = genfast.nn.DiTBlock(8, 2); genfast.ops.linear.USE_ONEDNN = True",
                         "out = block(x, x[:, 0])"),
    "modulate_gated": ("", "out = genfast.gated_residual(x, x[:, 1], genfast.adaln_modulate(x, x[:, 0], x[:, 2]))"),
    "flow_step": ("", "out = genfast.flow_euler_step(x, x * 2, x * 3, dt=0.1, guidance=2.0)"),
    "reparam_kl": ("", "out = sum(t.sum() for t in genfast.reparam_kl(x, x * 0.1, noise=x.detach() * 0.5))"),
    "vq": ("cb = torch.randn(7, 8, requires_grad=True)", "out = genfast.vector_quantize(x, cb)[0]"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compile_as_the_first_genfast_call(case, tmp_path):
    code = textwrap.dedent(f"""
        import torch, genfast, genfast.nn, genfast.ops.linear
        torch.manual_seed(0)
        x = torch.randn(2, 5, 8, requires_grad=True)
        x4 = torch.randn(2, 2, 5, 4, requires_grad=True)
        {CASES[case][0]}

        def run():
            {CASES[case][1]}
            return out.square().sum()

        compiled = torch.compile(run, fullgraph=True)()
        compiled.backward()
        torch.testing.assert_close(compiled, run(), rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    # run outside the checkout: the installed package, as the other tests use
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
