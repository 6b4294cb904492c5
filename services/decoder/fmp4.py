"""Fragmented MP4 writer: H.264 + AAC-LC, one moof+mdat per block, ready when the call returns.

PyAV provides the encoders only (libx264 and ffmpeg's native AAC); the ISO-BMFF boxes are written
here, because ffmpeg's mov muxer holds a fragment back until the next keyframe arrives, one block
too late for streaming. Layout (ISO/IEC 14496-12 and 14496-15):

    init segment  ftyp, moov(mvhd, trak video, trak audio (with an edit list), mvex(trex x2))
    fragment      moof(mfhd, traf video, traf audio) + mdat(video samples, audio samples)

Video uses track 1 at timescale 12800 (512 ticks a frame at 25 fps), audio track 2 at the sample
rate. Every block starts with an IDR frame, so init + any one fragment plays on its own.

AAC priming: ffmpeg's AAC encoder emits 1024 samples of delay before the input. An edit list would
hide them, but players ignore edit lists in fragmented files (ffprobe then reports a negative audio
start), so instead the first 1024 input samples (21 ms at 48 kHz, in practice leading silence) are
dropped and the priming plays in their place: every later sample is presented at its exact input
time, both streams start at 0, and the audio lasts exactly as long as the PCM given.
"""

from __future__ import annotations

import os
import struct
from fractions import Fraction

import av
import numpy as np
from av.video.frame import PictureType
from av.video.reformatter import ColorRange, Colorspace

VIDEO_TRACK, AUDIO_TRACK = 1, 2
AAC_FRAME = 1024  # samples per AAC-LC access unit
AAC_PRIMING = 1024  # ffmpeg's native AAC encoder starts every stream with this delay
VIDEO_TICKS_PER_FRAME = 512  # video timescale = fps * 512 (12800 at 25 fps, as ffmpeg picks)

_BT709 = 1  # AVCOL_SPC/PRI/TRC_BT709
_KEY_SAMPLE = 0x02000000  # sample_depends_on = 2 (an IDR: depends on nothing)
_DELTA_SAMPLE = 0x01010000  # sample_depends_on = 1, sample_is_non_sync_sample = 1
_UNITY_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I", 8 + len(body)) + kind + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def split_annexb(data: bytes) -> list[bytes]:
    """NAL units of an Annex-B byte stream (start codes 00 00 01 or 00 00 00 01 removed)."""
    nals, i, n = [], 0, len(data)
    starts = []
    while True:
        j = data.find(b"\x00\x00\x01", i)
        if j < 0:
            break
        starts.append(j + 3)
        i = j + 3
    for k, s in enumerate(starts):
        end = starts[k + 1] - 3 if k + 1 < len(starts) else n
        nal = data[s:end]
        # a 4-byte start code leaves one zero byte at the end of the previous unit
        nals.append(nal.rstrip(b"\x00") if k + 1 < len(starts) else nal)
    return [x for x in nals if x]


