"""A still portrait's motion context travels as one latent (EncodeImageResponse and SessionStart's
still_motion_latent) and the generator's servicer repeats it to the model's 19 motion latent
frames: the same blocks as the 19 copies, 1/19 of the bytes on the two hops before the first
block. Older peers keep working through motion_latents."""

import asyncio
import re

import grpc
import numpy as np
import pytest
import torch
from ckpt_fixtures.dit import one_torch_thread  # noqa: F401 (autouse)

from avatar import wire
from avatar.gateway.server import motion_context
from avatar.grpc_util import create_server
from avatar.jobs import Job
from avatar.presets import ModelSpec
from avatar.services.encoder.engine import EncoderEngine
from avatar.services.encoder.server import EncoderServicer
from avatar.services.generator.engine import GeneratorEngine
from avatar.services.generator.server import GeneratorServicer
from avatar.v1 import encoder_pb2, encoder_pb2_grpc, generator_pb2, generator_pb2_grpc

JOB = Job(
    width=64,
    height=64,
    fps=25,
    infer_frames=24,
    latent_frames_per_block=3,
    num_blocks=2,
    total_frames=24,
    sample_steps=2,
    seed=420,
    model="tiny",
)


def _conditioning(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(7, 32, generator=g), torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 1, 8, 8, generator=g)


def _start(text, ref, **motion) -> generator_pb2.GeneratorInput:
    fields = {name: wire.to_proto(t) for name, t in motion.items()}
    return generator_pb2.GeneratorInput(
        start=generator_pb2.SessionStart(
            job=JOB.to_proto(), text=wire.to_proto(text), ref_latent=wire.to_proto(ref), **fields
        )
    )


async def _blocks(port: int, start: generator_pb2.GeneratorInput, blocks: int = 2) -> list[torch.Tensor]:
    audio = torch.randn(blocks * 12, 5, 32, generator=torch.Generator().manual_seed(1))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = generator_pb2_grpc.GeneratorServiceStub(ch).Generate()
        await call.write(start)
        assert (await call.read()).WhichOneof("event") == "ready"
        await call.write(generator_pb2.GeneratorInput(audio=encoder_pb2.AudioFeatures(features=wire.to_proto(audio))))
        await call.done_writing()
        blocks = []
        while (out := await call.read()) is not grpc.aio.EOF:
            blocks.append(wire.from_proto(out.block.latent))
        return blocks


def _serve_generator(test):
    async def main():
        server, port = create_server("127.0.0.1:0")
        engine = GeneratorEngine(ModelSpec(name="tiny", seed=0))
        generator_pb2_grpc.add_GeneratorServiceServicer_to_server(GeneratorServicer(engine), server)
        await server.start()
        try:
            await test(port)
        finally:
            await server.stop(None)

    asyncio.run(main())


def test_the_still_latent_gives_the_blocks_of_its_19_copies():
    text, ref, still = _conditioning()

    async def test(port):
        once = await _blocks(port, _start(text, ref, still_motion_latent=still))
        copies = await _blocks(port, _start(text, ref, motion_latents=still.expand(-1, 19, -1, -1)))
        assert len(once) == 2 and all(torch.equal(a, b) for a, b in zip(once, copies))
        # motion_latents keeps its meaning: one given frame is the newest, the older ones zeros
        newest_only = await _blocks(port, _start(text, ref, motion_latents=still))
        assert not torch.allclose(newest_only[0], once[0])

    _serve_generator(test)


@pytest.mark.parametrize(
    "motion, reason",
    [
        ({}, "exactly one of motion_latents and still_motion_latent, got neither"),
        (
            {"motion_latents": torch.zeros(16, 19, 8, 8), "still_motion_latent": torch.zeros(16, 1, 8, 8)},
            "exactly one of motion_latents and still_motion_latent, got both",
        ),
        ({"still_motion_latent": torch.zeros(16, 2, 8, 8)}, r"still_motion_latent must be one latent frame"),
        ({"still_motion_latent": torch.zeros(16, 1, 8, 4)}, r"motion_latents must be \[16, T, 8, 8\]"),
    ],
)
def test_bad_motion_fields_are_refused_with_the_reason(motion, reason):
    text, ref, _ = _conditioning()

    async def test(port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = generator_pb2_grpc.GeneratorServiceStub(ch).Generate()
            await call.write(_start(text, ref, **motion))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call.read()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert re.search(reason, e.value.details()), e.value.details()

    _serve_generator(test)


def test_the_encoder_answers_one_still_latent_and_the_gateway_passes_either_form_on():
    engine = EncoderEngine(ModelSpec(name="tiny", seed=0))
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)

    async def main():
        server, port = create_server("127.0.0.1:0")
        encoder_pb2_grpc.add_EncoderServiceServicer_to_server(EncoderServicer(engine), server)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = encoder_pb2_grpc.EncoderServiceStub(ch)
                return await stub.EncodeImage(encoder_pb2.EncodeImageRequest(pixels=wire.to_proto(pixels)))
        finally:
            await server.stop(None)

    reply = asyncio.run(main())
    assert not reply.HasField("motion_latents") and list(reply.still_motion_latent.shape) == [16, 1, 8, 8]
    assert torch.equal(wire.from_proto(reply.still_motion_latent), engine.encode_image(pixels)[1])
    assert motion_context(reply) == {"still_motion_latent": reply.still_motion_latent}
    older = encoder_pb2.EncodeImageResponse(ref_latent=reply.ref_latent, motion_latents=reply.still_motion_latent)
    assert motion_context(older) == {"motion_latents": older.motion_latents}  # an encoder before the field


def test_a_returning_still_portrait_finds_its_sink_kept_through_the_servicer():
    """The sink cache matches what the servicer hands over: the still latent repeated (a view),
    the reference and the prompt as they came over the wire. The second and third sessions of
    the same inputs copy the kept sink (run P2 on an H100 saw the second run it again)."""
    from avatar.services.generator.sink_cache import SinkCache

    text, ref, still = _conditioning(seed=3)
    restored = []

    async def main():
        server, port = create_server("127.0.0.1:0")
        engine = GeneratorEngine(ModelSpec(name="tiny", seed=0))
        engine.sinks = SinkCache()  # a GPU's engine keeps sinks; the CPU's does not by default
        real = engine.open_session

        def open_session(*a, **k):
            session = real(*a, **k)
            restored.append(session.sink_restored)
            return session

        engine.open_session = open_session
        generator_pb2_grpc.add_GeneratorServiceServicer_to_server(GeneratorServicer(engine), server)
        await server.start()
        try:
            runs = [await _blocks(port, _start(text, ref, still_motion_latent=still)) for _ in range(3)]
        finally:
            await server.stop(None)
        return runs

    runs = asyncio.run(main())
    assert restored == [False, True, True]
    assert all(torch.equal(torch.stack(r), torch.stack(runs[0])) for r in runs[1:])  # the same blocks
