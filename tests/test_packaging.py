"""The wheel is the product: built from the tracked files alone, installed into a fresh virtualenv
with one `pip install`, it has every runtime dependency, the gRPC stubs and a working `avatar`."""

import shutil
import subprocess
import sys
import venv

import pytest

from tests.conftest import ASSETS, ROOT, ffprobe, trim_speech

pytestmark = [pytest.mark.mesh, pytest.mark.timeout(900)]


def _run(*cmd, cwd, timeout=600, env=None):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{cmd[:3]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def test_wheel_from_a_clean_tree_installs_and_renders(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout to know the tracked files")
    src = tmp_path / "src"
    tracked = _run("git", "ls-files", "-z", cwd=ROOT).stdout.split("\0")
    for name in filter(None, tracked):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    assert not (src / "avatar" / "v1").exists(), "generated stubs are not tracked"
    # The project's own venv has the build backend and grpcio-tools (pyproject's build requires).
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        tmp_path / "dist",
        ".",
        cwd=src,
    )
    (wheel,) = (tmp_path / "dist").glob("avatar_mesh-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py, avatar = env_dir / "bin" / "python", env_dir / "bin" / "avatar"
    # -c: the versions CI pins (torch's CPU build); the wheel itself names ranges.
    _run(py, "-m", "pip", "install", "-q", wheel, "-c", ROOT / "requirements.txt", cwd=tmp_path, timeout=900)

    out = _run(py, "-c", "import avatar.client, avatar.v1.avatar_pb2_grpc; print(avatar.client.__file__)", cwd=tmp_path)
    assert str(env_dir) in out.stdout, "imported from the installed wheel, not the checkout"
    assert _run(avatar, "--version", cwd=tmp_path).stdout.strip().startswith("avatar ")

    audio = trim_speech(tmp_path / "a.wav", 0, 1.0)
    _run(
        avatar,
        "generate",
        "--image",
        ASSETS / "astronaut.png",
        "--audio",
        audio,
        "--size",
        "64*64",
        "--out",
        tmp_path / "out.mp4",
        cwd=tmp_path,
        timeout=300,
    )
    probe = ffprobe(tmp_path / "out.mp4")
    kinds = sorted(s["codec_type"] for s in probe["streams"])
    assert kinds == ["audio", "video"]
    assert abs(float(probe["format"]["duration"]) - 1.0) < 0.1
