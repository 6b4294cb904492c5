"""grpc_util: status codes from avatar.errors, 64 MiB messages both ways, health and reflection, in-process."""

import asyncio

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from avatar import errors, grpc_util, wire
from avatar.services.encoder.server import SERVICE_NAME, EncoderServicer
from avatar.v1 import encoder_pb2, encoder_pb2_grpc

RAISES = {
    "bad": errors.InvalidInput("size must be written W*H"),
    "full": errors.ResourceExhausted("no session slot"),
    "weights": errors.WeightsError("Wan2.1_VAE.pth missing"),
    "bug": KeyError("x" * 1000),
}


class ScriptedEncoder:
    """Stands in for EncoderEngine: the servicer and interceptor are under test here, not the model."""

    def encode_text(self, prompt: str) -> torch.Tensor:
        if prompt in RAISES:
            raise RAISES[prompt]
        return torch.zeros(3, 32)

    def encode_image(self, pixels: np.ndarray):
        # 12 MiB out: over gRPC's 4 MiB default, so this only works with the raised limits.
        return torch.ones(16, 1, 8, 8), torch.ones(3 * 1024 * 1024, dtype=torch.float32)


async def _serve_and_call():
    server, port = grpc_util.create_server("127.0.0.1:0")
    encoder_pb2_grpc.add_EncoderServiceServicer_to_server(EncoderServicer(ScriptedEncoder()), server)
    health = grpc_util.add_health_and_reflection(server, [SERVICE_NAME])
    await server.start()
    await grpc_util.set_serving(health, [SERVICE_NAME])
    results = {}
    try:
        async with grpc_util.create_channel(f"127.0.0.1:{port}") as ch:
            stub = encoder_pb2_grpc.EncoderServiceStub(ch)
            for prompt in RAISES:
                try:
                    await stub.EncodeText(encoder_pb2.EncodeTextRequest(prompt=prompt), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    results[prompt] = (exc.code(), exc.details())
            ok = await stub.EncodeText(encoder_pb2.EncodeTextRequest(prompt="hello"), timeout=10)
            results["ok"] = list(ok.embeddings.shape)
            big_in = wire.to_proto(torch.zeros(1024, 1024, 3, dtype=torch.uint8).numpy())  # 3 MiB in
            big_in.data = big_in.data * 2  # corrupt: 6 MiB
            try:
                await stub.EncodeImage(encoder_pb2.EncodeImageRequest(pixels=big_in), timeout=10)
            except grpc.aio.AioRpcError as exc:
                results["corrupt"] = (exc.code(), exc.details())
            pixels = wire.to_proto(torch.zeros(1024, 1024, 3, dtype=torch.uint8))
            out = await stub.EncodeImage(encoder_pb2.EncodeImageRequest(pixels=pixels), timeout=30)
            results["big"] = len(out.motion_latents.data)
            h = health_pb2_grpc.HealthStub(ch)
            results["health"] = (await h.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))).status
    finally:
        await server.stop(None)
    return results


def test_errors_become_status_codes_and_big_messages_pass():
    r = asyncio.run(_serve_and_call())
    assert r["bad"] == (grpc.StatusCode.INVALID_ARGUMENT, "size must be written W*H")
    assert r["full"] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "no session slot")
    assert r["weights"] == (grpc.StatusCode.FAILED_PRECONDITION, "Wan2.1_VAE.pth missing")
    code, details = r["bug"]
    assert code == grpc.StatusCode.INTERNAL and details.startswith("internal error: KeyError") and len(details) < 300
    assert r["corrupt"][0] == grpc.StatusCode.INVALID_ARGUMENT and "pixels" in r["corrupt"][1]
    assert r["ok"] == [3, 32]
    assert r["big"] == 12 * 1024 * 1024
    assert r["health"] == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    "exc, code",
    [
        (errors.InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.WeightsError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (RuntimeError("boom\nsecond line"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_of(exc, code):
    got, details = grpc_util.status_of(exc)
    assert got == code and "\n" not in details
