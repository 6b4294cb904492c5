"""Every bad input class, through the real gateway (INVALID_ARGUMENT + a reason a person
understands, before any model work) and through the CLI (exit code 2, one line, no traceback)."""

import concurrent.futures
import io
import struct
import subprocess
import wave
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from avatar.grpc_util import MESSAGE_OPTIONS
from avatar.v1 import avatar_pb2, avatar_pb2_grpc
from tests.conftest import ASSETS, AVATAR, ROOT, Services

pytestmark = pytest.mark.timeout(300)
MAX_AUDIO_S = 3.0


def _png(size=(96, 96), **kw) -> bytes:
    img = Image.new("RGB", size, (120, 80, 60))
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _animated_png() -> bytes:
    a, b = Image.new("RGB", (96, 96), (0, 0, 0)), Image.new("RGB", (96, 96), (255, 255, 255))
    buf = io.BytesIO()
    a.save(buf, "PNG", save_all=True, append_images=[b])
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """Claims w x h pixels in 100 bytes: a decompression bomb before decoding."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    """16-bit PCM WAV; samples float in [-1, 1], shape [n] or [n, channels]."""
    x = samples.reshape(len(samples), -1)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def _float_wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    """IEEE-float WAV (format 3), which can carry NaN and inf."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    return (
        b"RIFF"
        + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data))
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )


