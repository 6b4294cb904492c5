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
            results["big"] = len(out.still_motion_latent.data)  # the second tensor the servicer answers
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


@pytest.mark.parametrize(
    "code, details, want",
    [
        # a peer's lost connection, however grpc words it: retry later
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2", grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.UNKNOWN, "Stream removed", grpc.StatusCode.UNAVAILABLE),
        # our own services' failures keep their code
        (grpc.StatusCode.INTERNAL, "internal error: RuntimeError: boom", grpc.StatusCode.INTERNAL),
        (grpc.StatusCode.INTERNAL, "generator failed (INTERNAL)", grpc.StatusCode.INTERNAL),
        (grpc.StatusCode.UNKNOWN, "Exception iterating responses: boom", grpc.StatusCode.UNKNOWN),
        (grpc.StatusCode.INVALID_ARGUMENT, "bad size", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_a_peer_that_died_is_unavailable_not_internal(code, details, want):
    """A decoder killed mid-stream ended a CI run's request INTERNAL ("decoder failed (INTERNAL)")
    where the client must learn UNAVAILABLE: retry later."""
    error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)
    got, text = grpc_util.PeerError("decoder", error).status()
    assert got == want
    if want == grpc.StatusCode.UNAVAILABLE:
        assert text == "decoder unavailable; retry later"


class _EndingContext:
    """The part of grpc.aio's ServicerContext these interceptors use; `rpc_ended()` runs the done
    callbacks as grpc does once the RPC's task has finished."""

    def __init__(self):
        self.callbacks = []

    def add_done_callback(self, callback):
        self.callbacks.append(callback)

    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return None

    def code(self):
        return None

    def rpc_ended(self):
        for callback in self.callbacks:
            callback(self)


def test_a_response_stream_grpc_abandons_is_closed_when_its_rpc_ends():
    """grpc.aio writes each response outside the handler; a client gone during a write makes it
    leave its loop with the handler suspended at `yield`, never closed. Kept alive (in production
    by a reference cycle), the handler's cleanup would wait for the garbage collector: it runs at
    the RPC's end instead, through every interceptor's wrapper."""
    from collections import namedtuple

    from avatar import metrics

    cleaned = []

    async def stream(request, context):
        try:
            while True:
                yield b"fragment"
        finally:
            cleaned.append("session released")

    async def scenario():
        details = namedtuple("Details", "method invocation_metadata")("/avatar.v1.Test/Stream", ())

        async def servicer(_):
            return grpc.unary_stream_rpc_method_handler(stream)

        async def with_metrics(d):
            return await metrics.MetricsInterceptor().intercept_service(servicer, d)

        handler = await grpc_util.CloseAbandonedStreams().intercept_service(with_metrics, details)
        context = _EndingContext()
        responses = handler.unary_stream(b"request", context)
        assert await anext(responses) == b"fragment"
        assert cleaned == []  # grpc now fails the write and leaves its loop, `responses` still referenced
        context.rpc_ended()
        for _ in range(5):
            await asyncio.sleep(0)
        return list(cleaned)  # checked here: at its end asyncio.run closes every open generator anyway

    cancelled = metrics.REQUESTS.labels(service="Test", method="Stream", code="CANCELLED")
    before = cancelled._value.get()
    assert asyncio.run(scenario()) == ["session released"]
    assert cancelled._value.get() == before + 1  # counted once, as cancelled


def test_a_finished_response_stream_is_left_alone_at_the_rpc_end():
    async def stream(request, context):
        yield b"only"

    async def scenario():
        details = type("Details", (), {"method": "/avatar.v1.Test/Once", "invocation_metadata": ()})()

        async def servicer(_):
            return grpc.unary_stream_rpc_method_handler(stream)

        handler = await grpc_util.CloseAbandonedStreams().intercept_service(servicer, details)
        context = _EndingContext()
        got = [r async for r in handler.unary_stream(b"request", context)]
        context.rpc_ended()  # nothing left to close: no task, no error
        await asyncio.sleep(0)
        return got, len(grpc_util._closing)

    assert asyncio.run(scenario()) == ([b"only"], 0)
