"""Job: what engines are asked to make, as a plain frozen dataclass built from the wire's JobSpec at the server edge."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from avatar.presets import FPS, LATENT_FRAMES_PER_BLOCK, VAE_TIME_STRIDE


@dataclass(frozen=True)
class Job:
    """One video's plan (the fields of avatar.v1.JobSpec; units and examples in tensor.proto).
    Engines validate what they use: a Job is data, a bad one is refused there with the reason.
    A field the wire leaves unset is 0 here too (from_proto); the generator needs infer_frames and
    sample_steps, the decoder neither."""

    width: int  # pixels, e.g. 704
    height: int  # pixels, e.g. 384
    infer_frames: int = 0  # video frames per clip (the KV ring), e.g. 48
    sample_steps: int = 0  # Euler steps per block, e.g. 4
    num_blocks: int = 0  # blocks in the video, e.g. 11; 0: the decoder takes blocks until the stream ends
    seed: int = 0
    fps: int = FPS
    latent_frames_per_block: int = LATENT_FRAMES_PER_BLOCK
    total_frames: int = 0  # video frames of the final video (the audio's length); 0: whole blocks
    model: str = ""  # model preset, e.g. "tiny"
    audio_sample_rate: int = 0  # Hz of the muxed audio, e.g. 48000
    request_id: str = ""

    @classmethod
    def from_proto(cls, spec) -> Job:
        """From an avatar.v1.JobSpec."""
        return cls(**{name: getattr(spec, name) for name in cls.__dataclass_fields__})

    def to_proto(self):
        from avatar.v1 import tensor_pb2

        return tensor_pb2.JobSpec(**asdict(self))

    @property
    def frames_per_block(self) -> int:
        """Video frames of one block, e.g. 12."""
        return self.latent_frames_per_block * VAE_TIME_STRIDE

    @property
    def clip_latent_frames(self) -> int:
        """Latent frames of one clip: the KV ring's length."""
        return self.infer_frames // VAE_TIME_STRIDE

    @property
    def blocks_per_clip(self) -> int:
        return self.infer_frames // self.frames_per_block
