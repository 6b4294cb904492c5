"""avatar.media: every audio and image format decodes right; every bad input class is refused clearly."""

import io
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from avatar import media
from avatar.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[1]
SPEECH = ROOT / "assets" / "speech.wav"
PORTRAIT = ROOT / "assets" / "astronaut.png"
CLIP_S = 1.5

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")


def _ffmpeg(*args) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *map(str, args)], check=True)


def _wav(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def _speech_16k() -> np.ndarray:
    samples, rate = sf.read(SPEECH, dtype="float32")
    assert rate == 16000 and samples.ndim == 1
    return samples[: round(CLIP_S * rate)]


# (name, ffmpeg output options, container extension, duration tolerance in s)
AUDIO_FORMATS = [
    ("wav_44k_stereo", ["-ar", "44100", "-ac", "2", "-c:a", "pcm_s16le"], "wav", 0.001),
    ("wav_32k_3ch_float", ["-ar", "32000", "-ac", "3", "-c:a", "pcm_f32le"], "wav", 0.001),
    ("wav_8k_u8", ["-ar", "8000", "-c:a", "pcm_u8"], "wav", 0.001),
    ("wav_24bit_6ch", ["-ar", "48000", "-ac", "6", "-c:a", "pcm_s24le"], "wav", 0.001),
    ("flac_22k", ["-ar", "22050", "-c:a", "flac"], "flac", 0.001),
    ("mp3_44k_stereo", ["-ar", "44100", "-ac", "2", "-c:a", "libmp3lame"], "mp3", 0.03),
    ("ogg_vorbis", ["-ar", "44100", "-c:a", "libvorbis"], "ogg", 0.03),
    ("ogg_opus", ["-c:a", "libopus"], "opus", 0.03),
    ("m4a_aac_24k", ["-ar", "24000", "-c:a", "aac"], "m4a", 0.03),
    ("adts_aac", ["-c:a", "aac"], "aac", 0.15),  # raw ADTS has no gapless info: priming stays
    ("webm_opus", ["-c:a", "libopus"], "webm", 0.03),
]


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory) -> dict[str, bytes]:
    if shutil.which("ffmpeg") is None:
        pytest.skip("needs ffmpeg")
    d = tmp_path_factory.mktemp("audio")
    files = {}
    for name, opts, ext, _ in AUDIO_FORMATS:
        path = d / f"{name}.{ext}"
        _ffmpeg("-i", SPEECH, "-t", CLIP_S, *opts, path)
        files[name] = path.read_bytes()
    video_only = d / "video_only.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=25:duration=1", "-c:v", "libx264", video_only)
    files["video_only"] = video_only.read_bytes()
    return files


# ------------------------------------------------------------------------------------- audio
@needs_ffmpeg
@pytest.mark.parametrize("name,tolerance", [(n, tol) for n, _, _, tol in AUDIO_FORMATS])
def test_every_audio_format_decodes_to_mono_with_the_right_duration(audio_files, name, tolerance):
    audio = media.decode_audio(audio_files[name])
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert abs(audio.duration_s - CLIP_S) <= tolerance, audio.duration_s
    # it is the speech: back at 16 kHz it follows the original closely (lossy codecs a little less)
    original = _speech_16k()
    back = media.resample(audio.samples, audio.sample_rate, 16000)
    n = len(original) - 2400
    lag = int(np.argmax(np.correlate(back[: n + 2400], original[:n], "valid")))
    corr = np.corrcoef(back[lag : lag + n], original[:n])[0, 1]
    assert corr > (0.99 if name.startswith(("wav", "flac")) else 0.9), corr
    # starts on time: within 8 ms (webm's Opus pre-skip leaves ~4 ms), except raw ADTS, which has
    # no way to say that the encoder's priming is not part of the audio
    assert lag <= 128 or name == "adts_aac", f"audio starts {lag / 16:.0f} ms late"


def test_channels_are_averaged():
    x = np.sin(np.linspace(0, 60, 8000)).astype(np.float32) * 0.5
    three = np.stack([x, x, x], axis=1)
    assert np.allclose(media.decode_audio(_wav(three, 16000, "FLOAT")).samples, x, atol=1e-6)
    one_of_five = np.stack([x] + [np.zeros_like(x)] * 4, axis=1)
    assert np.allclose(media.decode_audio(_wav(one_of_five, 16000, "FLOAT")).samples, x / 5, atol=1e-6)


