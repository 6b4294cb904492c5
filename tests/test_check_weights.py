"""check-weights on complete and broken folders (tiny, and full-size headers over sparse files); offline download."""

import json
import os
import pathlib
import socket
import struct
import time
import zipfile

import pytest
import torch
from ckpt_fixtures.dit import write_dit_checkpoint, write_lora
from ckpt_fixtures.encoders import write_encoder_files
from safetensors.torch import save_file

from avatar.app.weights_tools import LORA_FILE, S2V_REPO, check_weights, download_weights
from avatar.checkpoints import DIT_INDEX, S2V_FOLDER
from avatar.errors import WeightsError
from avatar.services.generator.weights import random_dit

KEYS = pathlib.Path(__file__).parent / "data" / "keys"
ST_DTYPES = {"bfloat16": "BF16", "float32": "F32"}


@pytest.fixture
def tiny_folder(tmp_path) -> pathlib.Path:
    root = tmp_path / S2V_FOLDER
    write_encoder_files(root)
    write_dit_checkpoint(root)
    return root


def test_complete_tiny_folder_is_ok(tiny_folder, tmp_path):
    lora = tmp_path / LORA_FILE
    write_lora(lora, random_dit("tiny", "cpu", torch.float32, seed=0))
    report = check_weights(tiny_folder.parent, lora_path=lora, model="tiny")  # the folder above works too
    assert report.ok, str(report)
    assert [c.name for c in report.components] == ["DiT", "VAE", "T5", "tokenizer", "wav2vec2", "LoRA"]
    text = str(report)
    assert "2 shard(s)" in text and "rank 4" in text and text.endswith("expected shape")


