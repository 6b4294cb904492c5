"""`avatar batch`: profiles under a root only, atomic outputs, manifest, per-job logs; killed
half-way and rerun, every profile is done exactly once and no file is corrupt."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from avatar.app.batch import ProfileError, load_profile, resolve_under
from tests.conftest import ASSETS, AVATAR, ROOT, ffprobe, trim_speech

pytestmark = pytest.mark.timeout(300)
GOOD = [f"p{i}" for i in range(5)]


def test_paths_stay_under_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "faces").mkdir(parents=True)
    (root / "faces" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("no")
    (root / "faces" / "link.png").symlink_to(tmp_path / "secret.txt")
    root = root.resolve()
    assert resolve_under(root, "faces/a.png", "image") == root / "faces" / "a.png"
    assert resolve_under(root, "faces/../faces/a.png", "image") == root / "faces" / "a.png"
    for bad, why in (
        ("../secret.txt", "outside the root"),
        ("faces/../../secret.txt", "outside the root"),
        (str(tmp_path / "secret.txt"), "absolute"),
        ("~/x.png", "absolute"),
        ("faces/link.png", "outside the root"),
        ("faces/none.png", "does not exist"),
        ("faces", "not a file"),
        ("", "empty"),
    ):
        with pytest.raises(ProfileError, match=why):
            resolve_under(root, bad, "image")


def test_profile_checks(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "a.wav").write_bytes(b"x")

    def load(data, name="p"):
        path = tmp_path / f"{name}.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return load_profile(path, tmp_path.resolve())

    p = load({"image": "a.png", "audio": "a.wav", "seed": 7, "size": "64*64"})
    assert p.seed == 7 and p.size == "64*64" and p.image.name == "a.png" and len(p.sha256) == 64
    for data, why in (
        ("{not json", "not valid JSON"),
        ([1], "JSON object"),
        ({"image": "a.png"}, "missing field 'audio'"),
        ({"image": "a.png", "audio": "a.wav", "sead": 1}, "unknown field"),
        ({"image": "a.png", "audio": "a.wav", "seed": "7"}, "'seed' must be"),
        ({"image": "a.png", "audio": "a.wav", "num_clip": True}, "'num_clip' must be int"),
        ({"image": "a.png", "audio": "a.wav", "sample_steps": -1}, "negative"),
    ):
        with pytest.raises(ProfileError, match=why):
            load(data)
    with pytest.raises(ProfileError, match="profile name"):
        load({"image": "a.png", "audio": "a.wav"}, name="bad name")
    with pytest.raises(ProfileError, match="reserved"):
        load({"image": "a.png", "audio": "a.wav"}, name="manifest")


def _profiles(tmp_path: Path) -> Path:
    root = tmp_path / "inputs"
    (root / "faces").mkdir(parents=True)
    (root / "speech").mkdir()
    (root / "faces" / "astronaut.png").write_bytes((ASSETS / "astronaut.png").read_bytes())
    for i, secs in enumerate((0.5, 0.7, 0.5, 0.6, 0.5)):
        trim_speech(root / "speech" / f"s{i}.wav", 0.3 * i, secs)
    (root / "speech" / "fake.wav").write_bytes((ASSETS / "astronaut.png").read_bytes())  # a PNG named .wav
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for i, name in enumerate(GOOD):
        (profiles / f"{name}.json").write_text(
            json.dumps({"image": "faces/astronaut.png", "audio": f"speech/s{i}.wav", "prompt": f"take {i}", "seed": i})
        )
    bad = {
        "traversal": {"image": "../profiles/p0.json", "audio": "speech/s0.wav"},
        "absolute": {"image": str(ASSETS / "astronaut.png"), "audio": "speech/s0.wav"},
        "notaudio": {"image": "faces/astronaut.png", "audio": "speech/fake.wav"},
    }
    for name, data in bad.items():
        (profiles / f"{name}.json").write_text(json.dumps(data))
    (profiles / "broken.json").write_text("{")
    return root


def _batch(profiles, out, root, server, env, wait=True):
    cmd = [
        *AVATAR,
        "batch",
        str(profiles),
        "--out",
        str(out),
        "--root",
        str(root),
        "--server",
        server,
        "--concurrency",
        "2",
        "--retries",
        "1",
        "--timeout",
        "120",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out_text, _ = proc.communicate(timeout=240)
        return proc.returncode, out_text
    return proc


def _manifest(out):
    try:
        return json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def test_batch_killed_half_way_then_resumed(tmp_path, start_service, env):
    root = _profiles(tmp_path)
    profiles, out = tmp_path / "profiles", tmp_path / "out"
    server = start_service("all", "--max-sessions", "2")

    proc = _batch(profiles, out, root, server.address, env, wait=False)
    deadline = time.monotonic() + 200
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            m = _manifest(out)
            done = [n for n, e in (m or {}).get("profiles", {}).items() if e["status"] == "done"]
            if len(done) >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the batch finished before it could be killed: " + proc.stdout.read()
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    first = {n for n, e in _manifest(out)["profiles"].items() if e["status"] == "done"}
    assert len(first) >= 2
    first_mtimes = {n: (out / f"{n}.mp4").stat().st_mtime_ns for n in first}
    # a crash can also leave a video whose bytes do not match its sidecar: it must be redone
    victim = sorted(first)[0]
    data = (out / f"{victim}.mp4").read_bytes()
    (out / f"{victim}.mp4").write_bytes(data[: len(data) // 2])
    (out / f".{GOOD[-1]}.mp4.leftover.part").write_bytes(b"half")

    rc, text = _batch(profiles, out, root, server.address, env)
    assert rc == 1, text  # the bad profiles failed, the good ones are done
    m = _manifest(out)
    assert sorted(m["profiles"]) == sorted(GOOD + ["traversal", "absolute", "notaudio", "broken"])
    assert m["summary"] == {"done": len(GOOD), "failed": 4}
    reasons = {n: e.get("reason", "") for n, e in m["profiles"].items()}
    assert "outside the root" in reasons["traversal"]
    assert "absolute" in reasons["absolute"]
    assert "not valid JSON" in reasons["broken"]
    assert reasons["notaudio"].startswith("INVALID_ARGUMENT")
    for name in first - {victim}:  # finished work is not redone
        assert m["profiles"][name].get("skipped") is True
        assert (out / f"{name}.mp4").stat().st_mtime_ns == first_mtimes[name]
    assert not m["profiles"][victim].get("skipped")
    for name in GOOD:
        side = json.loads((out / f"{name}.json").read_text())
        video = out / f"{name}.mp4"
        assert side["status"] == "done" and side["video"]["bytes"] == video.stat().st_size
        assert side["settings"]["seed"] == int(name[1:]) and side["frames"] > 0
        info = ffprobe(video)
        kinds = sorted(s["codec_name"] for s in info["streams"])
        assert kinds == ["aac", "h264"], name
        assert int(next(s for s in info["streams"] if s["codec_name"] == "h264")["nb_read_frames"]) == side["frames"]
        assert (out / "logs" / f"{name}.log").read_text().strip()
    assert not list(out.glob(".*.part")), "no half-written file is left behind"
    assert not (out / "traversal.mp4").exists()

    # a third run has nothing to do
    rc, text = _batch(profiles, out, root, server.address, env)
    m = _manifest(out)
    assert all(m["profiles"][n].get("skipped") for n in GOOD)


def test_batch_usage_errors(tmp_path, env):
    r = subprocess.run(
        [*AVATAR, "batch", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "is not a folder" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = subprocess.run(
        [*AVATAR, "batch", str(tmp_path / "empty"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "no *.json profiles" in r.stderr
    (tmp_path / "empty" / "a.json").write_text("{}")
    r = subprocess.run(
        [*AVATAR, "batch", str(tmp_path / "empty"), "--out", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "must not be the profiles folder" in r.stderr
    assert (tmp_path / "empty" / "a.json").read_text() == "{}"


def test_a_profile_reports_every_problem_at_once(tmp_path):
    """A typo used to hide the profile's other problems: one unknown field was all it said."""
    (tmp_path / "a.png").write_bytes(b"x")
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            {
                "image": "a.png",
                "audio": "speech/none.wav",
                "sead": 1,
                "num_clip": "2",
                "size": "704x384",
                "preset": "ultra",
                "sample_steps": -1,
            }
        )
    )
    with pytest.raises(ProfileError) as err:
        load_profile(path, tmp_path.resolve())
    message = str(err.value)
    assert message.startswith("6 problems: "), message
    for problem in (
        "unknown field 'sead' (did you mean 'seed'?)",
        "audio: 'speech/none.wav' does not exist",
        "field 'num_clip' must be int",
        "field 'size': size must be written W*H",
        "field 'preset': 'ultra' is not one of preview, standard, hd",
        "field 'sample_steps' must not be negative",
    ):
        assert problem in message, message