def test_silence_is_fine():
    audio = media.decode_audio(_wav(np.zeros(16000, np.float32), 16000))
    assert audio.duration_s == 1.0 and not audio.samples.any()


def _truncate(data: bytes, frac: float = 0.6) -> bytes:
    return data[: int(len(data) * frac)]


def _corrupt(data: bytes) -> bytes:
    b = bytearray(data)
    rng = np.random.default_rng(1)
    mid = len(b) // 3
    b[mid : mid + 1500] = rng.integers(0, 256, 1500, dtype=np.uint8).tobytes()
    return bytes(b)


def _nan_wav() -> bytes:
    x = np.zeros(16000, np.float32)
    x[5000] = np.nan
    return _wav(x, 16000, "FLOAT")


def _inf_wav() -> bytes:
    x = np.zeros((16000, 2), np.float32)
    x[9000, 1] = np.inf
    return _wav(x, 16000, "FLOAT")


BAD_AUDIO = [  # (case, bytes from the fixtures -> bad bytes, words the message must hold)
    ("empty", lambda f: b"", "empty"),
    ("png image", lambda f: PORTRAIT.read_bytes(), "PNG image, not audio"),
    ("gif image", lambda f: b"GIF89a" + bytes(200), "GIF image, not audio"),
    ("text", lambda f: b"hello, this is a text file\n" * 20, "text, not audio"),
    (
        "random bytes",
        lambda f: np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes(),
        "unrecognised binary data, not a WAV",
    ),
    ("HLS playlist", lambda f: b"#EXTM3U\n#EXTINF:1,\nfile:///etc/hostname\n", "text, not audio"),
    ("binary HLS playlist", lambda f: b"#EXTM3U\n\x01\x02\n#EXTINF:1,\nfile:///etc/hostname\n", "not a WAV"),
    ("video without audio", lambda f: f["video_only"], "no audio stream"),
    ("truncated wav", lambda f: _truncate(f["wav_44k_stereo"]), "truncated"),
    ("wav header only", lambda f: f["wav_44k_stereo"][:40], "could not be read"),
    ("truncated flac", lambda f: _truncate(f["flac_22k"]), "corrupt"),
    ("truncated mp3", lambda f: _truncate(f["mp3_44k_stereo"]), "truncated"),
    ("truncated ogg", lambda f: _truncate(f["ogg_vorbis"]), "cut short"),
    ("truncated opus", lambda f: _truncate(f["ogg_opus"], 0.95), "cut short"),
    ("truncated m4a", lambda f: _truncate(f["m4a_aac_24k"]), "corrupt or cut short"),
    ("corrupt flac", lambda f: _corrupt(f["flac_22k"]), "corrupt"),
    ("corrupt ogg", lambda f: _corrupt(f["ogg_vorbis"]), "checksum"),
    ("corrupt mp3", lambda f: _corrupt(f["mp3_44k_stereo"]), "corrupt"),
    ("too short", lambda f: _wav(np.zeros(1600, np.float32), 16000), "too short"),
    ("NaN samples", lambda f: _nan_wav(), "NaN or infinite"),
    ("inf samples", lambda f: _inf_wav(), "NaN or infinite"),
]


@needs_ffmpeg
@pytest.mark.parametrize("case,make,words", BAD_AUDIO, ids=[c[0] for c in BAD_AUDIO])
def test_bad_audio_is_refused_with_a_reason(audio_files, case, make, words):
    with pytest.raises(InvalidInput, match=words):
        media.decode_audio(make(audio_files))


def test_too_long_audio_is_refused_against_the_configured_cap():
    with pytest.raises(InvalidInput, match="too long: 3.0 s, the limit is 2 s"):
        media.decode_audio(_wav(np.zeros(48000, np.float32), 16000), max_duration_s=2)
    # the default cap holds 10 minutes
    assert media.MAX_AUDIO_S == 600


