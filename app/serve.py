"""Hosts mesh services in one grpc.aio server: one role per process, or all four (the embedded default)."""
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass, field

import grpc

from avatar import grpc_util, telemetry
from avatar.admission import Admission, AdmissionConfig
from avatar.metrics import MetricsInterceptor
from avatar.presets import ModelSpec
from avatar.security import SecurityConfig

log = logging.getLogger("avatar.app.serve")

ROLES = ("all", "gateway", "encoder", "generator", "decoder")
DEFAULT_LISTEN = "127.0.0.1:50051"
GRACE_S = 5.0


@dataclass
class ServeConfig:
    role: str = "all"
    listen: str = DEFAULT_LISTEN
    encoder: str | None = None      # addresses of the peers, for --role gateway
    generator: str | None = None
    decoder: str | None = None
    model: ModelSpec = ModelSpec()
    trace_file: str | None = None
    security: SecurityConfig = field(default_factory=SecurityConfig)  # TLS and tokens (avatar.security)
    admission: AdmissionConfig | None = None  # session cap + queue of gateway and generator; None: no cap
    metrics_port: int | None = None           # Prometheus /metrics on this port; None: off, 0: any free
    grace_s: float = GRACE_S                  # shutdown: seconds in-flight streams get to finish
    max_audio_s: float | None = None          # gateway: longest speech input; None: avatar.media's default
    warmup: bool | None = None                # generator and decoder: run the presets once before SERVING; None: with --compile
    live: object = None                       # gateway: a gateway.converse.ConverseConfig; None: defaults


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: object
    service_names: list[str]
    closers: list
    metrics_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float = GRACE_S) -> None:
        """Health NOT_SERVING first (load balancers drain), then finish in-flight RPCs within `grace`."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for close in self.closers:
            await close()


def warmup_sizes(model: ModelSpec) -> list[tuple[int, int, int, int]]:
    """(width, height, infer_frames, sample_steps) of the hd and preview presets, largest first,
    at the model's own sizes (avatar.presets.preset_area); clips are whole blocks of 12 frames."""
    from avatar.presets import JOB_PRESETS, preset_area, whole_blocks
    return [(*preset_area(JOB_PRESETS[name], model), whole_blocks(JOB_PRESETS[name].infer_frames),
             JOB_PRESETS[name].sample_steps) for name in ("hd", "preview")]


def _host(listen: str) -> str:
    return listen.rsplit(":", 1)[0].strip("[]")


