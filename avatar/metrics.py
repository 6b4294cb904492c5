"""Prometheus metrics for operators: requests, sessions, queue, stage latencies, FPS, GPUs.

Every avatar process registers into one registry and serves it on ``--metrics-port`` (HTTP,
``/metrics``). GPU gauges are read from NVML at scrape time; on a machine without a GPU or
NVML, ``avatar_gpu_available`` is 0 and ``avatar_gpu_nvml_error`` names the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
# Seconds from a few ms (one VAE block on a GPU) to minutes (a whole hd video on CPU).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)

REQUESTS = Counter(
    "avatar_requests", "RPCs handled, by final status code", ["service", "method", "code"], registry=REGISTRY
)
REQUEST_SECONDS = Histogram(
    "avatar_request_seconds",
    "RPC wall time from arrival to the last message",
    ["service", "method"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "avatar_stage_seconds",
    "Time per pipeline stage and request (summed over blocks)",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
TIME_TO_FIRST_FRAGMENT = Histogram(
    "avatar_time_to_first_fragment_seconds",
    "Request arrival to the first video fragment sent",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
FPS = Histogram(
    "avatar_generation_fps",
    "Video frames streamed per second of request time",
    buckets=(0.5, 1, 2, 4, 8, 12, 16, 20, 25, 30, 45, 60, 100),
    registry=REGISTRY,
)
LAST_FPS = Gauge("avatar_generation_fps_last", "FPS of the last finished request", registry=REGISTRY)
FRAMES = Counter(
    "avatar_frames", "Video frames handed to clients, counted per fragment (cancelled streams too)", registry=REGISTRY
)
GENERATOR_PARALLEL = Gauge(
    "avatar_generator_parallel_degree",
    "Ranks of this generator per kind of parallelism (tpp, fsdp; --parallel), 1: not used",
    ["kind"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "avatar_inflight_rpcs",
    "RPCs running now (a decoder/generator stream = one session)",
    ["service", "method"],
    registry=REGISTRY,
)
LATENT_DECODER = Gauge(
    "avatar_latent_decoder",
    "1 for the latent decoder this decoder service runs: full (the Wan2.1 VAE) or light (TAEHV taew2_1)",
    ["kind"],
    registry=REGISTRY,
)


@dataclass(frozen=True)
class _AdmissionMetrics:
    active: Gauge
    queued: Gauge
    rejected: Counter


ADMISSION = _AdmissionMetrics(
    active=Gauge("avatar_active_sessions", "Sessions holding a slot", ["service"], registry=REGISTRY),
    queued=Gauge("avatar_queue_depth", "Sessions waiting for a slot", ["service"], registry=REGISTRY),
    rejected=Counter(
        "avatar_rejected",
        "Requests refused with RESOURCE_EXHAUSTED by admission control",
        ["service"],
        registry=REGISTRY,
    ),
)

# `avatar serve --ray` (gateway/replicas.py): the replicas the gateway routes to and its choices
RAY_REPLICAS = Gauge("avatar_ray_replicas", "Replicas serving and routable, per role", ["role"], registry=REGISTRY)
REPLICA_SESSIONS = Gauge(
    "avatar_replica_sessions",
    "Sessions the gateway runs on each replica (node: its Ray node id)",
    ["role", "replica", "node"],
    registry=REGISTRY,
)
REPLICA_LORAS = Gauge(
    "avatar_replica_loras",
    "Per-avatar LoRAs each generator replica holds, as the gateway routes by them (1 per held LoRA)",
    ["replica", "lora_id"],
    registry=REGISTRY,
)
ROUTING = Counter(
    "avatar_routing_decisions",
    "Replicas chosen for new sessions, by reason: least_loaded, lora_loaded, no_free_slot (the session's "
    "deadline passed while it waited for a slot), no_replica (the session failed UNAVAILABLE)",
    ["role", "decision"],
    registry=REGISTRY,
)


def observe_final(final) -> None:
    """Records one finished Generate from its FinalStatus (avatar.v1): stages, TTFF, FPS."""
    for t in final.timings:
        STAGE_SECONDS.labels(stage=t.stage).observe(t.ms / 1000.0)
    if final.frames:  # frames are counted as they are sent (count_frames), not here
        TIME_TO_FIRST_FRAGMENT.observe(final.time_to_first_fragment_s)
        if final.total_s > 0:
            fps = final.frames / final.total_s
            FPS.observe(fps)
            LAST_FPS.set(fps)


def count_frames(frames: int) -> None:
    """Frames of one fragment just handed to a client: counted even if the stream ends early."""
    FRAMES.inc(frames)


# --- GPUs ----------------------------------------------------------------------------------


class GPUCollector:
    """Reads NVML on every scrape; reports why when there is no GPU instead of failing."""

    def __init__(self):
        self._error: str | None = None
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as e:  # noqa: BLE001 - no library, no driver, no GPU: all the same to us
            self._error = f"{type(e).__name__}: {e}"

    def collect(self):
        available = GaugeMetricFamily("avatar_gpu_available", "1 when NVML reports GPUs, else 0")
        if self._nvml is None:
            available.add_metric([], 0)
            err = GaugeMetricFamily(
                "avatar_gpu_nvml_error", "NVML could not be used; the label says why", labels=["reason"]
            )
            err.add_metric([self._error or "unknown"], 1)
            yield available
            yield err
            return
        nv = self._nvml
        used = GaugeMetricFamily("avatar_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu", "name"])
        total = GaugeMetricFamily("avatar_gpu_memory_total_bytes", "GPU memory in total", labels=["gpu", "name"])
        util = GaugeMetricFamily(
            "avatar_gpu_utilization_percent", "GPU busy time over the last sample period", labels=["gpu", "name"]
        )
        temp = GaugeMetricFamily("avatar_gpu_temperature_celsius", "GPU core temperature", labels=["gpu", "name"])
        power = GaugeMetricFamily("avatar_gpu_power_watts", "GPU power draw", labels=["gpu", "name"])
        try:
            count = nv.nvmlDeviceGetCount()
            for i in range(count):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                name = nv.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else name
                labels = [str(i), name]
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                used.add_metric(labels, mem.used)
                total.add_metric(labels, mem.total)
                # each reading may be unsupported on some boards (e.g. power on MIG slices)
                for fam, read in (
                    (util, lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu),
                    (temp, lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                    (power, lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
                ):
                    try:
                        fam.add_metric(labels, read())
                    except nv.NVMLError:
                        pass
            available.add_metric([], 1 if count else 0)
        except Exception as e:  # noqa: BLE001 - a scrape must never fail because of the GPU
            available.add_metric([], 0)
            log.warning("NVML read failed: %s", e)
        yield available
        yield from (used, total, util, temp, power)


_GPU_COLLECTOR: GPUCollector | None = None


def register_gpu_collector() -> GPUCollector:
    global _GPU_COLLECTOR
    if _GPU_COLLECTOR is None:
        _GPU_COLLECTOR = GPUCollector()
        REGISTRY.register(_GPU_COLLECTOR)
    return _GPU_COLLECTOR


def start_metrics_server(port: int, addr: str = "0.0.0.0"):
    """Serves REGISTRY over HTTP on addr:port (0 picks a free port); returns (server, port)."""
    register_gpu_collector()
    try:
        server, thread = start_http_server(port, addr=addr, registry=REGISTRY)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from None
    return server, server.server_address[1]


# --- gRPC ----------------------------------------------------------------------------------


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by final status code and times it. Put it first so it sees refusals
    (UNAUTHENTICATED, RESOURCE_EXHAUSTED) made by the interceptors after it."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        service, _, method = details.method.lstrip("/").partition("/")
        service = service.rsplit(".", 1)[-1]
        wrap = _wrap_stream if (handler.unary_stream or handler.stream_stream) else _wrap_unary
        kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, service, method), **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, service, method), **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, service, method), **kw)
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, service, method), **kw)


def _code_of(context, exc: BaseException | None) -> str:
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        # grpc cancels the handler both when the client goes away and when the deadline passes
        return "DEADLINE_EXCEEDED" if _deadline_passed(context) else "CANCELLED"
    code = None
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpc: no code() on aio contexts
        pass
    if code is not None:
        return code.name if hasattr(code, "name") else str(code)
    return "OK" if exc is None else "UNKNOWN"


# The client's deadline passes before ours (we count from when its request reached us, later by
# however long that took on a loaded machine), so its cancellation may arrive first: CI saw
# CANCELLED for an expired call. A cancellation within this much of the deadline is the deadline.
DEADLINE_SLACK_S = 1.0


def _deadline_passed(context) -> bool:
    try:
        remaining = context.time_remaining()
    except Exception:  # noqa: BLE001 - a context without a deadline API: no deadline
        return False
    return remaining is not None and remaining <= DEADLINE_SLACK_S


def _record(service, method, context, started, exc):
    IN_FLIGHT.labels(service=service, method=method).dec()
    REQUESTS.labels(service=service, method=method, code=_code_of(context, exc)).inc()
    REQUEST_SECONDS.labels(service=service, method=method).observe(time.monotonic() - started)


def _wrap_unary(behavior, service, method):
    @functools.wraps(behavior)
    async def wrapper(request, context):
        started, exc = time.monotonic(), None
        IN_FLIGHT.labels(service=service, method=method).inc()
        try:
            return await behavior(request, context)
        except BaseException as e:
            exc = e
            raise
        finally:
            _record(service, method, context, started, exc)

    return wrapper


def _wrap_stream(behavior, service, method):
    @functools.wraps(behavior)
    async def wrapper(request, context):
        started, exc = time.monotonic(), None
        IN_FLIGHT.labels(service=service, method=method).inc()
        try:
            async with contextlib.aclosing(behavior(request, context)) as responses:  # closed with this one
                async for response in responses:
                    yield response
        except BaseException as e:
            exc = e
            raise
        finally:
            _record(service, method, context, started, exc)

    return wrapper


# --- live sessions (AvatarService/Converse, gateway/converse.py) -----------------------------
LIVE_AUDIO_TO_FRAGMENT = Histogram(
    "avatar_live_audio_to_fragment_seconds",
    "Live sessions: audio chunk received -> the fragment with its first sample sent",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
LIVE_INTERRUPT_TO_IDLE = Histogram(
    "avatar_live_interrupt_to_idle_seconds",
    "Live sessions: Interrupt received -> the first fragment after the cut sent",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
LIVE_BLOCKS = Counter(
    "avatar_live_blocks", "Live sessions: fragments sent, speech or idle", ["kind"], registry=REGISTRY
)

# Per-avatar LoRAs of a generator (services/generator/avatar_loras.py)
LORA_SESSIONS = Counter(
    "avatar_lora_sessions", "Generator sessions opened with a per-avatar LoRA", ["lora_id"], registry=REGISTRY
)
LORA_LOADS = Counter(
    "avatar_lora_loads",
    "Per-avatar LoRAs loaded onto the device because a session asked for one not held (LoRA switches)",
    ["lora_id"],
    registry=REGISTRY,
)
LORA_EVICTIONS = Counter(
    "avatar_lora_evictions", "Per-avatar LoRAs dropped (least recently used) to make room", registry=REGISTRY
)
LORAS_LOADED = Gauge("avatar_loras_loaded", "Per-avatar LoRAs held on the device now", registry=REGISTRY)
KEPT_CACHE_BYTES = Gauge(
    "avatar_generator_kept_cache_bytes",
    "KV caches and prompt keys/values of finished sessions, kept with their CUDA graphs (whose memory "
    "pools come on top) for the next session of their shapes, and the last portraits' sinks; freed first "
    "when a session needs the memory",
    registry=REGISTRY,
)
LORA_LOAD_SECONDS = Histogram(
    "avatar_lora_load_seconds",
    "Time to load one per-avatar LoRA onto the device (the cost of a switch)",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