def test_the_example_folder_documents_every_field_and_runs(tmp_path, mesh, env):
    from avatar.app.batch import FIELDS

    example = tmp_path / "profiles"
    r = subprocess.run(
        [*AVATAR, "batch", "--example", str(example)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and f"avatar batch {example} --out" in r.stderr, r.stderr
    readme = (example / "README.md").read_text()
    assert all(f"| `{key}` |" in readme for key in FIELDS)
    every = json.loads((example / "every-field.json").read_text())
    assert set(every) == set(FIELDS)
    rc, text = _batch(example, tmp_path / "renders", example, mesh["gateway"].address, env)
    assert rc == 0, text
    manifest = _manifest(tmp_path / "renders")
    assert manifest["summary"] == {"done": 2}
    for name in ("minimal", "every-field"):
        side = json.loads((tmp_path / "renders" / f"{name}.json").read_text())
        info = ffprobe(tmp_path / "renders" / f"{name}.mp4")
        assert sorted(s["codec_name"] for s in info["streams"]) == ["aac", "h264"]
        assert int(next(s for s in info["streams"] if s["codec_name"] == "h264")["nb_read_frames"]) == side["frames"]
    assert json.loads((tmp_path / "renders" / "minimal.json").read_text())["truncation"] == ""  # the whole speech
