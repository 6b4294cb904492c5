"""EncoderService: thin grpc.aio servicer over EncoderEngine (image, prompt and audio conditioning)."""

import contextlib
import math
import time

import numpy as np

from avatar import job_limits, telemetry, wire
from avatar.errors import InvalidInput
from avatar.grpc_util import run_blocking
from avatar.presets import (
    DEFAULT_AUDIO_ENCODER,
    ENCODER_AUDIO_RATE,
    FPS,
    FRAMES_PER_BLOCK,
    LATENT_FRAMES_PER_BLOCK,
    VAE_TIME_STRIDE,
)
from avatar.services.encoder.engine import EncoderEngine
from avatar.v1 import encoder_pb2, encoder_pb2_grpc

SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, engine: EncoderEngine, admission=None):
        self.engine = engine
        # avatar.admission.Admission: image and prompt encodes at once (each holds a core or a
        # GPU for seconds) and a bounded queue; beyond it RESOURCE_EXHAUSTED, not a pile-up
        self.admission = admission

    def _slot(self, context):
        return self.admission.slot(context) if self.admission else contextlib.nullcontext()

    async def EncodeImage(self, request, context):
        pixels = wire.tensor_arg(request.pixels, "pixels")
        if pixels.dtype != wire.DTYPES["uint8"] or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise InvalidInput(f"pixels must be uint8 [H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
        height, width = int(pixels.shape[0]), int(pixels.shape[1])
        job_limits.check_size(width, height, "pixels")
        if request.HasField("job") and (request.job.width, request.job.height) != (width, height):
            raise InvalidInput(f"pixels are {width}x{height}, the job is {request.job.width}x{request.job.height}")
        async with self._slot(context):
            with telemetry.span("encode_image", width=width, height=height):
                ref, still = await run_blocking(self.engine.encode_image, pixels.numpy())
            reply = encoder_pb2.EncodeImageResponse(
                ref_latent=wire.to_proto(ref), still_motion_latent=wire.to_proto(still)
            )
            if request.clip_embedding:
                with telemetry.span("clip_embedding"):
                    reply.clip_embedding.CopyFrom(
                        wire.to_proto(await run_blocking(self.engine.clip_embedding, pixels.numpy()))
                    )
        return reply

    async def EncodeText(self, request, context):
        job_limits.check_prompt(request.prompt)
        async with self._slot(context):
            with telemetry.span("encode_text", chars=len(request.prompt)):
                emb = await run_blocking(self.engine.encode_text, request.prompt)
        return encoder_pb2.EncodeTextResponse(embeddings=wire.to_proto(emb))

    async def EncodeAudio(self, request, context):
        job = request.job
        job_limits.check_job(job)
        pcm = wire.tensor_arg(request.pcm_16k, "pcm_16k")
        if pcm.ndim != 1:
            raise InvalidInput(f"pcm_16k must be mono [samples], got shape {list(pcm.shape)}")
        # Frames past the audio come back as zeros: no more blocks than the audio fills, plus one.
        audio_blocks = math.ceil(pcm.shape[0] * job.fps / ENCODER_AUDIO_RATE / FRAMES_PER_BLOCK)
        if job.num_blocks > audio_blocks + 1:
            raise InvalidInput(
                f"job.num_blocks {job.num_blocks} is more than {pcm.shape[0]} samples of "
                f"16 kHz audio fill ({audio_blocks} blocks of {FRAMES_PER_BLOCK} frames)"
            )
        # Whole blocks: frames past the audio come back as zeros, so every block gets 12 frames.
        frames = job.num_blocks * FRAMES_PER_BLOCK
        with telemetry.span("encode_audio", samples=int(pcm.shape[0]), frames=frames) as span:
            started = time.perf_counter()
            timings: dict = {}  # the audio model's share of the time (first_chunk_model_ms, model_ms)
            chunks = await run_blocking(
                lambda: iter(
                    self.engine.encode_audio(
                        pcm.float().numpy().astype(np.float32),
                        job.fps,
                        frames,
                        chunk_frames=FRAMES_PER_BLOCK,
                        backend=request.audio_encoder or DEFAULT_AUDIO_ENCODER,
                        timings=timings,
                    )
                )
            )
            done = object()
            while True:
                item = await run_blocking(next, chunks, done)  # one chunk per thread hop: cancellable
                if item is done:
                    break
                first_frame, features = item
                if first_frame == 0:  # the first block waits for it (wav2vec2 reads the whole audio first)
                    span.set_attribute("first_chunk_ms", round((time.perf_counter() - started) * 1e3, 3))
                    span.set_attribute("first_chunk_model_ms", round(timings.get("model_ms", 0.0), 3))
                yield encoder_pb2.AudioFeatures(first_frame=int(first_frame), features=wire.to_proto(features))
            span.set_attribute("model_ms", round(timings.get("model_ms", 0.0), 3))
            span.set_attribute("model_windows", timings.get("windows", 0))

    # --- live sessions (Converse): one stream = one speaker's audio, block by block -------
    async def EncodeAudioStream(self, request_iterator, context):
        from avatar.services.encoder.streaming_audio import StreamingAudioFeatures

        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("event") != "job":
            raise InvalidInput("the first AudioStreamInput must be the job")
        job = first.job
        if job.fps != FPS or job.latent_frames_per_block != LATENT_FRAMES_PER_BLOCK:
            raise InvalidInput(f"the job must have fps {FPS} and latent_frames_per_block {LATENT_FRAMES_PER_BLOCK}")
        max_blocks = min(job.num_blocks or job_limits.MAX_JOB_BLOCKS, job_limits.MAX_JOB_BLOCKS)  # bounded
        stream = StreamingAudioFeatures(
            self.engine.audio_encoder(first.audio_encoder or DEFAULT_AUDIO_ENCODER),
            job.fps,
            job.latent_frames_per_block * VAE_TIME_STRIDE,
        )
        async for msg in request_iterator:
            if msg.WhichOneof("event") != "block":
                raise InvalidInput("only AudioStreamBlock messages may follow the job")
            if stream.blocks >= max_blocks:
                raise InvalidInput(f"more than {max_blocks} audio blocks")
            pcm = wire.tensor_arg(msg.block.pcm_16k, "pcm_16k").numpy()
            ahead = (
                wire.tensor_arg(msg.block.lookahead_16k, "lookahead_16k").numpy()
                if msg.block.HasField("lookahead_16k")
                else None
            )
            with telemetry.span("encode_audio_block", block=stream.blocks, audio_encoder=stream.encoder.backend):
                features = await run_blocking(stream.push, pcm, ahead)
            yield encoder_pb2.AudioFeatures(
                first_frame=(stream.blocks - 1) * stream.frames_per_block, features=wire.to_proto(features)
            )
