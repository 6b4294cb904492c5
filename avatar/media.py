"""Media input: decode and validate audio and image bytes, plan the output size (no grpc here).

Every rejection raises avatar.errors.InvalidInput with a sentence a person can act on.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zlib
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from avatar.errors import InvalidInput

# ---------------------------------------------------------------------------------------------
# limits (callers may pass their own)
MIN_AUDIO_S = 0.2  # 5 video frames; anything shorter is not speech
MAX_AUDIO_S = 600.0  # default cap; the gateway passes its configured value
MIN_IMAGE_SIDE = 64  # pixels
MAX_IMAGE_PIXELS = 40_000_000
MAX_SIZE_AREA = 1920 * 1920  # the largest "W*H" area a job may ask for
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white (a neutral portrait backdrop)


_MAGIC = [  # (prefix, offset, what it is), generic before specific: the last match wins
    (b"RIFF", 0, "a RIFF file"),
    (b"WAVE", 8, "a WAV audio file"),
    (b"WEBP", 8, "a WebP image"),
    (b"\x89PNG\r\n\x1a\n", 0, "a PNG image"),
    (b"\xff\xd8\xff", 0, "a JPEG image"),
    (b"GIF87a", 0, "a GIF image"),
    (b"GIF89a", 0, "a GIF image"),
    (b"II*\x00", 0, "a TIFF image"),
    (b"MM\x00*", 0, "a TIFF image"),
    (b"%PDF", 0, "a PDF document"),
    (b"PK\x03\x04", 0, "a ZIP archive"),
    (b"fLaC", 0, "a FLAC audio file"),
    (b"OggS", 0, "an Ogg file"),
    (b"ID3", 0, "an MP3 audio file"),
    (b"ftyp", 4, "an MP4/M4A file"),
    (b"\x1a\x45\xdf\xa3", 0, "a Matroska/WebM file"),
]


def describe_bytes(data: bytes) -> str:
    """A short guess at what some bytes are, for error messages: 'a PNG image', 'text'..."""
    best = ""
    for magic, offset, what in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            best = what
    if data[:2] == b"BM" and len(data) > 14 and data[14] in (12, 40, 52, 56, 64, 108, 124):
        best = "a BMP image"  # "BM" + a known DIB header size
    if best:
        return best
    head = data[:4096]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut at the end of the window
            return "unrecognised binary data"
        text = head[: e.start].decode("utf-8")
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return "text"
    return "unrecognised binary data"


# ---------------------------------------------------------------------------------------------
# audio
@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32 [n], mono, nominally in [-1, 1]
    sample_rate: int  # Hz

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


def _to_float(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(arr.dtype, np.integer):
        return (arr.astype(np.float64) / float(2 ** (8 * arr.dtype.itemsize - 1))).astype(np.float32)
    return arr.astype(np.float32)


def _frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """Mono float32 samples of a decoded frame of any sample format and channel count."""
    channels = frame.layout.nb_channels
    if channels < 1:
        raise InvalidInput("audio stream has no channels")
    arr = frame.to_ndarray()
    if not frame.format.is_planar:  # packed: [1, n * channels], interleaved
        arr = arr.reshape(-1, channels).T
    arr = _to_float(arr)
    # a plain average keeps the level of a mono source copied to every channel and never clips
    if channels > 1:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf are rejected later
            return arr.mean(axis=0, dtype=np.float32)
    return arr[0]


WAV_MAX_CHANNELS = 512  # ffmpeg's sane limit; a header past it is damage, not a recording


def _wav_chunks(data: bytes):
    """(kind, offset of the payload, declared size) of each chunk of a RIFF/WAVE file."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    pos = 12
    while pos + 8 <= len(data):
        kind, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        yield kind, pos + 8, size
        pos += 8 + size + (size & 1)


def _wav_missing_bytes(data: bytes) -> int:
    """Bytes of PCM a WAV header promises beyond the end of the file (0 if complete or unknown)."""
    for kind, at, size in _wav_chunks(data):
        if kind == b"data":
            if size in (0, 0xFFFFFFFF):  # streaming writers leave the size unset
                return 0
            return max(0, at + size - len(data))
    return 0


