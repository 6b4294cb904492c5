"""The real-checkpoint path end to end: a complete folder in the exact upstream layout (tiny dims)
passes `avatar check-weights`, and `avatar generate --ckpt_dir --lora_path` renders through the mesh
with the weights read from those files (the same loaders the 14B checkpoint goes through)."""

import json
import subprocess

from ckpt_fixtures.dit import write_dit_checkpoint, write_lora
from ckpt_fixtures.encoders import write_encoder_files
from conftest import ASSETS, AVATAR, ROOT, check_video

from avatar.app.weights_tools import LORA_FILE
from avatar.checkpoints import S2V_FOLDER


def run_cli(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*AVATAR, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_checkpoint_folder_passes_check_weights_and_renders_through_the_mesh(tmp_path, env):
    root = tmp_path / "ckpt" / S2V_FOLDER
    write_encoder_files(root, seed=3)
    dit = write_dit_checkpoint(root, seed=3)
    lora = tmp_path / "ckpt" / "LiveAvatar" / LORA_FILE
    lora.parent.mkdir(parents=True)
    write_lora(lora, dit, scale=0.2)

    r = run_cli("check-weights", "--ckpt_dir", root, "--lora_path", lora, "--model", "tiny", env=env)
    assert r.returncode == 0, r.stdout + r.stderr

    job = [
        "--image",
        ASSETS / "astronaut.png",
        "--audio",
        ASSETS / "speech.wav",
        "--model",
        "tiny",
        "--size",
        "64*64",
        "--num_clip",
        "1",
        "--infer_frames",
        "24",
        "--sample_steps",
        "2",
        "--seed",
        "5",
    ]
    variants = {"files+lora": ["--ckpt_dir", root, "--lora_path", lora], "files": ["--ckpt_dir", root], "random": []}
    videos = {}
    for name, weights in variants.items():
        out = tmp_path / f"{name}.mp4"
        r = run_cli("generate", *job, *weights, "--out", out, env=env)
        assert r.returncode == 0, r.stderr
        check_video(out, 24 / 25)
        videos[name] = out.read_bytes()
        described = json.loads(out.with_suffix(".json").read_text())["model"]["description"]
        if weights:
            assert str(root) in described and ("LoRA" in described) == ("--lora_path" in weights), described
            assert "noise" not in r.stderr  # weights from files: no "random model" note
    # x264 is deterministic, so different bytes mean different pixels: the files' weights are used,
    # and the LoRA (merged into the loaded DiT) changes the picture.
    assert len(set(videos.values())) == 3
