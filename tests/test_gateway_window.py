"""The gateway's block window against scripted peers on loopback: the first block runs alone, and
the next blocks start as soon as the decoder says the first one's frames are decoded, while it is
still being encoded (not when its fragment has been sent)."""

import asyncio
import io

import grpc
import numpy as np
import torch
from conftest import tone_wav
from PIL import Image

from avatar import wire
from avatar.gateway.server import GatewayServicer
from avatar.presets import ModelSpec
from avatar.v1 import (
    avatar_pb2,
    avatar_pb2_grpc,
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
)

WAIT_S = 5.0  # how long the scripted decoder holds block 0's fragment back for block 1 to start


class Peers(encoder_pb2_grpc.EncoderServiceServicer):
    """Encoder, generator and decoder in one: features for every block at once, a latent per
    audio block, and a decoder that sends block 0's fragment only once the generator has block
    1's audio (or WAIT_S has passed)."""

    def __init__(self):
        self.block_audio: dict[int, asyncio.Event] = {}
        self.order: list[str] = []

    def audio_event(self, index: int) -> asyncio.Event:
        return self.block_audio.setdefault(index, asyncio.Event())

    async def EncodeImage(self, request, context):
        latent = torch.zeros(16, 1, 2, 2)
        return encoder_pb2.EncodeImageResponse(ref_latent=wire.to_proto(latent), motion_latents=wire.to_proto(latent))

    async def EncodeText(self, request, context):
        return encoder_pb2.EncodeTextResponse(embeddings=wire.to_proto(torch.zeros(1, 4)))

    async def EncodeAudio(self, request, context):
        for k in range(request.job.num_blocks):
            yield encoder_pb2.AudioFeatures(first_frame=12 * k, features=wire.to_proto(torch.zeros(12, 1, 1)))

    async def Generate(self, request_iterator, context):
        await anext(aiter(request_iterator))  # the SessionStart
        yield generator_pb2.GeneratorOutput(ready=generator_pb2.SessionReady())
        index = 0
        async for _ in request_iterator:
            self.order.append(f"audio {index}")
            self.audio_event(index).set()
            yield generator_pb2.GeneratorOutput(
                block=generator_pb2.LatentBlock(index=index, latent=wire.to_proto(torch.zeros(1)), dit_ms=1.0)
            )
            index += 1

    async def Decode(self, request_iterator, context):
        await anext(aiter(request_iterator))  # the DecodeStart
        yield decoder_pb2.DecoderOutput(init_segment=b"ftyp")
        async for msg in request_iterator:
            index = msg.block.index
            yield decoder_pb2.DecoderOutput(decoded=index)
            if index == 0:
                try:
                    await asyncio.wait_for(self.audio_event(1).wait(), WAIT_S)
                except TimeoutError:
                    self.order.append("block 1 never started while block 0 was encoded")
            self.order.append(f"fragment {index}")
            yield decoder_pb2.DecoderOutput(
                fragment=decoder_pb2.DecodedFragment(index=index, data=b"moof", num_frames=msg.block.keep_frames)
            )


class _Generator(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self, peers):
        self.Generate = peers.Generate


class _Decoder(decoder_pb2_grpc.DecoderServiceServicer):
    def __init__(self, peers):
        self.Decode = peers.Decode


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


async def _run(peers: Peers) -> list:
    servers = []
    try:
        back = grpc.aio.server()
        encoder_pb2_grpc.add_EncoderServiceServicer_to_server(peers, back)
        generator_pb2_grpc.add_GeneratorServiceServicer_to_server(_Generator(peers), back)
        decoder_pb2_grpc.add_DecoderServiceServicer_to_server(_Decoder(peers), back)
        peer = f"127.0.0.1:{back.add_insecure_port('127.0.0.1:0')}"
        servers.append(back)
        await back.start()
        front = grpc.aio.server()
        gateway = GatewayServicer(ModelSpec(name="tiny"), peer, peer, peer)
        avatar_pb2_grpc.add_AvatarServiceServicer_to_server(gateway, front)
        address = f"127.0.0.1:{front.add_insecure_port('127.0.0.1:0')}"
        servers.append(front)
        await front.start()
        async with grpc.aio.insecure_channel(address) as channel:
            request = avatar_pb2.GenerateRequest(image=_png(), audio=tone_wav(2.0), preset="preview")
            call = avatar_pb2_grpc.AvatarServiceStub(channel).Generate(request, timeout=30)
            messages = [m async for m in call]
        await gateway.close()
        return messages
    finally:
        for server in servers:
            await server.stop(None)


def test_the_next_blocks_start_when_the_first_is_decoded_not_when_it_is_sent():
    peers = Peers()
    messages = asyncio.run(asyncio.wait_for(_run(peers), 60))
    kinds = [m.WhichOneof("event") for m in messages]
    fragments = [m.fragment.index for m in messages if m.WhichOneof("event") == "fragment"]
    assert kinds[0] == "header" and kinds[-1] == "status" and fragments == [0, 1, 2, 3, 4], kinds
    # this scripted decoder predates the split first block (it says no first_fragment_frames):
    # the header promises one fragment per block, as many as come
    assert messages[0].header.expected_fragments == 5
    # the first block ran alone; block 1's audio went out once block 0 was decoded, and block
    # 0's fragment (held back until then) followed it
    order = peers.order
    assert order[:2] == ["audio 0", "audio 1"] and order.index("fragment 0") > 1, order
    assert not any("never started" in line for line in order), order
    assert messages[-1].status.blocks == 5