def _check_wav_channels(data: bytes) -> None:
    """A WAV whose header declares no channels, or thousands, gets a reason rather than ffmpeg's
    'Invalid argument'."""
    for kind, at, size in _wav_chunks(data):
        if kind == b"fmt " and size >= 4 and at + 4 <= len(data):
            channels = struct.unpack("<H", data[at + 2 : at + 4])[0]
            if channels == 0:
                raise InvalidInput("audio is corrupt: the WAV header declares 0 channels")
            if channels > WAV_MAX_CHANNELS:
                raise InvalidInput(
                    f"audio is corrupt: the WAV header declares {channels} channels "
                    f"(at most {WAV_MAX_CHANNELS} are read)"
                )
            return


_BIT_REVERSED = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _ogg_crc(page: bytes) -> int:
    """Ogg's CRC-32 (MSB-first, init 0, no final xor) via zlib's reflected one on reversed bits."""
    raw = zlib.crc32(page.translate(_BIT_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{raw:032b}"[::-1], 2)


def _ogg_damage(data: bytes) -> str | None:
    """Why an Ogg file is damaged (a page cut short or failing its checksum), or None.

    ffmpeg silently skips such pages, which would lose audio without a word.
    """
    pos = 0
    while pos < len(data):
        if data[pos : pos + 4] != b"OggS" or pos + 27 > len(data):
            return f"unexpected bytes at offset {pos}"
        segments = data[pos + 26]
        body = sum(data[pos + 27 : pos + 27 + segments])
        end = pos + 27 + segments + body
        if pos + 27 + segments > len(data) or end > len(data):
            return f"the last page is cut short at offset {pos}"
        page = data[pos:end]
        if struct.unpack("<I", page[22:26])[0] != _ogg_crc(page[:22] + bytes(4) + page[26:]):
            return f"the page at offset {pos} fails its checksum"
        pos = end
    return None


def _mp3_has_length_header(data: bytes) -> bool:
    """True if an MP3 states its length (Xing/Info/VBRI frame); else ffmpeg guesses from bitrate."""
    start = 0
    if data[:3] == b"ID3" and len(data) >= 10:  # skip the ID3v2 tag (syncsafe size)
        start = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(data[6:10]))
    head = data[start : start + 4096]
    return any(tag in head for tag in (b"Xing", b"Info", b"VBRI"))


def _audio_format(data: bytes) -> str | None:
    """The ffmpeg demuxer for these bytes, from their signature; None if not a format we take."""
    if data[:3] == b"ID3" and len(data) >= 10:  # ID3v2 tag (syncsafe size) before MP3 or FLAC
        tag = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(data[6:10]))
        return "flac" if data[tag : tag + 4] == b"fLaC" else "mp3"
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] == b"OggS":
        return "ogg"
    if data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xF6 == 0xF0:  # ADTS: layer bits 00
        return "aac"
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:  # MPEG audio frame sync
        return "mp3"
    return None


