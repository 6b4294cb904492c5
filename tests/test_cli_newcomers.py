"""What a newcomer meets: wrong weights folders and devices end in one line (exit 2), not a traceback;
--size takes ASCII digits only; a stopped `avatar generate` leaves no temp file behind."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import ASSETS, AVATAR, ROOT, check_video

from avatar.errors import InvalidInput
from avatar.media import parse_size

pytestmark = pytest.mark.timeout(300)


def run_cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*AVATAR, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


GENERATE = ["generate", "--image", str(ASSETS / "astronaut.png"), "--audio", str(ASSETS / "speech.wav")]
SERVE = ["serve", "--listen", "127.0.0.1:0", "--no-warmup"]


@pytest.mark.parametrize("command", [GENERATE, SERVE], ids=["generate", "serve"])
def test_a_missing_or_empty_ckpt_dir_is_one_line_saying_what_to_run(command, tmp_path, env):
    extra = ["--out", str(tmp_path / "x.mp4")] if command is GENERATE else []
    missing = tmp_path / "nowhere"
    err = one_line(run_cli(*command, *extra, "--ckpt_dir", str(missing), env=env))
    assert f"--ckpt_dir {missing}: no such folder" in err and "avatar download-weights --ckpt_dir" in err, err
    (tmp_path / "empty").mkdir()
    err = one_line(run_cli(*command, *extra, "--ckpt_dir", str(tmp_path / "empty"), env=env))
    assert "is empty" in err and "avatar download-weights" in err, err
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    err = one_line(run_cli(*command, *extra, "--ckpt_dir", str(partial), env=env))
    assert "is not a Wan2.2-S2V-14B folder" in err and "Wan2.1_VAE.pth" in err and "check-weights" in err, err
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", [GENERATE, SERVE], ids=["generate", "serve"])
def test_device_cuda_without_cuda_is_one_line(command, tmp_path, env):
    extra = ["--out", str(tmp_path / "x.mp4")] if command is GENERATE else []
    err = one_line(run_cli(*command, *extra, "--device", "cuda", env=env))
    assert "--device cuda" in err and "use --device cpu" in err, err


def test_check_weights_on_an_empty_folder_says_what_to_run(tmp_path, env):
    r = run_cli("check-weights", "--ckpt_dir", str(tmp_path), env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"avatar download-weights --ckpt_dir {tmp_path}" in r.stdout, r.stdout
    assert r.stdout.count("\n") <= 4, r.stdout  # not five FAIL lines about files nobody expected to be there


@pytest.mark.parametrize(
    "text",
    [
        "\u0667\u0660\u0664*\u0663\u0668\u0664",  # Arabic-Indic 704*384
        "\uff17\uff10\uff14*\uff13\uff18\uff14",  # full-width digits
        "704*\u0969\u096e\u096a",
    ],
)  # Devanagari 384
def test_size_takes_ascii_digits_only(text):
    with pytest.raises(InvalidInput, match="W\\*H"):
        parse_size(text)
    assert parse_size(" 704 * 384 ") == (704, 384)


# --- stopping `avatar generate` --------------------------------------------------------------


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory):
    """30 s of speech (the sample, repeated): long enough to stop in the middle."""
    import soundfile

    pcm, rate = soundfile.read(str(ASSETS / "speech.wav"))
    path = tmp_path_factory.mktemp("speech") / "thirty.wav"
    soundfile.write(str(path), np.tile(pcm, 5)[: 30 * rate], rate)
    return path


def _start_generate(mesh, audio, out, env) -> subprocess.Popen:
    return subprocess.Popen(
        [
            *AVATAR,
            "generate",
            "--image",
            str(ASSETS / "astronaut.png"),
            "--audio",
            str(audio),
            "--server",
            mesh["gateway"].address,
            "--size",
            "64*64",
            "--sample_steps",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_video_bytes(proc, folder, timeout_s=120):
    """Waits until the temp file holds the first fragment; returns its path."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        parts = [p for p in folder.glob(".*.part") if p.stat().st_size > 0]
        if parts:
            return parts[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise TimeoutError("no fragment arrived")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stopped_generate_removes_its_temp_file(sig, mesh, long_speech, tmp_path, env):
    out = tmp_path / "talk.mp4"
    proc = _start_generate(mesh, long_speech, out, env)
    try:
        _wait_for_video_bytes(proc, tmp_path)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    assert f"stopped by {sig.name}" in err.splitlines()[-1] and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [], "nothing half-written is left"


def test_after_sigkill_the_next_run_removes_the_stale_temp_file(mesh, long_speech, tmp_path, env):
    out = tmp_path / "talk.mp4"
    proc = _start_generate(mesh, long_speech, out, env)
    try:
        stale = _wait_for_video_bytes(proc, tmp_path)
        proc.kill()  # SIGKILL cannot be handled: the temp file stays
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert stale.exists()
    someone_elses = tmp_path / f".talk.mp4.{os.getpid()}.running.part"  # a live process's: kept
    someone_elses.write_bytes(b"in progress")
    r = run_cli(
        *GENERATE,
        "--server",
        mesh["gateway"].address,
        "--size",
        "64*64",
        "--num_clip",
        "1",
        "--infer_frames",
        "12",
        "--sample_steps",
        "1",
        "--out",
        str(out),
        env=env,
    )
    assert r.returncode == 0, r.stderr
    check_video(out, 12 / 25)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([someone_elses.name, "talk.json", "talk.mp4"])
    assert json.loads(out.with_suffix(".json").read_text())["frames"] == 12


def test_a_missing_lora_file_is_one_line(tmp_path, env):
    err = one_line(
        run_cli(
            *GENERATE,
            "--out",
            str(tmp_path / "x.mp4"),
            "--lora_path",
            str(tmp_path / "liveavatar.safetensors"),
            env=env,
        )
    )
    assert "--lora_path" in err and "no such file" in err, err
