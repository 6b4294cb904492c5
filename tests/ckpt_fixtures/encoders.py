"""Tiny encoder-side checkpoints in the upstream layout: Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth,
google/umt5-xxl/ and wav2vec2-large-xlsr-53-english/, as they sit in a Wan2.2-S2V-14B folder.

Key names come from our classes through the same name maps the loaders use; the full-size maps are
checked against the upstream manifests (tests/data/keys), so the tiny files have upstream's layout.
"""

import json
import pathlib

import torch
from transformers import Wav2Vec2CTCTokenizer

from avatar.checkpoints import CheckpointLayout
from avatar.models import wan_vae
from avatar.services.encoder import audio_encoder, text_encoder


def write_vae(root: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Wan2.1_VAE.pth: a plain torch.save dict, upstream names, float32 (as the real file)."""
    layout = CheckpointLayout(pathlib.Path(root))
    model = wan_vae.WanVAE.tiny(seed).model
    sd = model.state_dict()
    upstream = {up: sd[name].clone() for up, name in wan_vae.upstream_key_map(model, wan_vae.TINY_VAE).items()}
    return _save(upstream, layout.vae)


def write_t5(root: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """models_t5_umt5-xxl-enc-bf16.pth: upstream T5Encoder names, bfloat16 (as the real file)."""
    layout = CheckpointLayout(pathlib.Path(root))
    model = text_encoder.TextEncoder.tiny(seed).model
    sd = model.state_dict()
    upstream = {up: sd[name].to(torch.bfloat16).clone() for up, name in text_encoder.upstream_key_map(model).items()}
    return _save(upstream, layout.t5)


def write_tokenizer(root: pathlib.Path) -> pathlib.Path:
    """google/umt5-xxl/: a transformers tokenizer folder (the tiny byte-level tokenizer)."""
    path = CheckpointLayout(pathlib.Path(root)).tokenizer
    text_encoder.byte_tokenizer().save_pretrained(str(path))
    return path


def write_wav2vec2(root: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """wav2vec2-large-xlsr-53-english/: config, preprocessor config, CTC vocab and weights (transformers layout)."""
    path = CheckpointLayout(pathlib.Path(root)).wav2vec2
    enc = audio_encoder.AudioEncoder.tiny(seed)
    enc.model.save_pretrained(str(path))
    enc.feature_extractor.save_pretrained(str(path))
    letters = ["<pad>", "<s>", "</s>", "<unk>", "|", "'"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    vocab = path / "vocab.json"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(letters[: enc.model.config.vocab_size])}))
    Wav2Vec2CTCTokenizer(str(vocab)).save_pretrained(str(path))
    return path


def write_encoder_files(root: pathlib.Path, seed: int = 0) -> CheckpointLayout:
    """Everything but the DiT: VAE, T5, tokenizer and wav2vec2 in a Wan2.2-S2V-14B-shaped folder."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_vae(root, seed)
    write_t5(root, seed)
    write_tokenizer(root)
    write_wav2vec2(root, seed)
    return CheckpointLayout(root)


def _save(sd: dict, path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(sd, tmp)
    tmp.replace(path)
    return path
