"""genfast/devtools/cuda_usage.py: the build's nvcc report is used only for the sources it was made of."""
import json

from genfast.devtools import cuda_usage

LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1kv' for 'sm_80'
ptxas info    : Function properties for _Z1kv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 464 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z1kv
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 464 bytes cmem[0]
"""


def _csrc(tmp_path):
    (tmp_path / "cuda").mkdir(parents=True)
    (tmp_path / "cuda" / "k.cu").write_text("__global__ void k() {}\n")
    (tmp_path / "k.h").write_text("// header\n")
    (tmp_path / "notes.txt").write_text("not a source\n")
    return tmp_path


def test_split_by_arch_keeps_each_arch_entries():
    got = cuda_usage.split_by_arch(LOG)
    assert sorted(got) == [80, 90]
    assert "32 registers" in got[80] and "40 registers" not in got[80]
    assert "40 registers" in got[90] and "4 bytes spill stores" in got[90] and "0 bytes gmem" not in got[90]


def test_load_takes_a_report_of_the_same_sources_and_nvcc(tmp_path):
    csrc = _csrc(tmp_path / "csrc")
    path = tmp_path / cuda_usage.FILE_NAME
    cuda_usage.write(path, csrc, ["90", "80"], "nvcc 13.0", {"k.cu": LOG})
    report, why = cuda_usage.load(path, csrc, "nvcc 13.0")
    assert why is None and report["archs"] == [80, 90]
    assert "40 registers" in report["logs"]["k.cu"][90]


def test_load_refuses_other_sources_another_nvcc_or_no_report(tmp_path):
    csrc = _csrc(tmp_path / "csrc")
    path = tmp_path / cuda_usage.FILE_NAME
    cuda_usage.write(path, csrc, ["80"], "nvcc 13.0", {"k.cu": LOG})
    (csrc / "notes.txt").write_text("changed, but not a source\n")
    assert cuda_usage.load(path, csrc, "nvcc 13.0")[1] is None
    assert "another nvcc" in cuda_usage.load(path, csrc, "nvcc 12.8")[1]
    (csrc / "k.h").write_text("// a header the .cu may include changed\n")
    report, why = cuda_usage.load(path, csrc, "nvcc 13.0")
    assert report is None and "digest differs" in why
    assert "no build report" in cuda_usage.load(tmp_path / "missing.json", csrc, "nvcc 13.0")[1]
    path.write_text(json.dumps({"logs": {}}))
    assert "unreadable" in cuda_usage.load(path, csrc, "nvcc 13.0")[1]