def _speech(seconds: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return 0.3 * np.sin(2 * np.pi * 220 * t)


def _channels(n: int) -> bytes:
    """A 0.5 s silent 16-bit WAV claiming n channels (0: a header that lies)."""
    data = bytearray(_wav(np.zeros((8000, max(n, 1)))))
    struct.pack_into("<H", data, 22, n)
    return bytes(data)


def _with_nan():
    x = _speech(1.0).astype(np.float32)
    x[4000] = np.nan
    return _float_wav(x)


def _with_inf():
    x = _speech(1.0).astype(np.float32)
    x[9000] = np.inf
    return _float_wav(x)


IMAGE = (ASSETS / "astronaut.png").read_bytes()
AUDIO = _wav(_speech(1.0))

# (case, request fields that differ from a good request, words the message must hold)
CASES = [
    ("image: empty", dict(image=b""), "image is empty"),
    ("image: text", dict(image=b"just some words, not pixels\n" * 10), "not an image"),
    ("image: wav behind .png", dict(image=AUDIO), "WAV audio file, not an image"),
    ("image: gif", dict(image=b"GIF89a" + bytes(300)), "GIF"),
    ("image: animated png", dict(image=_animated_png()), "animated"),
    ("image: too small", dict(image=_png((40, 300))), "too small"),
    ("image: too large", dict(image=_png_header_only(7000, 7000)), "too large"),
    ("image: decompression bomb", dict(image=_png_header_only(60000, 60000)), "too large"),
    ("image: truncated", dict(image=IMAGE[:3000]), "corrupt or cut short"),
    ("audio: empty", dict(audio=b""), "audio is empty"),
    ("audio: png behind .wav", dict(audio=IMAGE), "PNG image, not audio"),
    ("audio: text", dict(audio=b"hello, this is not audio\n" * 40), "not audio"),
    (
        "audio: random bytes",
        dict(audio=np.random.default_rng(0).integers(0, 256, 20000, np.uint8).tobytes()),
        "not a WAV",
    ),
    ("audio: truncated wav", dict(audio=AUDIO[: len(AUDIO) // 2]), "truncated"),
    ("audio: too short", dict(audio=_wav(_speech(0.05))), "too short"),
    ("audio: too long", dict(audio=_wav(_speech(MAX_AUDIO_S + 1.5), rate=8000)), "too long"),
    ("audio: NaN samples", dict(audio=_with_nan()), "NaN or infinite"),
    ("audio: 0 channels", dict(audio=_channels(0)), "declares 0 channels"),
    ("audio: 2000 channels", dict(audio=_channels(2000)), "declares 2000 channels"),
    ("audio: inf samples", dict(audio=_with_inf()), "NaN or infinite"),
    ("size: 704x384", dict(size="704x384"), "W*H"),
    ("size: 0*0", dict(size="0*0"), "positive"),
    ("size: huge", dict(size="99999*99999"), "too large"),
    ("size: words", dict(size="big*small"), "W*H"),
    ("steps: 51", dict(sample_steps=51), "sample_steps must be between 1 and 50"),
    ("steps: negative", dict(sample_steps=-1), "sample_steps"),
    ("clips: negative", dict(num_clip=-1), "num_clip"),
    ("frames: negative", dict(infer_frames=-12), "infer_frames"),
    ("frames: huge", dict(infer_frames=1_000_000), "infer_frames 1000000 is too large"),
    ("prompt: oversized", dict(prompt="talk " * 2000), "prompt is too long"),
    ("preset: unknown", dict(preset="ultra"), "unknown preset 'ultra'"),
]
_IDS = [c[0] for c in CASES]


def _request(fields: dict) -> avatar_pb2.GenerateRequest:
    base = dict(image=IMAGE, audio=AUDIO, size="64*64")
    base.update(fields)
    return avatar_pb2.GenerateRequest(**base)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, env):
    services = Services(tmp_path_factory.mktemp("bad-input"), env)
    try:
        svc = services.start("all", "--max-audio-s", str(MAX_AUDIO_S), "--metrics-port", "0")
        yield svc
    finally:
        services.stop_all()


@pytest.mark.parametrize("case,fields,words", CASES, ids=_IDS)
def test_gateway_refuses_bad_input(gateway, case, fields, words):
    with grpc.insecure_channel(gateway.address, options=MESSAGE_OPTIONS) as ch:
        stub = avatar_pb2_grpc.AvatarServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            for _ in stub.Generate(_request(fields), timeout=60):
                pass
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, e.value.details())
    assert words in e.value.details(), (case, e.value.details())
    assert "Traceback" not in e.value.details() and len(e.value.details()) < 300


def _cli_args(tmp, case, fields):
    """The CLI flags and input files for one case (bytes go to files with the 'right' extension)."""
    slug = "".join(c if c.isalnum() else "_" for c in case)
    image, audio = tmp / f"{slug}.png", tmp / f"{slug}.wav"
    image.write_bytes(fields.get("image", IMAGE))
    audio.write_bytes(fields.get("audio", AUDIO))
    args = ["--image", str(image), "--audio", str(audio), "--size", fields.get("size", "64*64")]
    for key in ("sample_steps", "num_clip", "infer_frames"):
        if key in fields:
            args += [f"--{key}", str(fields[key])]
    if "prompt" in fields:
        args += ["--prompt", fields["prompt"]]
    if "preset" in fields:
        args += ["--preset", fields["preset"]]
    return args


def test_cli_exits_2_with_one_line(gateway, tmp_path, env):
    def run(case_fields_words):
        case, fields, words = case_fields_words
        out = tmp_path / "out" / f"{abs(hash(case))}.mp4"
        r = subprocess.run(
            [
                *AVATAR,
                "generate",
                *_cli_args(tmp_path, case, fields),
                "--server",
                gateway.address,
                "--out",
                str(out),
                "--timeout",
                "60",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env=env,
        )
        return case, words, r, out

    cli_cases = [c for c in CASES if c[0] != "preset: unknown"]  # argparse's own choices check, below
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, cli_cases))
    for case, words, r, out in results:
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2, (case, r.stderr)
        assert len(lines) == 1, (case, r.stderr)
        assert lines[0].startswith("avatar generate: error:") and words in lines[0], (case, lines[0])
        assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "nothing half-written"
    r = subprocess.run(
        [
            *AVATAR,
            "generate",
            "--image",
            "a.png",
            "--audio",
            "a.wav",
            "--preset",
            "ultra",
            "--out",
            str(tmp_path / "x.mp4"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert r.returncode == 2 and "invalid choice: 'ultra'" in r.stderr


def test_bad_input_costs_no_model_work(gateway):
    """Refusals happen in the gateway: the encoder, generator and decoder never see the request."""
    import urllib.request

    with grpc.insecure_channel(gateway.address, options=MESSAGE_OPTIONS) as ch:
        with pytest.raises(grpc.RpcError):
            for _ in avatar_pb2_grpc.AvatarServiceStub(ch).Generate(_request(dict(size="0*0")), timeout=60):
                pass
    log = gateway.log.read_text()
    port = int(log.split("metrics on :")[1].split("/")[0])
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    refused = [
        line
        for line in text.splitlines()
        if line.startswith("avatar_requests_total") and 'code="INVALID_ARGUMENT"' in line
    ]
    assert refused and all('service="AvatarService"' in line for line in refused), refused
    assert "EncoderService" not in text and "GeneratorService" not in text
