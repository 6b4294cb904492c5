"""EncoderService: thin grpc.aio servicer over EncoderEngine (image, prompt and audio conditioning)."""
import numpy as np

from avatar import telemetry, wire
from avatar.errors import InvalidInput
from avatar.grpc_util import run_blocking
from avatar.presets import DEFAULT_AUDIO_ENCODER, FRAMES_PER_BLOCK, VAE_TIME_STRIDE
from avatar.v1 import encoder_pb2, encoder_pb2_grpc
from avatar.services.encoder.engine import EncoderEngine

SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, engine: EncoderEngine):
        self.engine = engine

    async def EncodeImage(self, request, context):
        pixels = wire.tensor_arg(request.pixels, "pixels")
        if pixels.dtype != wire.DTYPES["uint8"] or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise InvalidInput(f"pixels must be uint8 [H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
        with telemetry.span("encode_image", width=int(pixels.shape[1]), height=int(pixels.shape[0])):
            ref, motion = await run_blocking(self.engine.encode_image, pixels.numpy())
        reply = encoder_pb2.EncodeImageResponse(ref_latent=wire.to_proto(ref), motion_latents=wire.to_proto(motion))
        if request.clip_embedding:
            with telemetry.span("clip_embedding"):
                reply.clip_embedding.CopyFrom(wire.to_proto(await run_blocking(self.engine.clip_embedding,
                                                                               pixels.numpy())))
        return reply

    async def EncodeText(self, request, context):
        with telemetry.span("encode_text", chars=len(request.prompt)):
            emb = await run_blocking(self.engine.encode_text, request.prompt)
        return encoder_pb2.EncodeTextResponse(embeddings=wire.to_proto(emb))

    async def EncodeAudio(self, request, context):
        job = request.job
        pcm = wire.tensor_arg(request.pcm_16k, "pcm_16k")
        if pcm.ndim != 1:
            raise InvalidInput(f"pcm_16k must be mono [samples], got shape {list(pcm.shape)}")
        # Whole blocks: frames past the audio come back as zeros, so every block gets 12 frames.
        frames = job.num_blocks * FRAMES_PER_BLOCK
        with telemetry.span("encode_audio", samples=int(pcm.shape[0]), frames=frames):
            chunks = await run_blocking(
                lambda: iter(self.engine.encode_audio(pcm.float().numpy().astype(np.float32), job.fps, frames,
                                                      chunk_frames=FRAMES_PER_BLOCK,
                                                      backend=request.audio_encoder or DEFAULT_AUDIO_ENCODER)))
            done = object()
            while True:
                item = await run_blocking(next, chunks, done)  # one chunk per thread hop: cancellable
                if item is done:
                    break
                first_frame, features = item
                yield encoder_pb2.AudioFeatures(first_frame=int(first_frame), features=wire.to_proto(features))

    # --- live sessions (Converse): one stream = one speaker's audio, block by block -------
    async def EncodeAudioStream(self, request_iterator, context):
        from avatar.services.encoder.streaming_audio import StreamingAudioFeatures
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("event") != "job":
            raise InvalidInput("the first AudioStreamInput must be the job")
        job = first.job
        stream = StreamingAudioFeatures(self.engine.audio_encoder(DEFAULT_AUDIO_ENCODER), job.fps,
                                        job.latent_frames_per_block * VAE_TIME_STRIDE)
        async for msg in request_iterator:
            if msg.WhichOneof("event") != "block":
                raise InvalidInput("only AudioStreamBlock messages may follow the job")
            pcm = wire.tensor_arg(msg.block.pcm_16k, "pcm_16k").numpy()
            ahead = (wire.tensor_arg(msg.block.lookahead_16k, "lookahead_16k").numpy()
                     if msg.block.HasField("lookahead_16k") else None)
            with telemetry.span("encode_audio_block", block=stream.blocks):
                features = await run_blocking(stream.push, pcm, ahead)
            yield encoder_pb2.AudioFeatures(first_frame=(stream.blocks - 1) * stream.frames_per_block,
                                            features=wire.to_proto(features))
