"""DecoderService: thin grpc.aio servicer over DecoderEngine; one bidi stream = one video."""

from avatar import job_limits, metrics, telemetry, wire
from avatar.errors import InvalidInput
from avatar.grpc_util import run_blocking
from avatar.jobs import Job
from avatar.services.decoder.engine import DecoderEngine
from avatar.v1 import decoder_pb2, decoder_pb2_grpc

SERVICE_NAME = decoder_pb2.DESCRIPTOR.services_by_name["DecoderService"].full_name


class DecoderServicer(decoder_pb2_grpc.DecoderServiceServicer):
    def __init__(self, engine: DecoderEngine):
        self.engine = engine
        metrics.LATENT_DECODER.labels(engine.kind).set(1)

    async def Decode(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("event") != "start":
            raise InvalidInput("the first DecoderInput must be a DecodeStart")
        job = Job.from_proto(first.start.job)
        job_limits.check_job(job, audio_rate=True, open_ended=True)  # reachable from the cluster: bounded jobs
        split = first.start.first_fragment_frames
        if not 0 <= split <= job.frames_per_block:
            raise InvalidInput(f"first_fragment_frames must be in 0..{job.frames_per_block}, got {split}")
        stream = await run_blocking(
            self.engine.open_stream, job, wire.tensor_arg(first.start.prime_latent, "prime_latent")
        )
        try:
            init = await run_blocking(stream.init_segment)
            yield decoder_pb2.DecoderOutput(init_segment=init, first_fragment_frames=split)
            async for msg in request_iterator:
                if msg.WhichOneof("event") != "block":
                    raise InvalidInput("only DecodeBlock messages may follow the DecodeStart")
                block = msg.block
                pcm = wire.tensor_arg(block.pcm, "pcm")
                if pcm.dtype != wire.DTYPES["int16"] or pcm.ndim != 1:
                    raise InvalidInput(f"pcm must be int16 mono [samples], got {pcm.dtype} {list(pcm.shape)}")
                latent = wire.tensor_arg(block.latent, "latent")
                # the first block's first frames alone first: the client can start playing them
                # while the rest of the block is encoded
                parts = [split] if stream.blocks == 0 and 0 < split < block.keep_frames else []
                with telemetry.span("decode_block", block=block.index, keep_frames=block.keep_frames):
                    with telemetry.span("vae_decode", block=block.index, decoder=self.engine.kind):
                        frames = await run_blocking(stream.decode_frames, latent, pcm.numpy(), block.keep_frames)
                    yield decoder_pb2.DecoderOutput(decoded=block.index)
                    for part in [*parts, None]:
                        n = part or block.keep_frames - sum(parts)
                        with telemetry.span("mux", block=block.index, frames=n) as span:
                            out = await run_blocking(stream.mux, frames, part)
                            span.set_attribute("bytes", len(out.data))
                        yield decoder_pb2.DecoderOutput(
                            fragment=decoder_pb2.DecodedFragment(
                                index=block.index,
                                data=out.data,
                                num_frames=out.num_frames,
                                vae_ms=out.vae_ms,
                                mux_ms=out.mux_ms,
                                continued=out.continued,
                            )
                        )
            # An open-ended stream (a live session: job.num_blocks 0) ends when the caller closes
            # its side: the AAC encoder's tail goes out as a last, audio-only fragment.
            if not job.num_blocks and (tail := await run_blocking(stream.finish)):
                yield decoder_pb2.DecoderOutput(fragment=decoder_pb2.DecodedFragment(index=stream.blocks, data=tail))
        finally:
            await run_blocking(stream.close)
