"""bench/gpu_clocks.py: nvidia-smi's samples -> the busy samples' clock, power and power-cap share;
bench/bench_attention_data.py's cases on the CPU."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_attention_data  # noqa: E402
import gpu_clocks  # noqa: E402

# clock MHz, power W, limit W, throttle reasons: two idle samples (a compile), three busy ones, two
# of them under the software power cap (0x4; 0x1 is "GPU idle")
CSV = """\
345, 72.24, 700.00, 0x0000000000000001
1980, 121.50, 700.00, 0x0000000000000000
1980, 630.40, 700.00, 0x0000000000000000
1770, 652.80, 700.00, 0x0000000000000004
1680, 693.66, 700.00, 0x0000000000000004
[N/A], [N/A], 700.00, 0x0
1700, 69
"""


def test_the_busy_samples_clock_power_and_cap_share():
    samples = gpu_clocks.parse(CSV.splitlines())
    assert len(samples) == 5  # the '[N/A]' line and the cut last line are not samples
    assert gpu_clocks.summarize(samples) == {
        "samples": 5,
        "busy_samples": 3,
        "clock_mhz_median": 1770.0,
        "clock_mhz_min": 1680.0,
        "power_w_median": 652.8,
        "power_limit_w": 700.0,
        "power_capped_share": 2 / 3,
    }
    assert gpu_clocks.summarize(samples[:2]) == {"samples": 2, "busy_samples": 0}


def test_the_command_line_summarises_a_file_and_says_what_it_queries(tmp_path, capsys):
    path = tmp_path / "smi.csv"
    path.write_text(CSV)
    assert gpu_clocks.main([str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["clock_mhz_median"] == 1770.0
    assert gpu_clocks.main(["--query"]) == 0
    assert capsys.readouterr().out.split() == gpu_clocks.nvidia_smi_args()
    assert gpu_clocks.main([str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_the_sampler_is_off_the_gpu_a_no_op():
    with gpu_clocks.GpuSampler("cpu") as sampler:
        pass
    assert sampler.summary() == {}


def test_the_attention_cases_differ_only_in_the_queries_and_their_softmax():
    """uniform: every probability alike; peaked: the queries x4 of model-like's, the same codes'
    keys and values; all three through the kernel's arithmetic (the CPU reference)."""
    shapes = dict(lq=16, lk=64, heads=2, head_dim=16, device="cpu")
    cases = {c: bench_attention_data.inputs(c, **shapes) for c in bench_attention_data.CASES}
    for _, k8, v8, _ in cases.values():
        assert torch.equal(k8.float(), cases["uniform"][1].float()) and torch.equal(
            v8.float(), cases["uniform"][2].float()
        )
    like, peaked = cases["model-like"], cases["peaked"]
    assert torch.allclose(peaked[3], 4 * like[3])  # the same codes, four times the scale

    def row_entropy(q8, k8, descale):
        s = torch.einsum("bmhd,bnhd->bhmn", q8.float() * descale.reshape(()), k8.float()) / 4
        p = s.softmax(-1)
        return -(p * p.log()).sum(-1).mean().item()

    entropies = [row_entropy(q8, k8, d) for q8, k8, _, d in cases.values()]
    assert entropies[0] > entropies[1] > entropies[2]  # uniform, model-like, peaked
    assert abs(entropies[0] - torch.log(torch.tensor(64.0)).item()) < 0.01


def test_the_bench_times_each_case_and_counts_its_output_codes(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_attention_data, "graph_ms", lambda fn, device, calls, reps: (fn(), 2.0)[1])
    out = tmp_path / "data.json"
    res = bench_attention_data.bench(
        64, 64, "cpu", calls=1, reps=1, heads=2, head_dim=16, shapes=(16, 64), out=str(out)
    )
    assert list(res["cases"]) == ["uniform", "model-like", "peaked"]
    for row in res["cases"].values():
        assert row["ms"] == 2.0 and row["tflops"] == 4 * 16 * 64 * 2 * 16 / 2.0 / 1e9
        assert row["distinct_output_codes"] > 1
    assert json.loads(out.read_text()) == res