class _BitReader:
    """Reads Exp-Golomb fields of an SPS (emulation-prevention bytes already removed)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def bit(self) -> int:
        byte = self.data[self.pos >> 3]
        b = (byte >> (7 - (self.pos & 7))) & 1
        self.pos += 1
        return b

    def ue(self) -> int:
        zeros = 0
        while self.bit() == 0:
            zeros += 1
        value = 1
        for _ in range(zeros):
            value = (value << 1) | self.bit()
        return value - 1


def _sps_chroma_and_depth(sps: bytes) -> tuple[int, int, int]:
    """(chroma_format_idc, bit_depth_luma_minus8, bit_depth_chroma_minus8) of a High-profile SPS."""
    rbsp = sps[1:].replace(b"\x00\x00\x03", b"\x00\x00")
    r = _BitReader(rbsp[3:])  # skip profile_idc, constraint flags, level_idc
    r.ue()  # seq_parameter_set_id
    chroma = r.ue()
    if chroma == 3:
        r.bit()  # separate_colour_plane_flag
    return chroma, r.ue(), r.ue()


def avcc_from_parameter_sets(sps: bytes, pps: bytes) -> bytes:
    """AVCDecoderConfigurationRecord (the avcC payload) for one SPS and one PPS."""
    profile, compat, level = sps[1], sps[2], sps[3]
    rec = bytes([1, profile, compat, level, 0xFF, 0xE1]) + struct.pack(">H", len(sps)) + sps
    rec += bytes([1]) + struct.pack(">H", len(pps)) + pps
    if profile in (100, 110, 122, 144):  # High profiles carry chroma format and bit depths
        chroma, luma8, chroma8 = _sps_chroma_and_depth(sps)
        rec += bytes([0xFC | chroma, 0xF8 | luma8, 0xF8 | chroma8, 0])
    return rec


def _descriptor(tag: int, payload: bytes) -> bytes:
    if len(payload) > 127:
        raise ValueError("descriptor too long for a one-byte size")
    return bytes([tag, len(payload)]) + payload


class FragmentedMp4Writer:
    """Encodes blocks of RGB frames + int16 PCM into a fragmented MP4 stream.

    writer = FragmentedMp4Writer(704, 384, 25, 48000)
    out.write(writer.init_segment())
    for frames, pcm in blocks: out.write(writer.write_block(frames, pcm))   # one moof+mdat each
    out.write(writer.finish())                                              # audio tail

    or write_block(..., final=True) for the last block, which carries the audio tail itself.
    """

    def __init__(
        self,
        width: int,
        height: int,
        fps: int = 25,
        sample_rate: int = 48000,
        crf: int = 23,
        preset: str = "veryfast",
        audio_bitrate: int = 96000,
    ):
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"video size must be positive and even, got {width}x{height}")
        if not 1 <= fps <= 120:
            raise ValueError(f"fps must be in 1..120, got {fps}")
        if sample_rate not in (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000):
            raise ValueError(f"AAC sample rate {sample_rate} Hz is not supported")
        self.width, self.height, self.fps, self.sample_rate = width, height, fps, sample_rate
        self.video_timescale = fps * VIDEO_TICKS_PER_FRAME

        v = av.CodecContext.create("libx264", "w")
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        v.time_base, v.framerate = Fraction(1, fps), Fraction(fps)
        v.flags |= av.codec.context.Flags.global_header  # SPS/PPS in extradata, for avcC
        # BT.709, limited range, written into the SPS so players need not guess (they differ)
        v.colorspace, v.color_range, v.color_primaries, v.color_trc = _BT709, 1, _BT709, _BT709
        # slice threads only: frame threads would hold packets back by a few frames
        v.thread_type, v.thread_count = "SLICE", min(4, os.cpu_count() or 1)
        # zerolatency: no lookahead and no B-frames, so each frame's packet comes out at once;
        # keyframes are placed by us at block starts only.
        v.options = {
            "preset": preset,
            "tune": "zerolatency",
            "crf": str(crf),
            "x264-params": "keyint=infinite:scenecut=0:bframes=0",
        }
        v.open()
        self._video = v
        nals = split_annexb(bytes(v.extradata or b""))
        sps = next((n for n in nals if n[0] & 0x1F == 7), None)
        pps = next((n for n in nals if n[0] & 0x1F == 8), None)
        if sps is None or pps is None:
            raise RuntimeError("libx264 gave no SPS/PPS in its global header")
        self._sps, self._pps = sps, pps

        a = av.CodecContext.create("aac", "w")
        a.sample_rate, a.layout, a.format = sample_rate, "mono", "fltp"
        a.bit_rate = self._audio_bitrate = audio_bitrate
        a.time_base = Fraction(1, sample_rate)
        a.open()
        self._audio = a
        self._asc = bytes(a.extradata)  # AudioSpecificConfig

        self._pcm = np.zeros(0, np.float32)  # samples waiting for a full AAC frame
        self._to_drop = AAC_PRIMING  # input samples the priming stands in for
        self._audio_in = 0  # samples handed to the encoder so far
        self._audio_next_dts = 0  # media time of the next AAC packet (incl. priming)
        self._video_frames = 0
        self._sequence = 0
        self._finished = False
        self._init = self._build_init()

    # ------------------------------------------------------------------ public API
    def init_segment(self) -> bytes:
        """ftyp + moov (with mvex): play this first, then the fragments in order."""
        return self._init

    def mime_type(self) -> str:
        """e.g. 'video/mp4; codecs="avc1.64001f,mp4a.40.2"', for MediaSource.isTypeSupported."""
        avc = "avc1." + self._sps[1:4].hex()
        return f'video/mp4; codecs="{avc},mp4a.40.2"'

    def write_block(self, frames: np.ndarray, pcm: np.ndarray, final: bool = False, keyframe: bool = True) -> bytes:
        """Encodes frames and mono pcm int16 [samples]; returns one moof+mdat. Frames are RGB
        uint8 [n, H, W, 3] (converted to BT.709 limited range here), or already yuv420p:
        uint8 [n, H * 3 // 2, W], the Y plane's rows then the U and V planes' bytes, as PyAV's
        yuv420p ndarrays (the decoder converts on its GPU: swscale was half of the mux time).

        The fragment starts with an IDR frame (`keyframe=False`: it goes on from the previous
        fragment's frames instead, e.g. the rest of a block whose first frames went out sooner;
        its samples are marked as not sync samples). Audio packets the AAC encoder has finished so far
        ride along; its last ~1-2 frames (the encoder's delay) come in the next fragment, or in
        this one when `final` (the stream ends here: nothing may be written after it).
        """
        if self._finished:
            raise RuntimeError("write_block after finish()")
        frames = np.asarray(frames)
        yuv = frames.ndim == 3
        if frames.shape[1:] not in ((self.height, self.width, 3), (self.height * 3 // 2, self.width)):
            raise ValueError(
                f"frames must be RGB [n, {self.height}, {self.width}, 3] or yuv420p "
                f"[n, {self.height * 3 // 2}, {self.width}], got {frames.shape}"
            )
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {frames.dtype}")
        if len(frames) == 0:
            raise ValueError("a block needs at least one video frame")
        video = []
        for i, pixels in enumerate(frames):
            if yuv:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="yuv420p")
            else:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
                frame = frame.reformat(
                    format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG
                )
            frame.pts = self._video_frames + i
            frame.pict_type = PictureType.I if i == 0 and keyframe else PictureType.NONE
            video.extend(self._video.encode(frame))
        if len(video) != len(frames):
            raise RuntimeError(f"libx264 returned {len(video)} packets for {len(frames)} frames")
        if keyframe and not video[0].is_keyframe:
            raise RuntimeError("libx264 did not start the block with a keyframe")
        audio = self._encode_pcm(pcm)
        if final:
            audio += self._flush()
        first_frame = self._video_frames
        self._video_frames += len(frames)
        return self._fragment(video, first_frame, audio)

    def finish(self) -> bytes:
        """Flushes the encoders; returns a last fragment with the audio tail (b"" if none)."""
        if self._finished:
            return b""
        packets = self._flush()
        return self._fragment([], self._video_frames, packets) if packets else b""

    def _flush(self) -> list:
        self._finished = True
        packets = []
        if len(self._pcm):
            packets += self._encode_frame(self._pcm)
            self._pcm = np.zeros(0, np.float32)
        packets += self._audio.encode(None)
        if list(self._video.encode(None)):
            raise RuntimeError("libx264 held frames back despite zerolatency")
        return packets

    # ------------------------------------------------------------------ encoding
    def _encode_pcm(self, pcm: np.ndarray) -> list:
        pcm = np.asarray(pcm)
        if pcm.ndim != 1:
            raise ValueError(f"pcm must be mono [samples], got shape {pcm.shape}")
        if pcm.dtype != np.int16:
            raise ValueError(f"pcm must be int16, got {pcm.dtype}")
        samples = pcm.astype(np.float32) / 32768.0
        if self._to_drop:
            dropped = min(self._to_drop, len(samples))
            samples, self._to_drop = samples[dropped:], self._to_drop - dropped
        buf = np.concatenate([self._pcm, samples])
        whole = len(buf) // AAC_FRAME * AAC_FRAME
        packets = []
        for start in range(0, whole, AAC_FRAME):
            packets += self._encode_frame(buf[start : start + AAC_FRAME])
        self._pcm = buf[whole:]
        return packets

    def _encode_frame(self, samples: np.ndarray) -> list:
        frame = av.AudioFrame.from_ndarray(samples[None, :].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._audio_in
        self._audio_in += len(samples)
        return list(self._audio.encode(frame))

    # ------------------------------------------------------------------ boxes
    def _build_init(self) -> bytes:
        ftyp = _box(b"ftyp", b"iso5", struct.pack(">I", 512), b"iso5iso6mp41")
        mvhd = _full_box(
            b"mvhd",
            0,
            0,
            struct.pack(">IIII", 0, 0, 1000, 0),
            struct.pack(">IH", 0x10000, 0x100),
            bytes(10),
            _UNITY_MATRIX,
            bytes(24),
            struct.pack(">I", AUDIO_TRACK + 1),
        )
        mvex = _box(
            b"mvex", *(_full_box(b"trex", 0, 0, struct.pack(">5I", t, 1, 0, 0, 0)) for t in (VIDEO_TRACK, AUDIO_TRACK))
        )
        return ftyp + _box(b"moov", mvhd, self._video_trak(), self._audio_trak(), mvex)

    def _trak(
        self,
        track: int,
        timescale: int,
        handler: bytes,
        name: bytes,
        media_header: bytes,
        sample_entry: bytes,
        volume: int,
        size: tuple[int, int],
    ) -> bytes:
        tkhd = _full_box(
            b"tkhd",
            0,
            3,
            struct.pack(">IIIII", 0, 0, track, 0, 0),
            bytes(8),
            struct.pack(">hhhH", 0, 0, volume, 0),
            _UNITY_MATRIX,
            struct.pack(">II", size[0] << 16, size[1] << 16),
        )
        mdhd = _full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, timescale, 0, 0x55C4, 0))
        hdlr = _full_box(b"hdlr", 0, 0, bytes(4), handler, bytes(12), name + b"\x00")
        dinf = _box(b"dinf", _full_box(b"dref", 0, 0, struct.pack(">I", 1), _full_box(b"url ", 0, 1)))
        stbl = _box(
            b"stbl",
            _full_box(b"stsd", 0, 0, struct.pack(">I", 1), sample_entry),
            _full_box(b"stts", 0, 0, bytes(4)),
            _full_box(b"stsc", 0, 0, bytes(4)),
            _full_box(b"stsz", 0, 0, bytes(8)),
            _full_box(b"stco", 0, 0, bytes(4)),
        )
        minf = _box(b"minf", media_header, dinf, stbl)
        return _box(b"trak", tkhd, _box(b"mdia", mdhd, hdlr, minf))

    def _video_trak(self) -> bytes:
        avcc = _box(b"avcC", avcc_from_parameter_sets(self._sps, self._pps))
        avc1 = _box(
            b"avc1",
            bytes(6),
            struct.pack(">H", 1),
            bytes(16),
            struct.pack(">HHIIIH", self.width, self.height, 0x480000, 0x480000, 0, 1),
            bytes(32),
            struct.pack(">Hh", 0x18, -1),
            avcc,
        )
        vmhd = _full_box(b"vmhd", 0, 1, bytes(8))
        return self._trak(
            VIDEO_TRACK, self.video_timescale, b"vide", b"VideoHandler", vmhd, avc1, 0, (self.width, self.height)
        )

    def _audio_trak(self) -> bytes:
        # object type 0x40 (MPEG-4 audio), stream type audio; buffer size 0, max and avg bitrate
        decoder_config = _descriptor(
            4,
            bytes([0x40, 0x15])
            + bytes(3)
            + struct.pack(">II", self._audio_bitrate, self._audio_bitrate)
            + _descriptor(5, self._asc),
        )
        es = _descriptor(3, struct.pack(">HB", AUDIO_TRACK, 0) + decoder_config + _descriptor(6, b"\x02"))
        mp4a = _box(
            b"mp4a",
            bytes(6),
            struct.pack(">H", 1),
            bytes(8),
            struct.pack(">HHHHI", 1, 16, 0, 0, self.sample_rate << 16),
            _full_box(b"esds", 0, 0, es),
        )
        smhd = _full_box(b"smhd", 0, 0, bytes(4))
        return self._trak(AUDIO_TRACK, self.sample_rate, b"soun", b"SoundHandler", smhd, mp4a, 0x100, (0, 0))

    def _fragment(self, video: list, first_frame: int, audio: list) -> bytes:
        """moof + mdat for these packets; video samples first in the mdat, then audio."""
        self._sequence += 1
        v_samples = []
        for pkt in video:
            nals = [n for n in split_annexb(bytes(pkt)) if n[0] & 0x1F not in (7, 8, 9)]
            data = b"".join(struct.pack(">I", len(n)) + n for n in nals)
            flags = _KEY_SAMPLE if pkt.is_keyframe else _DELTA_SAMPLE
            v_samples.append((data, VIDEO_TICKS_PER_FRAME, flags))
        a_samples = []
        a_start = self._audio_next_dts
        for pkt in audio:
            if pkt.pts is not None and pkt.pts + AAC_PRIMING != self._audio_next_dts:
                raise RuntimeError(
                    f"AAC packet at {pkt.pts} out of sequence (expected {self._audio_next_dts - AAC_PRIMING})"
                )
            duration = int(pkt.duration or AAC_FRAME)
            a_samples.append((bytes(pkt), duration, _KEY_SAMPLE))
            self._audio_next_dts += duration

        tracks = []
        if v_samples:
            tracks.append((VIDEO_TRACK, first_frame * VIDEO_TICKS_PER_FRAME, v_samples))
        if a_samples:
            tracks.append((AUDIO_TRACK, a_start, a_samples))

        def moof(offsets: list[int]) -> bytes:
            trafs = [self._traf(t, base, samples, off) for (t, base, samples), off in zip(tracks, offsets)]
            return _box(b"moof", _full_box(b"mfhd", 0, 0, struct.pack(">I", self._sequence)), *trafs)

        # data offsets are relative to the moof start; its size does not depend on their values
        moof_size = len(moof([0] * len(tracks)))
        offsets, pos = [], moof_size + 8
        for _, _, samples in tracks:
            offsets.append(pos)
            pos += sum(len(s[0]) for s in samples)
        payload = b"".join(s[0] for _, _, samples in tracks for s in samples)
        return moof(offsets) + _box(b"mdat", payload)

    @staticmethod
    def _traf(track: int, base_time: int, samples: list, data_offset: int) -> bytes:
        tfhd = _full_box(b"tfhd", 0, 0x020000, struct.pack(">I", track))  # default-base-is-moof
        tfdt = _full_box(b"tfdt", 1, 0, struct.pack(">Q", base_time))
        # data-offset + per-sample duration, size and flags
        trun = _full_box(
            b"trun",
            0,
            0x000701,
            struct.pack(">Ii", len(samples), data_offset),
            *(struct.pack(">III", dur, len(data), flags) for data, dur, flags in samples),
        )
        return _box(b"traf", tfhd, tfdt, trun)
