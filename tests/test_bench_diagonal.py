"""bench/bench_diagonal.py's CPU path: every part times one block's work and `items` blocks' at
once, a block's ms are 160 layer-steps one at a time against 160 / items batched, and a batch of
blocks attends as each block alone (the premise: each item its own keys)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_diagonal  # noqa: E402

SMALL = dict(dim=32, ffn_dim=48, heads=2, shapes=(24, 40))


def test_a_batch_of_blocks_attends_as_each_block_alone():
    q8, k8, v8, descale = bench_diagonal.fp8_inputs(3, 24, 40, 2, 16, "cpu")
    batched = torch.ops.avatar.fp8_sdpa(q8, k8, v8, descale)
    for i in range(3):
        alone = torch.ops.avatar.fp8_sdpa(q8[i : i + 1], k8[i : i + 1], v8[i : i + 1], descale)
        assert torch.equal(batched[i : i + 1].float(), alone.float())
    # and the items differ: a batch of one item repeated would pass the check above too
    assert not torch.equal(batched[0].float(), batched[1].float())


def test_each_part_times_one_block_and_the_batch_and_the_saving_is_per_block(monkeypatch):
    times = iter([2.0, 6.0] * 20)  # every part: 2 ms for one block, 6 ms for the batch of 4
    runs = []

    def graph_ms(fn, device, calls, reps):
        fn()  # the part's work really runs
        runs.append(calls)
        return next(times)

    monkeypatch.setattr(bench_diagonal, "graph_ms", graph_ms)
    monkeypatch.setattr(bench_diagonal, "compiled", lambda fn: fn)
    res = bench_diagonal.bench(64, 64, "cpu", items=4, calls=3, reps=1, **SMALL)
    gemms = [name for name in res["parts"] if name.startswith("gemm ")]
    assert len(gemms) == 8 and "self-attention fp8" in res["parts"] and "text cross-attention bf16" in res["parts"]
    assert "self-attention fp8, streams" not in res["parts"]  # CUDA streams: only on a GPU
    assert runs == [3] * 20
    for part in res["parts"].values():
        assert part["ms_a_block_one"] == 2.0 * 160 and part["ms_a_block_batched"] == 6.0 * 40
        assert part["saves_ms_a_block"] == 2.0 * 160 - 6.0 * 40
    assert res["saves_ms_a_block"] == 10 * (2.0 * 160 - 6.0 * 40)
    assert res["tokens"] == 3 * 4 * 4 and (res["queries"], res["keys"]) == (24, 40)


def test_the_command_line_reaches_the_bench_and_writes_the_results(monkeypatch, tmp_path):
    seen = {}

    def bench(width, height, device, items, calls, reps, out=None):
        seen.update(size=(width, height), items=items, calls=calls, out=out)
        return {"parts": {}}

    monkeypatch.setattr(bench_diagonal, "bench", bench)
    out = tmp_path / "diagonal.json"
    assert bench_diagonal.main(["--device", "cpu", "--size", "384*256", "--items", "2", "--out", str(out)]) == 0
    assert seen == {"size": (384, 256), "items": 2, "calls": 10, "out": str(out)}
    assert "parts" in json.loads(out.read_text())
