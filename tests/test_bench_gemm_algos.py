"""bench/bench_gemm_algos.py off the GPU: its ctypes records have cublasLt.h's sizes (a wrong one
would hand cuBLASLt shifted algorithms), and its command line refuses what it cannot run."""

import ctypes
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_gemm_algos  # noqa: E402


def test_the_records_match_cublaslt_h():
    assert ctypes.sizeof(bench_gemm_algos.Algo) == 64  # uint64_t data[8]
    # algo, size_t workspaceSize, cublasStatus_t state, float wavesCount, int reserved[4]
    assert ctypes.sizeof(bench_gemm_algos.HeuristicResult) == 64 + 8 + 4 + 4 + 16


def test_the_shapes_are_the_blocks_projections():
    assert bench_gemm_algos.shapes(5120, 13824) == {
        "q, k, v, o (self); q, o (cross)": (5120, 5120),
        "ffn up": (5120, 13824),
        "ffn down": (13824, 5120),
    }


def test_a_bad_size_is_refused_in_one_line(capsys):
    assert bench_gemm_algos.main(["--size", "704x384"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bench_gemm_algos: --size must be W*H, got '704x384'"]


def test_without_a_gpu_it_says_so(capsys, monkeypatch):
    monkeypatch.setattr(bench_gemm_algos.torch.cuda, "is_available", lambda: False)
    assert bench_gemm_algos.main([]) == 2
    assert capsys.readouterr().err.strip() == "bench_gemm_algos: needs a CUDA GPU"


def test_unknown_scales_are_refused_in_one_line(capsys):
    assert bench_gemm_algos.main(["--scales", "row,col"]) == 2
    assert capsys.readouterr().err.strip() == "bench_gemm_algos: --scales takes row and/or tensor, got 'row,col'"