def test_missing_shard_is_named(tiny_folder):
    (tiny_folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    report = check_weights(tiny_folder, model="tiny")
    assert not report.ok
    assert any("diffusion_pytorch_model-00002-of-00002.safetensors" in p and "missing" in p for p in report.problems)
    assert [c.name for c in report.components if not c.ok] == ["DiT"]


def test_wrong_shape_is_named(tiny_folder):
    sd = torch.load(tiny_folder / "Wan2.1_VAE.pth", weights_only=True)
    sd["decoder.head.2.weight"] = torch.zeros(3, 8, 3, 3, 1)
    torch.save(sd, tiny_folder / "Wan2.1_VAE.pth")
    report = check_weights(tiny_folder, model="tiny")
    assert report.problems == ["VAE: wrong shapes: decoder.head.2.weight [3, 8, 3, 3, 1] (expected [3, 8, 3, 3, 3])"]
    assert "FAIL VAE" in str(report)


def test_truncated_pth_and_missing_pieces(tiny_folder):
    t5 = tiny_folder / "models_t5_umt5-xxl-enc-bf16.pth"
    with zipfile.ZipFile(t5) as zin:
        entries = [(i, zin.read(i)) for i in zin.infolist()]
    with zipfile.ZipFile(t5, "w") as zout:  # an interrupted copy: the last storage lost half its bytes
        for n, (info, data) in enumerate(entries):
            zout.writestr(info, data[: len(data) // 2] if "/data/" in info.filename and n == len(entries) - 3 else data)
    (tiny_folder / "google" / "umt5-xxl" / "tokenizer.json").unlink()
    report = check_weights(tiny_folder, model="tiny")
    assert any(p.startswith("T5: ") and "truncated" in p for p in report.problems), report.problems
    assert any(p.startswith("tokenizer: ") and "tokenizer.json" in p for p in report.problems)


def test_tiny_folder_is_not_the_14b_model(tiny_folder):
    report = check_weights(tiny_folder, model="s2v-14b")
    assert not report.ok
    failing = {c.name for c in report.components if not c.ok}
    assert failing == {"DiT", "VAE", "T5", "wav2vec2"}
    assert any("config.json describes another model" in p for p in report.problems)


def test_lora_for_other_layers_is_reported(tiny_folder, tmp_path):
    lora = tmp_path / "other.safetensors"
    save_file(
        {
            "base_model.model.blocks.0.self_attn.q.lora_A.default.weight": torch.zeros(4, 64),
            "base_model.model.blocks.0.self_attn.q.lora_B.default.weight": torch.zeros(64, 4),
            "base_model.model.blocks.9.self_attn.q.lora_A.default.weight": torch.zeros(4, 64),
        },
        str(lora),
    )
    report = check_weights(tiny_folder, lora_path=lora, model="tiny")
    assert report.problems == [
        "LoRA: 1 LoRA tensor(s) for layers the DiT does not have: "
        "base_model.model.blocks.9.self_attn.q.lora_A.default.weight"
    ]


def _sparse_safetensors(path: pathlib.Path, tensors: list[tuple[str, list[int], str]]) -> None:
    """A valid safetensors file whose data is a hole (no disk used): headers are all check-weights reads."""
    header, offset = {}, 0
    for name, shape, dtype in tensors:
        n = 1
        for d in shape:
            n *= d
        size = n * (2 if dtype == "bfloat16" else 4)
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def test_full_size_dit_and_lora_headers_match(tmp_path):
    """The real layout at real size: 4 DiT shards and liveavatar.safetensors as the manifests list them."""
    root = tmp_path / S2V_FOLDER
    root.mkdir()
    dit = [(n, s, d.removeprefix("torch.")) for n, s, d in json.loads((KEYS / "wan22_s2v_14b_dit.json").read_text())]
    weight_map = {}
    for i in range(4):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-00004.safetensors"
        _sparse_safetensors(root / shard, dit[i::4])
        weight_map.update({n: shard for n, _, _ in dit[i::4]})
    (root / DIT_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"_class_name": "WanModel_S2V", "dim": 5120, "num_layers": 40}))
    lora = tmp_path / LORA_FILE
    _sparse_safetensors(
        lora, [(n, s, d.removeprefix("torch.")) for n, s, d in json.loads((KEYS / "liveavatar_lora.json").read_text())]
    )
    report = check_weights(root, lora_path=lora)
    by_name = {c.name: c for c in report.components}
    assert by_name["DiT"].ok, by_name["DiT"].problems
    assert "1260 tensors in 4 shard(s), bfloat16, 16.30 B parameters" in by_name["DiT"].found
    assert by_name["LoRA"].ok and by_name["LoRA"].found == "448 of 448 target layers, rank 128"
    assert not report.ok and "VAE: " in report.problems[0]  # the rest of the folder is absent


def test_download_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE") as err:
        download_weights(tmp_path / "ckpt")
    assert f"hf download {S2V_REPO}" in str(err.value) and str(tmp_path / "ckpt" / S2V_FOLDER) in str(err.value)
    assert not (tmp_path / "ckpt").exists()

    monkeypatch.delenv("HF_HUB_OFFLINE")
    with socket.socket() as s:  # a port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(WeightsError, match="looks offline") as err:
        download_weights(tmp_path / "ckpt", timeout_s=2)
    assert time.monotonic() - t0 < 5
    assert "Quark-Vision/Live-Avatar liveavatar.safetensors" in str(err.value)
    assert os.listdir(tmp_path) == []


def test_wav2vec2_with_legacy_weight_norm_names(tiny_folder):
    """Older transformers checkpoints (like XLSR-53's) name the positional conv's weight norm weight_g/_v."""
    from safetensors.torch import load_file

    path = tiny_folder / "wav2vec2-large-xlsr-53-english" / "model.safetensors"
    sd = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in load_file(str(path)).items()
    }
    assert any(k.endswith("weight_g") for k in sd)
    save_file(sd, str(path), metadata={"format": "pt"})
    assert check_weights(tiny_folder, model="tiny").ok
    del sd["wav2vec2.encoder.pos_conv_embed.conv.weight_v"]
    save_file(sd, str(path), metadata={"format": "pt"})
    report = check_weights(tiny_folder, model="tiny")
    assert report.problems == [
        "wav2vec2: missing keys: wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original1"
    ]