async def start(cfg: ServeConfig) -> RunningServer:
    """Builds the role's engines, binds, starts and reports SERVING. Port 0 picks a free port."""
    if cfg.role not in ROLES:
        raise ValueError(f"unknown role {cfg.role!r}: choose one of {', '.join(ROLES)}")
    telemetry.setup(f"avatar-{cfg.role}", cfg.trace_file)
    sec = cfg.security
    for warning in sec.exposure_warnings(cfg.role, cfg.listen):
        log.warning(warning)
    interceptors = [MetricsInterceptor(), *sec.server_interceptors(cfg.role)]
    server, port = grpc_util.create_server(cfg.listen, sec.tls.server_credentials(), interceptors)
    names: list[str] = []
    closers = []
    metrics_port = None
    if cfg.metrics_port is not None:
        from avatar.metrics import start_metrics_server
        http, metrics_port = start_metrics_server(cfg.metrics_port, _host(cfg.listen) or "0.0.0.0")

        async def close_metrics(http=http):
            http.shutdown()
            http.server_close()
        closers.append(close_metrics)
    loop = asyncio.get_running_loop()
    warmup = cfg.warmup if cfg.warmup is not None else cfg.model.compile

    # Each role imports only its own engine (a gateway loads no model code); engines build in a
    # thread so a slow checkpoint load does not block the loop.
    if cfg.role in ("all", "encoder"):
        from avatar.v1 import encoder_pb2_grpc
        from avatar.services.encoder.engine import EncoderEngine
        from avatar.services.encoder.server import SERVICE_NAME, EncoderServicer
        engine = await loop.run_in_executor(None, EncoderEngine, cfg.model)
        encoder_pb2_grpc.add_EncoderServiceServicer_to_server(EncoderServicer(engine), server)
        names.append(SERVICE_NAME)
    if cfg.role in ("all", "generator"):
        from avatar.v1 import generator_pb2_grpc
        from avatar.services.generator.engine import GeneratorEngine
        from avatar.services.generator.server import SERVICE_NAME, GeneratorServicer
        from avatar.services.generator import distributed
        if distributed.launched():   # torchrun: rank 0 of a TPP group (services/generator/distributed)
            from avatar.services.generator.distributed.tpp import start_rank0
            engine = await loop.run_in_executor(None, start_rank0, cfg.model)
            closers.append(engine.aclose)
        else:
            engine = await loop.run_in_executor(None, GeneratorEngine, cfg.model)
            if warmup:
                for line in await loop.run_in_executor(None, engine.warm_up, warmup_sizes(cfg.model)):
                    log.info("generator warm-up: %s", line)
        admission = Admission(cfg.admission, "generator") if cfg.admission else None
        generator_pb2_grpc.add_GeneratorServiceServicer_to_server(GeneratorServicer(engine, admission), server)
        names.append(SERVICE_NAME)
    if cfg.role in ("all", "decoder"):
        from avatar.v1 import decoder_pb2_grpc
        from avatar.services.decoder.engine import DecoderEngine
        from avatar.services.decoder.server import SERVICE_NAME, DecoderServicer
        engine = await loop.run_in_executor(None, DecoderEngine, cfg.model)
        if warmup:
            sizes = [(w, h) for w, h, _, _ in warmup_sizes(cfg.model)]
            for line in await loop.run_in_executor(None, engine.warm_up, sizes):
                log.info("decoder warm-up: %s", line)
        decoder_pb2_grpc.add_DecoderServiceServicer_to_server(DecoderServicer(engine), server)
        names.append(SERVICE_NAME)
    if cfg.role in ("all", "gateway"):
        from avatar.v1 import avatar_pb2_grpc
        from avatar.gateway.server import SERVICE_NAME, GatewayServicer
        if cfg.role == "all":
            # Same code path as a deployed mesh: the gateway calls its siblings over loopback.
            host = _host(cfg.listen)
            peers = (f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}",) * 3
        else:
            missing = [n for n in ("encoder", "generator", "decoder") if not getattr(cfg, n)]
            if missing:
                raise ValueError(f"--role gateway needs the peer addresses: {', '.join('--' + m for m in missing)}")
            peers = (cfg.encoder, cfg.generator, cfg.decoder)
        gateway = GatewayServicer(cfg.model, *peers, credentials=sec.peer_credentials(cfg.role),
                                  token=sec.peer_token(cfg.role),
                                  admission=Admission(cfg.admission, "gateway") if cfg.admission else None,
                                  live=cfg.live,
                                  **({"max_audio_s": cfg.max_audio_s} if cfg.max_audio_s else {}))
        avatar_pb2_grpc.add_AvatarServiceServicer_to_server(gateway, server)
        names.append(SERVICE_NAME)
        closers.append(gateway.close)

    health = grpc_util.add_health_and_reflection(server, names)
    await server.start()
    await grpc_util.set_serving(health, names)
    return RunningServer(server, port, health, names, closers, metrics_port)


async def serve_forever(cfg: ServeConfig) -> None:
    from avatar.services.generator import distributed
    if distributed.launched():
        if cfg.role != "generator":
            raise ValueError(f"under torchrun only --role generator runs (multi-GPU TPP), not {cfg.role!r}")
        if distributed.rank() != 0:
            # Ranks 1..N-1 serve no RPCs; they stop when rank 0 (draining on SIGTERM) tells them.
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, lambda: log.info("waiting for rank 0 to stop the group"))
            from avatar.services.generator.distributed.tpp import worker_main
            await asyncio.to_thread(worker_main, cfg.model)
            return
    running = await start(cfg)
    print(f"avatar serve: {cfg.role} ({', '.join(n.rsplit('.', 1)[-1] for n in running.service_names)}) "
          f"listening on {_host(cfg.listen)}:{running.port}{' (TLS)' if cfg.security.tls.cert else ''}, "
          f"model {cfg.model.describe()}"
          + (f", metrics on :{running.metrics_port}/metrics" if running.metrics_port else ""), file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("avatar serve: stopping", file=sys.stderr, flush=True)
    await running.stop(cfg.grace_s)
    telemetry.shutdown()