def decode_audio(
    data: bytes, *, min_duration_s: float = MIN_AUDIO_S, max_duration_s: float = MAX_AUDIO_S
) -> DecodedAudio:
    """Decodes wav/flac/mp3/ogg (vorbis, opus)/m4a (aac) bytes to mono float32 at the file's rate."""
    if not data:
        raise InvalidInput("audio is empty (0 bytes)")
    what = describe_bytes(data)
    if what.endswith("image") or what in ("a PDF document", "a ZIP archive", "text"):
        raise InvalidInput(f"audio input is {what}, not audio: send WAV, FLAC, MP3, OGG or M4A")
    fmt = _audio_format(data)
    if fmt is None:
        raise InvalidInput(f"audio input is {what}, not a WAV, FLAC, MP3, OGG or M4A file")
    _check_wav_channels(data)
    try:
        # the demuxer is named, never guessed: probing would also try playlist formats (HLS,
        # concat) that open other files and URLs named inside the data
        container = av.open(io.BytesIO(data), mode="r", format=fmt)
    except av.FFmpegError:
        raise InvalidInput(f"audio could not be read: it looks like {what} but is corrupt or cut short") from None
    with container:
        if not container.streams.audio:
            extra = " (it holds only video)" if container.streams.video else ""
            raise InvalidInput(f"the file has no audio stream{extra}")
        stream = container.streams.audio[0]
        declared = None
        if stream.duration is not None and stream.time_base is not None:
            declared = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            declared = container.duration / av.time_base
        if declared is not None and declared > max_duration_s + 1.0:
            raise InvalidInput(f"audio is too long: {declared:.1f} s, the limit is {max_duration_s:.0f} s")
        chunks, rate, total = [], None, 0
        try:
            for frame in container.decode(stream):
                mono = _frame_to_mono(frame)
                if rate is None:
                    rate = frame.sample_rate
                elif frame.sample_rate != rate:  # rare: a stream that changes rate midway
                    mono = resample(mono, frame.sample_rate, rate)
                chunks.append(mono)
                total += len(mono)
                if total > (max_duration_s + 1.0) * rate:
                    raise InvalidInput(f"audio is too long: more than {max_duration_s:.0f} s")
        except av.FFmpegError as e:
            at = f" at {total / rate:.2f} s" if rate else ""
            raise InvalidInput(f"audio is corrupt: decoding failed{at} ({e.strerror or e})") from None
        fmt = container.format.name
    if rate is None or total == 0:
        raise InvalidInput("audio stream holds no samples (empty, corrupt or cut short)")
    samples = np.concatenate(chunks)
    duration = total / rate
    missing = _wav_missing_bytes(data)
    if missing > 1024:  # some writers count the header in the data size: forgive a few ms
        raise InvalidInput(
            f"audio is truncated: the WAV header promises {missing} more bytes "
            f"than the file holds (it ends at {duration:.2f} s)"
        )
    if fmt == "ogg" and (damage := _ogg_damage(data)):
        raise InvalidInput(f"audio is corrupt or truncated: {damage}")
    # MP3 without a length header and raw ADTS only have a bitrate guess of their length
    trusted = fmt not in ("mp3", "aac") or (fmt == "mp3" and _mp3_has_length_header(data))
    if trusted and declared is not None and declared - duration > max(0.05, 0.01 * declared):
        raise InvalidInput(
            f"audio is corrupt or truncated: the file says {declared:.2f} s but only {duration:.2f} s decode"
        )
    if trusted and declared is not None and total > round(declared * rate):
        # the decoder returns the codec's padding after the end (AAC in MP4: up to 1023 samples)
        samples = samples[: round(declared * rate)]
        duration = len(samples) / rate
    if not np.isfinite(samples).all():
        raise InvalidInput("audio contains NaN or infinite samples (a broken float WAV?)")
    if duration < min_duration_s:
        raise InvalidInput(f"audio is too short: {duration:.3f} s, at least {min_duration_s} s needed")
    if duration > max_duration_s:
        raise InvalidInput(f"audio is too long: {duration:.1f} s, the limit is {max_duration_s:.0f} s")
    return DecodedAudio(samples=samples, sample_rate=int(rate))


