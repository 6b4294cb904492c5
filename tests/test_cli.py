"""The `avatar` command: embedded default (no --server) as a subprocess, OUT.json, bad input -> one line, exit 2."""

import json
import subprocess
import sys

from conftest import ASSETS, AVATAR, ROOT, check_video


def run_cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*AVATAR, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_embedded_default_renders_mp4_and_sidecar(tmp_path, env):
    out = tmp_path / "sub" / "talk.mp4"
    r = run_cli(
        "generate",
        "--image",
        str(ASSETS / "astronaut.png"),
        "--audio",
        str(ASSETS / "speech.wav"),
        "--size",
        "64*64",
        "--num_clip",
        "2",
        "--infer_frames",
        "24",
        "--sample_steps",
        "2",
        "--seed",
        "5",
        "--enable_online_decode",
        "--auth-token",
        "s3cret-token",
        "--out",
        str(out),
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "video is noise" in r.stderr  # says the tiny model renders noise
    assert "block" in r.stderr  # the progress bar
    check_video(out, 48 / 25)
    assert "s3cret-token" not in out.with_suffix(".json").read_text()  # secrets stay out of the sidecar
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["seed"] == 5 and meta["server"] == "embedded" and meta["model"]["name"] == "tiny"
    assert (meta["blocks"], meta["frames"], meta["width"], meta["height"]) == (4, 48, 64, 64)
    assert meta["parameters"]["num_clip"] == 2 and meta["parameters"]["sample_steps"] == 2
    assert meta["job"]["sample_steps"] == 2 and meta["job"]["infer_frames"] == 24
    assert set(meta["timings_ms"]) >= {"encode_image", "encode_text", "encode_audio", "dit_block", "vae_decode", "mux"}
    assert 0 < meta["time_to_first_fragment_s"] < meta["total_s"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["talk.json", "talk.mp4"]  # no temp files left


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, env, mesh):
    """Through a running gateway (--server): the server's INVALID_ARGUMENT reason, one line, exit 2."""
    not_audio = tmp_path / "notes.txt"
    not_audio.write_text("this is not audio\n")
    out = tmp_path / "x.mp4"
    server = ["--server", mesh["gateway"].address, "--out", str(out)]
    r = run_cli("generate", "--image", str(ASSETS / "astronaut.png"), "--audio", str(not_audio), *server, env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "audio" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_cli(
        "generate",
        "--image",
        str(ASSETS / "astronaut.png"),
        "--audio",
        str(ASSETS / "speech.wav"),
        "--size",
        "64x64",
        *server,
        env=env,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "W*H" in r.stderr, r.stderr
    r = run_cli(
        "generate", "--image", str(tmp_path / "missing.png"), "--audio", str(ASSETS / "speech.wav"), *server, env=env
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.png" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == [not_audio]  # nothing half-written


def test_weights_commands_report_problems(tmp_path, monkeypatch, capsys):
    """Wiring of check-weights / download-weights (avatar.app.weights_tools has its own tests); in-process."""
    from avatar.app.cli import main

    root = tmp_path / "Wan2.2-S2V-14B"
    root.mkdir()
    (root / "config.json").write_text("{}")
    assert main(["check-weights", "--ckpt_dir", str(root)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "problem" in out, out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download-weights", "--ckpt_dir", str(tmp_path / "dl")]) == 1
    err = capsys.readouterr().err
    assert "hf download" in err and not (tmp_path / "dl").exists(), err


def test_generate_through_a_running_mesh_continues_the_client_trace(tmp_path, env, mesh):
    out = tmp_path / "remote.mp4"
    client_trace = tmp_path / "client.jsonl"
    r = run_cli(
        "generate",
        "--image",
        str(ASSETS / "astronaut.png"),
        "--audio",
        str(ASSETS / "speech.wav"),
        "--server",
        mesh["gateway"].address,
        "--size",
        "64*64",
        "--num_clip",
        "1",
        "--infer_frames",
        "12",
        "--trace-file",
        str(client_trace),
        "--out",
        str(out),
        env=env,
    )
    assert r.returncode == 0, r.stderr
    check_video(out, 12 / 25)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["server"] == mesh["gateway"].address and meta["blocks"] == 1
    [root] = [json.loads(x) for x in client_trace.read_text().splitlines()]
    assert root["name"] == "avatar generate" and root["parent_id"] is None and root["trace_id"] == meta["trace_id"]
    gateway_root = [
        s
        for s in mesh["gateway"].spans()
        if s["trace_id"] == meta["trace_id"] and s["name"] == "avatar.v1.AvatarService/Generate"
    ]
    assert [s["parent_id"] for s in gateway_root] == [root["span_id"]]


def _warm_up_log(tmp_path, env, role: str, *flags: str) -> tuple[str, list[str]]:
    """`avatar serve --role ROLE --warmup FLAGS` until SERVING: its log, and its warm-up result lines.
    The warm-up must come before the service is announced (it listened, NOT_SERVING, meanwhile)."""
    from conftest import Services

    services = Services(tmp_path, env)
    try:
        log = services.start(role, *(flags or ("--warmup",))).log.read_text()  # waits for SERVING
    finally:
        services.stop_all()
    assert log.index(f"{role} warm-up") < log.index("listening on"), log
    return log, [line for line in log.splitlines() if f"{role} warm-up" in line and " in " in line]


def test_serve_warms_the_generator_up_before_it_reports_serving(tmp_path, env):
    log, warmed = _warm_up_log(tmp_path, env, "generator")
    assert len(warmed) == 2 and "176*96: 10 blocks" in warmed[0] and "96*64: 8 blocks" in warmed[1], log
    assert all("steady" in line for line in warmed), log  # what the live guard reads


def test_serve_warms_up_the_shapes_it_is_told_beside_the_presets(tmp_path, env):
    """--warmup-shape: a size, steps and clip the presets do not run (run F2's first 384*256 request
    at 4 steps waited 4.0 s for what the warm-up had not done); it implies --warmup."""
    log, warmed = _warm_up_log(tmp_path, env, "generator", "--warmup-shape", "64x64@2/12", "--warmup-shape", "96x64@3")
    assert len(warmed) == 3, log  # 96x64@3 (36 frames) is the preview preset's: run once
    assert "176*96: 10 blocks" in warmed[0] and "96*64: 8 blocks" in warmed[1], log
    assert "64*64: 4 blocks" in warmed[2] and "at 2 steps" in warmed[2], log


def test_serve_refuses_a_bad_warmup_shape_with_one_line(env):
    for flags, words in (
        (["--warmup-shape", "384*256"], "expected WIDTHxHEIGHT[@STEPS][/FRAMES]"),
        (["--warmup-shape", "100x64"], "multiples of 16 of at least 64"),
        (["--warmup-shape", "64x64@0"], "steps must be between 1 and 50, got 0"),
        (["--warmup-shape", "64x64@2/-12"], "frames must be between 1 and 1200"),
        (["--warmup-shape", "64x64", "--no-warmup"], "--no-warmup turns off"),
        (["--warmup-shape", "64x64", "--role", "gateway"], "not --role gateway"),
    ):
        r = run_cli("serve", "--model", "tiny", "--listen", "127.0.0.1:0", *flags, env=env, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert words in r.stderr and "Traceback" not in r.stderr, r.stderr
    # under torchrun (a TPP generator): no warm-up there yet, so the flag would do nothing
    r = run_cli(
        "serve", "--model", "tiny", "--role", "generator", "--listen", "127.0.0.1:0", "--warmup-shape", "64x64",
        env={**env, "WORLD_SIZE": "2"}, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "a multi-GPU (torchrun) generator has no warm-up yet" in r.stderr, r.stderr


def test_serve_warms_the_encoder_up_before_it_reports_serving(tmp_path, env):
    log, warmed = _warm_up_log(tmp_path, env, "encoder")
    assert any("176*96: portrait in" in line for line in warmed), log
    assert any("96*64: portrait in" in line for line in warmed), log
    assert any("prompt and 1 s of audio (wav2vec2)" in line for line in warmed), log


def test_a_video_cut_by_num_clip_says_so_in_the_summary_and_the_status(tmp_path, env, mesh):
    out = tmp_path / "cut.mp4"
    r = run_cli(
        "generate",
        "--image",
        str(ASSETS / "astronaut.png"),
        "--audio",
        str(ASSETS / "speech.wav"),
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
    said = "num_clip 1 x 12 frames cut the video to 0.48 s of the 7.21 s of audio; num_clip 0 renders all of it"
    assert f"the video covers only part of the audio: {said}" in r.stderr, r.stderr
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["truncation"] == said and abs(meta["audio_duration_s"] - 7.213) < 0.001
    check_video(out, 12 / 25)


def test_a_port_out_of_range_is_one_line_and_exit_code_2(tmp_path, env):
    """grpc takes a port modulo 65536: 127.0.0.1:99999 would quietly be port 34463, as a server's
    listener, a gateway's peer, a client's server and a health probe's target."""
    image, audio, out = str(ASSETS / "astronaut.png"), str(ASSETS / "speech.wav"), str(tmp_path / "x.mp4")
    for args, words in (
        (["serve", "--listen", "127.0.0.1:99999"], "127.0.0.1:99999: port 99999 is out of range (0..65535)"),
        (["serve", "--listen", "[::1]:65536"], "[::1]:65536: port 65536 is out of range"),
        (
            ["serve", "--role", "gateway", "--listen", "127.0.0.1:0", "--encoder", "127.0.0.1:70000"]
            + ["--generator", "127.0.0.1:1", "--decoder", "127.0.0.1:2"],
            "127.0.0.1:70000: port 70000 is out of range (1..65535)",
        ),
        (
            ["generate", "--server", "localhost:99999", "--image", image, "--audio", audio, "--out", out],
            "localhost:99999: port 99999 is out of range (1..65535)",
        ),
    ):
        r = run_cli(*args, env=env, timeout=120)
        errors = [line for line in r.stderr.splitlines() if not line.startswith("{")]  # JSON log lines aside
        assert r.returncode == 2 and len(errors) == 1 and words in errors[0], (args, r.stderr[-2000:])
    probe = subprocess.run(
        [sys.executable, "-m", "avatar.app.healthcheck", "127.0.0.1:99999"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert probe.returncode == 2 and probe.stderr.count("\n") == 1 and "port 99999 is out of range" in probe.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_bad_port_or_deadline_flag_is_refused_before_anything_starts(tmp_path, env):
    image, audio, out = str(ASSETS / "astronaut.png"), str(ASSETS / "speech.wav"), str(tmp_path / "x.mp4")
    for args, words in (
        (["serve", "--metrics-port", "99999"], "argument --metrics-port: port 99999 is out of range (0..65535)"),
        (["serve", "--metrics-port", "http"], "argument --metrics-port: expected a port number, got 'http'"),
        (["serve", "--grace", "-1"], "argument --grace: must be 0 or a positive number of seconds, got -1"),
        (["serve", "--max-audio-s", "0"], "argument --max-audio-s: must be a positive number of seconds, got 0"),
        (
            ["serve", "--metrics-port", "65534", "--processes", "per-service"],
            "--metrics-port 65534: the children serve theirs on the next 3 ports, past 65535",
        ),
        (
            ["generate", "--image", image, "--audio", audio, "--out", out, "--timeout", "-3"],
            "argument --timeout: must be a positive number of seconds, got -3",
        ),
        (
            ["converse", "--image", image, "--audio", audio, "--out", out, "--timeout", "nan"],
            "argument --timeout: must be a positive number of seconds, got nan",
        ),
        (
            ["batch", str(tmp_path), "--out", str(tmp_path / "videos"), "--timeout", "0"],
            "argument --timeout: must be a positive number of seconds, got 0",
        ),
    ):
        r = run_cli(*args, env=env, timeout=120)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and words in last and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert "started the" not in r.stderr and list(tmp_path.iterdir()) == [], args  # nothing ran, nothing written
    probe = subprocess.run(
        [sys.executable, "-m", "avatar.app.healthcheck", "--timeout", "0", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert probe.returncode == 2 and "must be a positive number of seconds" in probe.stderr.splitlines()[-1]
