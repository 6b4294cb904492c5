"""GPU layouts: --encoder-device / --decoder-device place the encoders and the VAE decode off the
DiT's GPU (checked before anything loads: a device this machine lacks is one line, exit 2), the
memory plan leaves what runs elsewhere out, and --parallel is checked against the world size."""

import subprocess

import pytest
import torch
from conftest import AVATAR, ROOT

from avatar.app import cli
from avatar.app.serve import decoder_model
from avatar.memory_planner import GiB, plan_for_device
from avatar.presets import ModelSpec

SERVE = ["serve", "--listen", "127.0.0.1:0", "--no-warmup"]


def one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def run_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*AVATAR, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bad_devices_and_parallel_layouts_are_one_line_before_loading(env):
    err = one_line(run_cli(*SERVE, "--decoder-device", "cuda:4", env=env))
    assert "--decoder-device cuda:4: this torch is built without CUDA" in err and "use --decoder-device cpu" in err
    err = one_line(run_cli(*SERVE, "--encoder-device", "npu:0", env=env))
    assert "--encoder-device npu:0: not a device here; use cpu, cuda or cuda:N" in err
    err = one_line(run_cli(*SERVE, "--role", "generator", "--parallel", "fsdp=2", env=env))
    assert "--parallel tpp=1,fsdp=2: tpp 1 x fsdp 2 = 2 ranks, but 1 process" in err
    err = one_line(run_cli(*SERVE, "--parallel", "tpp=2", env=env))
    assert "--parallel applies to --role generator" in err


@pytest.fixture
def four_gpus(monkeypatch):
    """What the checks see on a machine with cuda:0..3 (nothing is allocated)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.version, "cuda", "12.8")


@pytest.mark.parametrize("flag", ["--decoder-device", "--encoder-device"])
def test_a_device_index_the_machine_lacks_is_exit_2_in_one_line(four_gpus, flag, capsys):
    assert cli.main([*SERVE, "--device", "cuda:0", flag, "cuda:4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{flag} cuda:4: this machine has 4 CUDA device(s), cuda:0 to cuda:3" in err


def test_flags_place_the_decoder_and_the_encoders(four_gpus):
    args = cli.build_parser().parse_args(
        [
            *SERVE,
            "--device",
            "cuda:0",
            "--decoder-device",
            "cuda:3",
            "--encoder-device",
            "cuda:3",
            "--memory-plan",
            "off",
        ]
    )
    spec = cli.model_for(args)
    assert (spec.device, spec.encoder_device, spec.decoder_device) == ("cuda:0", "cuda:3", "cuda:3")
    assert decoder_model(spec).device == "cuda:3"  # DecoderEngine is built from this (app/serve.py)
    assert decoder_model(ModelSpec(device="cuda:1")).device == "cuda:1"  # no flag: with the DiT


def test_the_memory_plan_leaves_out_what_runs_on_another_device():
    spec = ModelSpec(name="s2v-14b", random_weights=True, device="cuda:0")
    _, shared, _ = plan_for_device(spec, available=80 * GiB, fp8_capable=True)
    assert "vae" in shared.parts
    planned, apart, req = plan_for_device(
        spec.with_(decoder_device="cuda:4", encoder_device="cuda:4"), available=80 * GiB, fp8_capable=True
    )
    assert "vae" not in apart.parts and "encoders" not in apart.parts
    assert planned.encoder_device == "cuda:4"  # kept where the user put it, not moved to the CPU
    # the room they leave buys a better plan on the DiT's GPU: its KV cache in bf16, not FP8
    assert req.size == "704*384" and shared.kv_dtype == "float8_e4m3fn" and apart.kv_dtype == "bfloat16"
    same = plan_for_device(spec.with_(decoder_device="cuda"), available=80 * GiB, fp8_capable=True)[1]
    assert "vae" in same.parts  # "cuda" is cuda:0: the same GPU


def test_encoders_placed_on_the_dit_gpu_stay_there_in_the_plan():
    spec = ModelSpec(name="s2v-14b", random_weights=True, device="cuda:0")
    _, free_choice, _ = plan_for_device(spec, available=40 * GiB, fp8_capable=True)
    assert free_choice.encoder_device == "cpu"  # 40 GiB: the plan moves the encoders off the GPU
    planned, placed, _ = plan_for_device(spec.with_(encoder_device="cuda:0"), available=40 * GiB, fp8_capable=True)
    assert planned.encoder_device == "cuda:0" and placed.encoder_device == "cuda" and "encoders" in placed.parts
    assert placed.total <= 40 * GiB  # it fits by other rungs (FP8 weights, one cache set...)