def resample(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Mono float32 resampling with libswresample; the result has round(n * dst / src) samples."""
    samples = np.asarray(samples, dtype=np.float32)
    if src_rate <= 0 or dst_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
    if src_rate == dst_rate or len(samples) == 0:
        return samples.copy()
    want = round(len(samples) * dst_rate / src_rate)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=dst_rate)
    out = []
    step = 1 << 16  # frame-sized pieces keep the resampler's buffers small
    for start in range(0, len(samples), step):
        frame = av.AudioFrame.from_ndarray(samples[None, start : start + step], format="flt", layout="mono")
        frame.sample_rate = src_rate
        out += [f.to_ndarray()[0] for f in resampler.resample(frame)]
    out += [f.to_ndarray()[0] for f in resampler.resample(None)]
    y = np.concatenate(out) if out else np.zeros(0, np.float32)
    # the filter's flush may leave a sample or two more or less than the exact ratio
    if len(y) >= want:
        return np.ascontiguousarray(y[:want])
    return np.concatenate([y, np.zeros(want - len(y), np.float32)])


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16, clipping what lies outside."""
    return (np.clip(np.asarray(samples, np.float32), -1.0, 1.0) * 32767.0).round().astype(np.int16)


# ---------------------------------------------------------------------------------------------
# image
def load_image(data: bytes, *, min_side: int = MIN_IMAGE_SIDE, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decodes PNG/JPEG/WebP bytes to an RGB image, upright (EXIF) and with alpha on white."""
    if not data:
        raise InvalidInput("image is empty (0 bytes)")
    what = describe_bytes(data)
    try:
        # only our three decoders are tried: Pillow's others (EPS runs Ghostscript) never see the data
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise InvalidInput(
            f"image is too large (a decompression bomb?): the limit is {max_pixels / 1e6:.0f} megapixels"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        if what in ("a PNG image", "a JPEG image", "a WebP image"):
            raise InvalidInput(f"image could not be read: it looks like {what} but is corrupt or cut short") from None
        if what.endswith("image"):  # "a GIF image" -> "GIF"
            raise InvalidInput(f"image format {what.split()[1]} is not supported: send PNG, JPEG or WebP") from None
        raise InvalidInput(f"image input is {what}, not an image: send PNG, JPEG or WebP") from None
    if getattr(img, "n_frames", 1) > 1 or getattr(img, "is_animated", False):
        raise InvalidInput("animated images are not supported: send a single still frame")
    w, h = img.size
    if w * h > max_pixels:  # checked from the header, before any pixel is decoded
        raise InvalidInput(
            f"image is too large: {w}x{h} = {w * h / 1e6:.1f} megapixels, the limit is {max_pixels / 1e6:.0f}"
        )
    if min(w, h) < min_side:
        raise InvalidInput(f"image is too small: {w}x{h}, each side needs at least {min_side} px")
    try:
        img.load()
    except Image.DecompressionBombError:
        raise InvalidInput(
            f"image is too large (a decompression bomb?): the limit is {max_pixels / 1e6:.0f} megapixels"
        ) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidInput(f"image is corrupt or cut short ({e})") from None
    img = ImageOps.exif_transpose(img)
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale, don't clip
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------------
# sizes
_SIZE_RE = re.compile(r"\s*([0-9]+)\s*\*\s*([0-9]+)\s*")  # ASCII digits: int() would take any script's


def parse_size(text: str, *, max_area: int = MAX_SIZE_AREA) -> tuple[int, int]:
    """'704*384' -> (704, 384): a pixel area W*H, as upstream's --size."""
    m = _SIZE_RE.fullmatch(text or "")
    if not m:
        raise InvalidInput(f"size must be written W*H with whole numbers, e.g. 704*384 (got {text!r})")
    w, h = int(m.group(1)), int(m.group(2))
    if w <= 0 or h <= 0:
        raise InvalidInput(f"size {text!r}: width and height must be positive")
    if w * h > max_area:
        raise InvalidInput(
            f"size {w}*{h} is too large: {w * h} pixels, the limit is {max_area} "
            f"(e.g. {int(math.isqrt(max_area))}*{int(math.isqrt(max_area))})"
        )
    return w, h


def _round_up(x: int, divisor: int) -> int:
    return max(divisor, -(-x // divisor) * divisor)


def plan_size(image_w: int, image_h: int, area_w: int, area_h: int, divisor: int) -> tuple[int, int]:
    """The output (W, H): the image's aspect, sides rounded up to multiples of divisor, W*H within
    the area area_w*area_h. Images smaller than the area are not enlarged (as upstream).

    Same rule and results as LiveAvatar's get_size_less_than_area: try 100 scales from the
    unpadded fit down to the scale where worst-case padding still fits, keep the first that fits.
    """
    if min(image_w, image_h, area_w, area_h, divisor) <= 0:
        raise ValueError("sizes and divisor must be positive")
    area = area_w * area_h
    if area < divisor * divisor:
        raise InvalidInput(f"size {area_w}*{area_h} is smaller than one {divisor}x{divisor} tile")
    pixels = image_w * image_h
    if pixels <= area:
        hi, lo = 1.0, 0.1
    else:
        hi = math.sqrt(area / pixels)  # fits exactly if no padding were needed
        # padding adds at most (divisor - 1) to each side: (w s + p)(h s + p) = area, p = d - 1
        p = divisor - 1
        b = p * (image_h + image_w)
        lo = (-b + math.sqrt(b**2 - 2 * pixels * (p**2 - area))) / (2 * pixels)
    for i in range(100):
        scale = hi - (hi - lo) * i / 100
        w = _round_up(int(image_w * scale), divisor)
        h = _round_up(int(image_h * scale), divisor)
        if w * h <= area:
            return w, h
    # unreachable for sane inputs; upstream's fallback: fit the aspect, round sides down
    aspect = image_w / image_h
    w = max(divisor, int((area * aspect) ** 0.5 // divisor * divisor))
    h = max(divisor, int((area / aspect) ** 0.5 // divisor * divisor))
    if w >= image_w or h >= image_h:
        w = max(divisor, image_w // divisor * divisor)
        h = max(divisor, image_h // divisor * divisor)
    return w, h


def fit_image(img: Image.Image, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3]: scale so the image covers the frame, then crop the centre.

    Upstream resizes the shorter side to min(W, H) and centre-crops, which leaves thin black bars
    when padding made the frame's aspect differ a little from the image's; covering the frame
    instead gives the same picture without bars.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    img = img.convert("RGB")
    scale = max(width / img.width, height / img.height)
    rw, rh = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    resized = img.resize((rw, rh), Image.Resampling.BICUBIC)
    left, top = (rw - width) // 2, (rh - height) // 2
    return np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.uint8)
