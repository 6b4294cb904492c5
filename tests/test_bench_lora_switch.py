"""The LoRA switch benchmark's code paths on CPU with the tiny model (a change that breaks the
GPU bench shows up here)."""

import json
import sys

sys.path.insert(0, "bench")
import bench_lora_switch  # noqa: E402


def test_bench_measures_switches_and_blocks_and_writes_json(tmp_path, monkeypatch):
    out = tmp_path / "lora.json"
    argv = ["bench_lora_switch.py", "--tiny", "--device", "cpu", "--sizes", "384*256", "--blocks", "2"]
    argv += ["--warm", "1", "--switches", "3", "--dir", str(tmp_path / "loras"), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_lora_switch.main()
    res = json.loads(out.read_text())
    switch = res["switch"]
    # 3 LoRAs, 2 held: after the first two loads every switch drops one (4 loads, the first not counted)
    assert len(switch["load_s_all"]) == 3 and switch["evictions"] == 2
    assert 0 < switch["hit_s_median"] < switch["load_s_median"]
    assert res["remerge_s"] > 0 and res["register_s_per_lora"] > 0
    (row,) = res["blocks"]
    assert row["size"] == "96*64" and min(row["lora_ms"], row["hooks_no_lora_ms"], row["plain_ms"]) > 0
    assert len(list((tmp_path / "loras").glob("*.safetensors"))) == 3
