"""The audio features' way to the first block: `AudioEncoder.encode` on the sample speech, the time
to its first chunk (what the DiT's first block waits for), the audio model's share of it and the
other chunks; and a live block (`StreamingAudioFeatures.push`). wav2vec2-large's shapes (25 hidden
states x 1024) with random weights on --device (bf16 on a GPU, float32 on the CPU, as the
encoder service loads it).

--stub-model replaces the model's forward by a fixed output of its shape (in bf16, as on a GPU):
what is left is the host side (normalising, gathering, copying), the part that runs on the CPU whatever
the device. Medians of --repeat runs after one warm-up.

    python3 bench/bench_audio_chunks.py --device cuda          # on the device machine
    .venv/bin/python bench/bench_audio_chunks.py --stub-model   # the host side, on any machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import types

import soundfile as sf
import torch

from avatar.services.encoder.audio_encoder import WAV2VEC2_LARGE, AudioEncoder
from avatar.services.encoder.streaming_audio import StreamingAudioFeatures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FPS, BLOCK = 25, 12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stub-model", action="store_true", help="the model's forward replaced by a fixed output")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pcm, rate = sf.read(os.path.join(ROOT, "assets", "speech.wav"), dtype="float32")
    assert rate == 16000, rate
    enc = AudioEncoder.random(WAV2VEC2_LARGE, seed=0, device=device, dtype=dtype)
    frames = len(pcm) * FPS // rate // BLOCK * BLOCK
    if args.stub_model:  # every forward answers with (a prefix of) one fixed output
        # in bf16 as a GPU's wav2vec2 gives them, whatever the device
        states = torch.randn(enc.dims.layers + 1, enc.num_feature_frames(len(pcm)), enc.dims.hidden)
        states = states.to(device, torch.bfloat16)

        def forward(values, output_hidden_states=True):
            n = enc.num_feature_frames(values.shape[-1])
            return types.SimpleNamespace(hidden_states=tuple(states[:, None, :n].unbind(0)))

        enc.model = types.SimpleNamespace(config=enc.model.config, wav2vec2=forward)

    def clip():
        timings: dict = {}
        start = time.perf_counter()
        chunks = enc.encode(pcm, FPS, frames, BLOCK, timings)
        next(chunks)
        first = time.perf_counter()
        for _ in chunks:
            pass
        return (first - start) * 1e3, timings.get("model_ms", 0.0), (time.perf_counter() - first) * 1e3

    stream = StreamingAudioFeatures(enc, FPS, BLOCK)
    block = rate * BLOCK // FPS

    def live_block():  # the sample's blocks in turn, a full 5 s of context after the first ten
        i = stream.blocks % (len(pcm) // block)
        start = time.perf_counter()
        stream.push(pcm[i * block : (i + 1) * block])
        sync(device)
        return (time.perf_counter() - start) * 1e3

    clip()
    runs = [clip() for _ in range(args.repeat)]
    for _ in range(12):
        live_block()
    live = [live_block() for _ in range(args.repeat)]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "stub_model": args.stub_model,
        "audio_s": round(len(pcm) / rate, 3),
        "frames": frames,
        "first_chunk_ms": round(statistics.median(r[0] for r in runs), 2),
        "model_ms": round(statistics.median(r[1] for r in runs), 2),
        "other_chunks_ms": round(statistics.median(r[2] for r in runs), 2),
        "live_block_ms": round(statistics.median(live), 2),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
