"""bench/bench_decoders.py's code paths on CPU with tiny decoders: random weights say the error was
not measured; weight files (the tiny VAE and a light decoder in taew2_1's layout) measure it."""

import json
import sys

import torch
from ckpt_fixtures.encoders import write_vae

from avatar.services.decoder.light_decoder import TINY_LIGHT, LightDecoder

sys.path.insert(0, "bench")
import bench_decoders  # noqa: E402

ARGS = ["bench_decoders.py", "--tiny", "--device", "cpu", "--sizes", "32*32", "--blocks", "2", "--warm", "1"]


def _run(tmp_path, monkeypatch, *extra) -> dict:
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", [*ARGS, "--no-compile", "--out", str(out), *extra])
    assert bench_decoders.main() == 0
    return json.loads(out.read_text())


def test_random_weights_time_both_decoders_and_leave_the_error_unmeasured(tmp_path, monkeypatch):
    res = _run(tmp_path, monkeypatch)
    row = res["sizes"]["32*32"]
    assert row["full eager"]["ms_per_block"] > 0 and row["light eager"]["ms_per_block"] > 0
    assert row["error"] == "not measured (random weights)" and "not measured" in res["error_note"]


def test_weight_files_measure_the_error(tmp_path, monkeypatch):
    vae = write_vae(tmp_path / "ckpt")
    light = tmp_path / "taew2_1_tiny.pth"
    torch.save(LightDecoder.random(TINY_LIGHT, seed=2).model.state_dict(), light)
    res = _run(tmp_path, monkeypatch, "--full-vae", str(vae), "--light", str(light))
    err = res["sizes"]["32*32"]["error"]
    assert res["weights"] == {"full": str(vae), "light": str(light)}
    assert set(err) == {"light_vs_full_psnr_db", "full_vs_source_psnr_db", "light_vs_source_psnr_db"}
    assert all(0 < v < 100 for v in err.values())  # random decoders: finite, far from equal