@pytest.mark.parametrize("src,dst", [(48000, 16000), (16000, 48000), (44100, 16000), (22050, 48000)])
def test_resample_keeps_length_pitch_and_level(src, dst):
    t = np.arange(src) / src  # 1 s of a 1 kHz tone
    x = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    y = media.resample(x, src, dst)
    assert y.dtype == np.float32 and len(y) == dst
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert abs(np.argmax(spectrum) - 1000) <= 1  # 1 s of signal: bin k = k Hz
    mid = y[dst // 10 : -dst // 10]
    assert abs(np.sqrt(np.mean(mid**2)) - 0.5 / np.sqrt(2)) < 0.01
    # a tone above the new Nyquist is filtered out, not folded back
    if dst < src:
        hi = (0.5 * np.sin(2 * np.pi * (dst * 0.6) * t)).astype(np.float32)
        assert np.sqrt(np.mean(media.resample(hi, src, dst)[dst // 10 : -dst // 10] ** 2)) < 0.01


def test_to_pcm16_clips():
    assert media.to_pcm16(np.array([0.0, 0.5, -2.0, 2.0])).tolist() == [0, 16384, -32767, 32767]


# ------------------------------------------------------------------------------------- images
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _portrait(size=(160, 120)) -> Image.Image:
    return Image.open(PORTRAIT).convert("RGB").resize(size)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_supported_image_formats_decode_to_rgb(fmt):
    img = media.load_image(_encode(_portrait(), fmt))
    assert img.mode == "RGB" and img.size == (160, 120)
    diff = np.abs(np.asarray(img, np.int16) - np.asarray(_portrait(), np.int16)).mean()
    assert diff < (0.01 if fmt == "PNG" else 8)


def test_exif_orientation_is_applied():
    # stored 200x100: left half red, right half blue; orientation 6 = show rotated 90 degrees clockwise
    stored = Image.new("RGB", (200, 100), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    img = media.load_image(_encode(stored, "JPEG", exif=exif, quality=95))
    assert img.size == (100, 200)
    top, bottom = np.asarray(img)[20, 50], np.asarray(img)[180, 50]
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_alpha_is_flattened_onto_white():
    rgba = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    rgba.paste((200, 10, 10, 255), (0, 0, 50, 100))
    rgba.paste((0, 0, 200, 128), (50, 0, 100, 100))
    arr = np.asarray(media.load_image(_encode(rgba, "PNG")))
    assert arr.shape == (100, 100, 3)
    assert tuple(arr[50, 10]) == (200, 10, 10)  # opaque: unchanged
    assert np.abs(arr[50, 80].astype(int) - (127, 127, 227)).max() <= 2  # half: blended with white
    la = Image.new("LA", (80, 80), (0, 0))  # fully transparent grey: white
    assert (np.asarray(media.load_image(_encode(la, "PNG"))) == 255).all()
    webp = media.load_image(_encode(rgba, "WEBP", lossless=True))
    assert tuple(np.asarray(webp)[50, 10]) == (200, 10, 10)


def test_palette_16bit_and_cmyk_images_become_rgb():
    p = _portrait().convert("P")
    assert media.load_image(_encode(p, "PNG")).mode == "RGB"
    grey16 = Image.fromarray(np.full((70, 70), 65535 // 2, np.uint16))
    arr = np.asarray(media.load_image(_encode(grey16, "PNG")))
    assert abs(int(arr[0, 0, 0]) - 128) <= 1  # scaled from 16 bits, not clipped to 255
    cmyk = _portrait().convert("CMYK")
    assert media.load_image(_encode(cmyk, "JPEG")).mode == "RGB"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a size, with no pixel data: what a decompression bomb looks like
    before decoding."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


BAD_IMAGES = [
    ("empty", lambda: b"", "empty"),
    ("text", lambda: b"just some words", "text, not an image"),
    ("audio", lambda: SPEECH.read_bytes(), "WAV audio file, not an image"),
    ("random", lambda: np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "not an image"),
    ("gif", lambda: _encode(_portrait(), "GIF"), "GIF is not supported"),
    ("bmp", lambda: _encode(_portrait(), "BMP"), "BMP is not supported"),
    ("tiff", lambda: _encode(_portrait(), "TIFF"), "TIFF is not supported"),
    (
        "animated png",
        lambda: _encode(_portrait(), "PNG", save_all=True, append_images=[_portrait().rotate(90)]),
        "animated",
    ),
    (
        "animated webp",
        lambda: _encode(_portrait(), "WEBP", save_all=True, append_images=[_portrait().rotate(90)]),
        "animated",
    ),
    ("too small", lambda: _encode(_portrait((40, 300)), "PNG"), "too small: 40x300"),
    ("truncated png", lambda: _encode(_portrait(), "PNG")[:3000], "corrupt or cut short"),
    ("truncated jpeg", lambda: _encode(_portrait(), "JPEG")[:1500], "corrupt or cut short"),
    ("png header cut", lambda: _encode(_portrait(), "PNG")[:20], "PNG image but is corrupt"),
    ("too large", lambda: _png_header_only(7000, 7000), "too large: 7000x7000 = 49.0 megapixels"),
    ("decompression bomb", lambda: _png_header_only(30000, 30000), "too large"),
]


@pytest.mark.parametrize("case,make,words", BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_bad_images_are_refused_with_a_reason(case, make, words):
    with pytest.raises(InvalidInput, match=words):
        media.load_image(make())


def test_image_pixel_cap_is_configurable():
    with pytest.raises(InvalidInput, match="too large"):
        media.load_image(_encode(_portrait(), "PNG"), max_pixels=10_000)


# ------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    "text,size", [("704*384", (704, 384)), (" 384 * 256 ", (384, 256)), ("1920*1920", (1920, 1920))]
)
def test_parse_size(text, size):
    assert media.parse_size(text) == size


@pytest.mark.parametrize(
    "text,words",
    [
        ("704x384", "W\\*H"),
        ("704", "W\\*H"),
        ("", "W\\*H"),
        ("a*b", "W\\*H"),
        ("704*-384", "W\\*H"),
        ("1.5*2", "W\\*H"),
        ("0*0", "positive"),
        ("0*384", "positive"),
        ("4000*4000", "too large"),
    ],
)
def test_bad_sizes(text, words):
    with pytest.raises(InvalidInput, match=words):
        media.parse_size(text)


# Values from LiveAvatar's get_size_less_than_area (commit 9c2c38d) for divisor 64:
# image (w, h), area (w, h) -> output (W, H).
UPSTREAM_SIZES = [
    ((512, 512), (704, 384), (512, 512)),
    ((512, 512), (384, 256), (256, 256)),
    ((1024, 768), (704, 384), (576, 448)),
    ((768, 1024), (704, 384), (448, 576)),
    ((1920, 1080), (704, 384), (704, 384)),
    ((1080, 1920), (704, 384), (384, 704)),
    ((1920, 1080), (1280, 720), (1280, 704)),
    ((300, 300), (704, 384), (320, 320)),
    ((640, 480), (1280, 720), (640, 512)),
    ((4000, 3000), (1280, 720), (1088, 832)),
    ((333, 777), (704, 384), (320, 768)),
    ((2000, 500), (384, 256), (576, 128)),
    ((2000, 500), (1280, 720), (1792, 448)),
]


@pytest.mark.parametrize("image,area,expected", UPSTREAM_SIZES)
def test_plan_size_matches_upstream(image, area, expected):
    assert media.plan_size(*image, *area, 64) == expected


@pytest.mark.parametrize("divisor", [16, 64])
def test_plan_size_properties(divisor):
    rng = np.random.default_rng(0)
    for _ in range(300):
        iw, ih = (int(v) for v in rng.integers(64, 5000, 2))
        aw, ah = [(704, 384), (384, 256), (96, 64), (1280, 720)][int(rng.integers(4))]
        w, h = media.plan_size(iw, ih, aw, ah, divisor)
        assert w % divisor == 0 and h % divisor == 0 and w * h <= aw * ah
        if iw * ih > aw * ah:  # downscaled: uses most of the area (within padding)
            assert (w + divisor) * (h + divisor) > aw * ah * 0.9


def test_fit_image_covers_then_crops_the_centre():
    # 300x100: a 100 px wide green band in the middle between red and blue
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 255, 0), (100, 0, 200, 100))
    img.paste((0, 0, 255), (200, 0, 300, 100))
    out = media.fit_image(img, 64, 64)  # a square frame: only the middle fits
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out[:, 8:56, 1] > 200).all() and (out[:, 8:56, 0] < 60).all()
    wide = media.fit_image(img, 96, 32)  # same aspect: everything, scaled
    assert wide.shape == (32, 96, 3)
    assert wide[16, 5, 0] > 200 and wide[16, 48, 1] > 200 and wide[16, 90, 2] > 200
