"""End to end: the four services as separate OS processes on loopback; a 5 s clip streams as fMP4."""

import pytest
from conftest import ASSETS, check_video, generate

from avatar.v1 import avatar_pb2


def test_five_second_clip_streams_through_separate_processes(mesh, clip_5s, tmp_path):
    request = avatar_pb2.GenerateRequest(
        image=(ASSETS / "astronaut.png").read_bytes(),
        audio=clip_5s.read_bytes(),
        prompt="An astronaut talks to the camera",
        preset="preview",
        size="64*64",
        seed=7,
    )
    s = generate(mesh["gateway"].address, request)

    assert s.header.mime_type.startswith("video/mp4") and s.header.fps == 25
    assert (s.header.width, s.header.height) == (64, 64)
    # block 0 in two fragments (its first 4 frames sooner), every other block in one
    assert (s.header.total_frames, s.header.expected_fragments) == (125, 12)
    assert "noise" in s.header.model
    assert [f.index for _, f in s.fragments] == [0, *range(11)]
    assert [f.num_frames for _, f in s.fragments] == [4, 8] + [12] * 9 + [5]
    assert [f.first_frame for _, f in s.fragments] == [0, 4] + [12 * i for i in range(1, 11)]
    assert [p.blocks_done for p in s.progress] == list(range(1, 12))
    assert (s.status.blocks, s.status.frames) == (11, 125)
    stages = {t.stage: t for t in s.status.timings}
    assert {"encode_image", "encode_text", "encode_audio", "dit_block", "vae_decode", "mux", "send"} <= set(stages)
    assert stages["dit_block"].count == 11 and stages["dit_block"].ms > 0
    assert 0 < s.status.time_to_first_fragment_s < s.status.total_s

    check_video(s.write_mp4(tmp_path / "clip.mp4"), 5.0)

    # Streaming, not buffering: fragment 0 reached this client before the generator (another
    # process, same clock) had finished the last block.
    dit = [sp for sp in mesh["generator"].spans() if sp["name"] == "dit_block" and sp["trace_id"] == s.status.trace_id]
    assert len(dit) == 11
    last_block_done = max(sp["end_unix_nano"] for sp in dit if sp["attributes"]["block"] == 10)
    first_fragment_at = s.fragments[0][0]
    assert first_fragment_at < last_block_done, (
        f"first fragment arrived {(first_fragment_at - last_block_done) / 1e6:.0f} ms after the last block was made"
    )


def _decode_two_blocks(address: str, first_fragment_frames: int = 0) -> list:
    """DecoderService.Decode of a 2-block 64x64 job (zero latents, silent audio): every output."""
    import grpc
    import numpy as np
    import torch

    from avatar import wire
    from avatar.v1 import decoder_pb2, decoder_pb2_grpc, tensor_pb2

    job = tensor_pb2.JobSpec(
        width=64, height=64, fps=25, latent_frames_per_block=3, num_blocks=2, total_frames=24,
        audio_sample_rate=48000, model="tiny", infer_frames=24, sample_steps=1,
    )  # fmt: skip
    pcm = wire.to_proto(np.zeros(12 * 48000 // 25, np.int16))
    start = decoder_pb2.DecodeStart(
        job=job, prime_latent=wire.to_proto(torch.zeros(16, 1, 8, 8)), first_fragment_frames=first_fragment_frames
    )
    inputs = [decoder_pb2.DecoderInput(start=start)]
    inputs += [
        decoder_pb2.DecoderInput(
            block=decoder_pb2.DecodeBlock(
                index=k, latent=wire.to_proto(torch.zeros(16, 3, 8, 8)), pcm=pcm, keep_frames=12
            )
        )
        for k in range(2)
    ]
    with grpc.insecure_channel(address) as channel:
        return list(decoder_pb2_grpc.DecoderServiceStub(channel).Decode(iter(inputs), timeout=120))


def test_the_decoder_says_each_block_is_decoded_before_its_fragment(mesh):
    """The device's half of a block first (the gateway starts the next blocks on it), then the
    encoded fragment: init, decoded 0, fragment 0, decoded 1, fragment 1."""
    outs = _decode_two_blocks(mesh["decoder"].address)
    events = [
        (o.WhichOneof("event"), o.decoded if o.WhichOneof("event") == "decoded" else o.fragment.index) for o in outs
    ]
    assert events == [("init_segment", 0), ("decoded", 0), ("fragment", 0), ("decoded", 1), ("fragment", 1)]
    assert outs[0].first_fragment_frames == 0  # not asked to split: one fragment per block
    assert all(o.fragment.data and o.fragment.vae_ms > 0 for o in outs if o.WhichOneof("event") == "fragment")


def test_the_decoder_sends_block_0s_first_frames_alone_when_asked_and_refuses_a_bad_count(mesh):
    """DecodeStart.first_fragment_frames 4: block 0 as a 4-frame fragment marked continued, then
    its other 8; block 1 whole. A count beyond a block's frames is INVALID_ARGUMENT with the reason."""
    import grpc

    outs = _decode_two_blocks(mesh["decoder"].address, 4)
    assert outs[0].WhichOneof("event") == "init_segment" and outs[0].first_fragment_frames == 4  # what it will do
    frags = [o.fragment for o in outs if o.WhichOneof("event") == "fragment"]
    assert [(f.index, f.num_frames, f.continued) for f in frags] == [(0, 4, True), (0, 8, False), (1, 12, False)]
    assert frags[0].vae_ms > 0 and frags[1].vae_ms == 0 and all(f.mux_ms > 0 and f.data for f in frags)
    with pytest.raises(grpc.RpcError) as e:
        _decode_two_blocks(mesh["decoder"].address, 13)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "first_fragment_frames must be in 0..12, got 13"
