"""Hosts mesh services in one grpc.aio server: one role per process, or all four (the embedded default)."""

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from avatar import grpc_util, telemetry
from avatar.admission import Admission, AdmissionConfig, AdmitBeforeReading
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
    encoder: str | None = None  # addresses of the peers, for --role gateway
    generator: str | None = None
    decoder: str | None = None
    model: ModelSpec = ModelSpec()
    trace_file: str | None = None
    security: SecurityConfig = field(default_factory=SecurityConfig)  # TLS and tokens (avatar.security)
    admission: AdmissionConfig | None = None  # session cap + queue of gateway and generator; None: no cap
    metrics_port: int | None = None  # Prometheus /metrics on this port; None: off, 0: any free
    grace_s: float = GRACE_S  # shutdown: seconds in-flight streams get to finish
    max_audio_s: float | None = None  # gateway: longest speech input; None: avatar.media's default
    warmup: bool | None = None  # encoder, generator, decoder: run the presets once before SERVING; None: with --compile
    warmup_shapes: tuple = ()  # (width, height, infer_frames, sample_steps) to warm up beside the presets'
    live: object = None  # gateway: a gateway.converse.ConverseConfig; None: defaults
    compile_cache: str | None = None  # torch.compile caches kept here across restarts (use_compile_cache)
    # encoder: image and prompt encodes at once + waiting; beyond: RESOURCE_EXHAUSTED. None: no cap
    encoder_admission: AdmissionConfig | None = field(default_factory=lambda: AdmissionConfig(2, 8))
    # generator under torchrun: a ParallelConfig (services/generator/distributed); None: one process
    parallel: object = None
    web: object = None  # gateway: an avatar.gateway.web.app.WebConfig (`--http`); None: no web front
    router: object = None  # gateway: a gateway.replicas.ReplicaRouter in place of peer addresses (--ray)


@dataclass
class RunningServer:
    server: grpc.aio.Server  # the listener on cfg.listen (public in "all" and "gateway")
    port: int
    health: object
    service_names: list[str]
    closers: list
    metrics_port: int | None = None
    internal: grpc.aio.Server | None = None  # "all": the loopback listener of the internal services
    internal_health: object = None
    internal_port: int | None = None
    web: object = None  # the web front (avatar.gateway.web.app.RunningWeb) when --http is on
    servicers: dict = field(default_factory=dict)  # role -> its servicer (a Ray replica reads its load)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float = GRACE_S) -> None:
        """Health NOT_SERVING first (load balancers drain), then finish in-flight RPCs within `grace`.
        The internal listener stops last: the gateway's streams use it until they end."""
        for health in (self.health, self.internal_health):
            if health is not None:
                await health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.internal is not None:
            await self.internal.stop(0)
        for close in self.closers:
            await close()


def warmup_sizes(model: ModelSpec, extra: tuple = ()) -> list[tuple[int, int, int, int]]:
    """(width, height, infer_frames, sample_steps) of the hd and preview presets, largest first,
    at the model's own sizes (avatar.presets.preset_area); clips are whole blocks of 12 frames.
    Then `extra` (--warmup-shape), less what the presets already run."""
    from avatar.presets import JOB_PRESETS, preset_area, whole_blocks

    sizes = [
        (
            *preset_area(JOB_PRESETS[name], model),
            whole_blocks(JOB_PRESETS[name].infer_frames),
            JOB_PRESETS[name].sample_steps,
        )
        for name in ("hd", "preview")
    ]
    return sizes + [s for s in dict.fromkeys(extra) if s not in sizes]


def parse_warmup_shape(text: str, model: ModelSpec) -> tuple[int, int, int, int]:
    """`WxH[@STEPS][/FRAMES]` -> (width, height, infer_frames, sample_steps): a video size exactly as
    a stream's header reports it (a request's --size is an area the portrait's aspect shapes), the
    steps and frames per clip defaulting to what a request that names neither gets (the default
    preset's). ValueError with the reason."""
    from avatar.dit_config import MAX_SAMPLE_STEPS
    from avatar.gateway.planner import MIN_SIDE
    from avatar.job_limits import MAX_INFER_FRAMES
    from avatar.presets import DEFAULT_JOB_PRESET, JOB_PRESETS, whole_blocks

    preset = JOB_PRESETS[DEFAULT_JOB_PRESET]
    usage = f"--warmup-shape {text!r}: expected WIDTHxHEIGHT[@STEPS][/FRAMES], e.g. 384x256@4 or 512x512@4/48"
    size, _, frames = text.strip().partition("/")
    size, _, steps = size.partition("@")
    try:
        width, height = (int(v) for v in size.lower().split("x"))
        steps_n = int(steps) if steps else preset.sample_steps
        frames_n = int(frames) if frames else preset.infer_frames
    except ValueError:
        raise ValueError(usage) from None
    d = model.size_divisor
    if width < MIN_SIDE or height < MIN_SIDE or width % d or height % d:
        raise ValueError(
            f"--warmup-shape {text!r}: the video's sides must be multiples of {d} of at least {MIN_SIDE} "
            f"(the sizes this model makes), got {width}x{height}"
        )
    if not 1 <= steps_n <= MAX_SAMPLE_STEPS:
        raise ValueError(f"--warmup-shape {text!r}: steps must be between 1 and {MAX_SAMPLE_STEPS}, got {steps_n}")
    if not 1 <= frames_n <= MAX_INFER_FRAMES:
        raise ValueError(f"--warmup-shape {text!r}: frames must be between 1 and {MAX_INFER_FRAMES}, got {frames_n}")
    return width, height, whole_blocks(frames_n), steps_n


def use_compile_cache(directory: str) -> Path:
    """Keeps torch.compile's work across restarts: inductor's FX graph cache and generated code,
    and Triton's kernels, under `directory` (a volume in deploy/). A second start with the same
    directory loads the compiled graphs instead of compiling them (minutes on an H200)."""
    path = Path(directory).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--compile-cache {directory}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"--compile-cache {directory}: not writable by this user")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    import torch._inductor.config as inductor_config  # read its environment at import: set it too

    inductor_config.fx_graph_cache = True
    return path


def decoder_model(model: ModelSpec) -> ModelSpec:
    """The decoder's ModelSpec: its VAE on --decoder-device when one is given (a GPU of its own,
    so the decode never queues behind the DiT), else on --device."""
    return model.with_(device=model.decoder_device) if model.decoder_device else model


def _pixel_sizes(shapes: list) -> list[tuple[int, int]]:
    """The encoder's and decoder's warm-up: each (width, height) once (steps and frames are the DiT's)."""
    return list(dict.fromkeys((w, h) for w, h, _, _ in shapes))


def _sharded(cfg: ServeConfig) -> bool:
    return cfg.parallel is not None and cfg.parallel.sharded


def _host(listen: str) -> str:
    return listen.rsplit(":", 1)[0].strip("[]")


def _warm_up(kind: str, engine, sizes: list) -> None:
    """One size at a time, saying what compiles before it starts (a first compilation takes
    minutes): the log shows where a slow start spends its time."""
    for size in sizes:
        log.info(
            "%s warm-up: compiling/running %s (health NOT_SERVING until every size is done)",
            kind,
            "*".join(str(v) for v in size[:2]),
        )
        for line in engine.warm_up([size]):
            log.info("%s warm-up: %s", kind, line)


async def start(cfg: ServeConfig, web_socket=None) -> RunningServer:
    """Builds the role's engines, binds, starts (health NOT_SERVING), warms up when asked and then
    reports SERVING. Port 0 picks a free port. `web_socket`: the --http port, already reserved
    (app/processes.py reserves it before its children load).

    "all" hosts the gateway on cfg.listen and the internal services on a second listener on
    loopback (a free port) behind the internal token, a random one per process unless given:
    the public port never exposes the internal services, and it takes requests up to
    PUBLIC_MAX_REQUEST_BYTES while internal traffic keeps the 64 MiB limit.
    """
    if cfg.role not in ROLES:
        raise ValueError(f"unknown role {cfg.role!r}: choose one of {', '.join(ROLES)}")
    if cfg.web is not None:
        if cfg.role not in ("all", "gateway"):
            raise ValueError(f"--http serves the public API: it runs with --role all or gateway, not {cfg.role}")
        if web_socket is None:  # held from now on: refused before minutes of model loading, not after
            from avatar.gateway.web.app import reserve_web_port

            web_socket = reserve_web_port(cfg.web)
    telemetry.setup(f"avatar-{cfg.role}", cfg.trace_file)
    if cfg.compile_cache:
        path = use_compile_cache(cfg.compile_cache)
        log.info("torch.compile caches in %s", path)
    sec = cfg.security.with_internal_token() if cfg.role == "all" else cfg.security
    for warning in sec.exposure_warnings(cfg.role, cfg.listen):
        log.warning(warning)
    public = cfg.role in ("all", "gateway")
    interceptors = [MetricsInterceptor(), *sec.server_interceptors(cfg.role)]
    gateway_admission = None  # shared by Generate (in the interceptor) and Converse (in the servicer)
    if public and cfg.admission:
        from avatar.gateway.server import SERVICE_NAME as GATEWAY_SERVICE

        # After auth: a refused call costs nothing; an admitted one is read only when it runs.
        gateway_admission = Admission(cfg.admission, "gateway", token_checked=bool(sec.auth_token))
        interceptors.append(AdmitBeforeReading(gateway_admission, [f"/{GATEWAY_SERVICE}/Generate"]))
    server, port = grpc_util.create_server(
        cfg.listen,
        sec.tls.server_credentials(),
        interceptors,
        max_request_bytes=grpc_util.PUBLIC_MAX_REQUEST_BYTES if public else grpc_util.MAX_MESSAGE_BYTES,
    )
    internal, internal_port = server, port
    if cfg.role == "all":
        internal, internal_port = grpc_util.create_server(
            "127.0.0.1:0", None, [MetricsInterceptor(), *sec.server_interceptors("internal")]
        )
    names: list[str] = []  # services on `server`
    internal_names: list[str] = []  # services on `internal` when it is a second listener
    on_internal = internal_names if internal is not server else names
    closers = []
    servicers = {}
    warmups = []
    metrics_port = None
    if cfg.metrics_port is not None:
        from avatar.metrics import start_metrics_server

        http, metrics_port = start_metrics_server(cfg.metrics_port, _host(cfg.listen) or "0.0.0.0")

        async def close_metrics(http=http):
            http.shutdown()
            http.server_close()

        closers.append(close_metrics)
    loop = asyncio.get_running_loop()
    tpp_engine = None  # rank 0 of a multi-GPU generator group
    warmup = cfg.warmup if cfg.warmup is not None else cfg.model.compile
    internal_admission = cfg.admission.internal() if cfg.admission else None

    # Each role imports only its own engine (a gateway loads no model code); engines build in a
    # thread so a slow checkpoint load does not block the loop.
    if cfg.role in ("all", "encoder"):
        from avatar.services.encoder.engine import EncoderEngine
        from avatar.services.encoder.server import SERVICE_NAME, EncoderServicer
        from avatar.v1 import encoder_pb2_grpc

        engine = await loop.run_in_executor(None, EncoderEngine, cfg.model)
        if warmup:
            warmups.append(("encoder", engine, _pixel_sizes(warmup_sizes(cfg.model, cfg.warmup_shapes))))
        encoder_admission = Admission(cfg.encoder_admission, "encoder") if cfg.encoder_admission else None
        encoder_pb2_grpc.add_EncoderServiceServicer_to_server(EncoderServicer(engine, encoder_admission), internal)
        on_internal.append(SERVICE_NAME)
    if cfg.role in ("all", "generator"):
        from avatar.services.generator import distributed
        from avatar.services.generator.engine import GeneratorEngine
        from avatar.services.generator.server import SERVICE_NAME, GeneratorServicer
        from avatar.v1 import generator_pb2_grpc

        if distributed.launched() and cfg.model.avatar_loras:
            raise ValueError(
                "--avatar-lora is not served by a multi-GPU (TPP or FSDP) generator yet: "
                "serve per-avatar LoRAs from single-GPU generators"
            )
        if distributed.launched() and _sharded(cfg):  # torchrun: rank 0 of an FSDP2 shard group
            from avatar.services.generator.distributed.sharding import start_rank0

            engine = await loop.run_in_executor(None, start_rank0, cfg.model, cfg.parallel)
            closers.append(engine.aclose)
        elif distributed.launched():  # torchrun: rank 0 of a TPP group (services/generator/distributed)
            from avatar.services.generator.distributed.tpp import start_rank0

            # The group takes as many sessions at once as the generator admits (--max-sessions).
            group_sessions = (cfg.admission or AdmissionConfig()).max_sessions
            engine = await loop.run_in_executor(None, start_rank0, cfg.model, group_sessions)
            closers.append(engine.aclose)
            tpp_engine = engine
        else:
            engine = await loop.run_in_executor(None, GeneratorEngine, cfg.model)
            if warmup:
                warmups.append(("generator", engine, warmup_sizes(cfg.model, cfg.warmup_shapes)))
        admission = Admission(internal_admission, "generator") if internal_admission else None
        servicers["generator"] = GeneratorServicer(engine, admission)
        generator_pb2_grpc.add_GeneratorServiceServicer_to_server(servicers["generator"], internal)
        on_internal.append(SERVICE_NAME)
    if cfg.role in ("all", "decoder"):
        from avatar.services.decoder.engine import DecoderEngine
        from avatar.services.decoder.server import SERVICE_NAME, DecoderServicer
        from avatar.v1 import decoder_pb2_grpc

        engine = await loop.run_in_executor(None, DecoderEngine, decoder_model(cfg.model))
        if warmup:
            warmups.append(("decoder", engine, _pixel_sizes(warmup_sizes(cfg.model, cfg.warmup_shapes))))
        decoder_pb2_grpc.add_DecoderServiceServicer_to_server(DecoderServicer(engine), internal)
        on_internal.append(SERVICE_NAME)
    gateway = None
    if cfg.role in ("all", "gateway"):
        from avatar.gateway.server import SERVICE_NAME, GatewayServicer
        from avatar.v1 import avatar_pb2_grpc

        if cfg.role == "all":
            # Same code path as a deployed mesh: the gateway calls its siblings over loopback.
            peers = (f"127.0.0.1:{internal_port}",) * 3
        elif cfg.router is not None:  # --ray: the router picks replicas per session
            peers = (None, None, None)
        else:
            missing = [n for n in ("encoder", "generator", "decoder") if not getattr(cfg, n)]
            if missing:
                raise ValueError(f"--role gateway needs the peer addresses: {', '.join('--' + m for m in missing)}")
            peers = (cfg.encoder, cfg.generator, cfg.decoder)
        gateway = GatewayServicer(
            cfg.model,
            *peers,
            credentials=sec.peer_credentials(cfg.role),
            token=sec.peer_token(cfg.role),
            admission=gateway_admission,
            live=cfg.live,
            router=cfg.router,
            **({"max_audio_s": cfg.max_audio_s} if cfg.max_audio_s else {}),
        )
        avatar_pb2_grpc.add_AvatarServiceServicer_to_server(gateway, server)
        names.append(SERVICE_NAME)
        closers.append(gateway.close)

    health = grpc_util.add_health_and_reflection(server, names)
    if tpp_engine is not None:  # a rank that dies: NOT_SERVING at once, before rank 0 exits
        tpp_engine.on_failure(
            lambda reason: asyncio.run_coroutine_threadsafe(grpc_util.set_serving(health, names, False), loop)
        )
    internal_health = None
    if internal is not server:
        internal_health = grpc_util.add_health_and_reflection(internal, internal_names)
        await internal.start()
    await server.start()
    running = RunningServer(
        server,
        port,
        health,
        names,
        closers,
        metrics_port,
        internal if internal is not server else None,
        internal_health,
        internal_port if internal is not server else None,
        servicers=servicers,
    )
    # Listening, but NOT_SERVING while the models warm up (compile): probes see progress, not
    # connection refused, and load balancers send nothing yet.
    await grpc_util.set_serving(health, names, False)
    for kind, engine, sizes in warmups:
        await loop.run_in_executor(None, _warm_up, kind, engine, sizes)
    if internal_health is not None:
        await grpc_util.set_serving(internal_health, internal_names)
    await grpc_util.set_serving(health, names)
    if gateway is not None and cfg.web is not None:
        try:
            running.web = await _start_web(cfg, gateway, interceptors, closers, web_socket)
        except BaseException:
            await running.stop(0)
            raise
    if gateway is not None:
        # NOT_SERVING for the gateway's name while a service behind it is unreachable
        closers.insert(0, gateway.watch_peers(health, SERVICE_NAME))
    return running


async def _start_web(cfg: ServeConfig, gateway, interceptors: list, closers: list, sock=None):
    """The web front (avatar.gateway.web) on the same loop. It calls the public API as a client
    does, over its own loopback listener with the public listener's interceptors (auth, admission,
    metrics) and limits, so that TLS on the public port needs no client setup here."""
    from avatar.gateway.web.app import start_web
    from avatar.v1 import avatar_pb2_grpc

    listener, port = grpc_util.create_server(
        "127.0.0.1:0", None, interceptors, max_request_bytes=grpc_util.PUBLIC_MAX_REQUEST_BYTES
    )
    avatar_pb2_grpc.add_AvatarServiceServicer_to_server(gateway, listener)
    await listener.start()
    try:
        web = await start_web(replace(cfg.web, grpc_address=f"127.0.0.1:{port}"), sock=sock)
    except BaseException:
        await listener.stop(0)
        raise

    async def stop_web():
        await web.stop()  # its sessions end first, then the listener they used
        await listener.stop(0)

    closers.insert(0, stop_web)
    return web


async def serve_forever(
    cfg: ServeConfig,
    stop: asyncio.Event | None = None,
    on_serving: Callable[[RunningServer], None] | None = None,
    web_socket=None,
) -> None:
    """Serves until SIGINT/SIGTERM, or until `stop` is set when given (then the caller owns the
    signals: app/processes.py); `on_serving` is called once SERVING (a child tells its parent);
    `web_socket`: start's."""
    from avatar.services.generator import distributed

    if distributed.launched():
        if cfg.role != "generator":
            raise ValueError(f"under torchrun only --role generator runs (multi-GPU TPP), not {cfg.role!r}")
        if distributed.rank() != 0:
            # Ranks 1..N-1 serve no RPCs; they stop when rank 0 (draining on SIGTERM) tells them.
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, lambda: log.info("waiting for rank 0 to stop the group"))
            if _sharded(cfg):
                from avatar.services.generator.distributed.sharding import worker_main

                await asyncio.to_thread(worker_main, cfg.model, cfg.parallel)
                return
            from avatar.services.generator.distributed.tpp import worker_main

            await asyncio.to_thread(worker_main, cfg.model)
            return
    running = await start(cfg, web_socket)
    if on_serving is not None:
        on_serving(running)
    print(
        f"avatar serve: {cfg.role} ({', '.join(n.rsplit('.', 1)[-1] for n in running.service_names)}) "
        f"listening on {_host(cfg.listen)}:{running.port}{' (TLS)' if cfg.security.tls.cert else ''}, "
        f"model {cfg.model.describe()}"
        + (f", internal services on 127.0.0.1:{running.internal_port} (internal token)" if running.internal else "")
        + (f", metrics on :{running.metrics_port}/metrics" if running.metrics_port else "")
        + (f", web on {running.web.url}" if running.web else ""),
        file=sys.stderr,
        flush=True,
    )
    await until_stopped(stop)
    await running.stop(cfg.grace_s)
    telemetry.shutdown()


async def until_stopped(stop: asyncio.Event | None = None) -> None:
    """Waits for SIGINT/SIGTERM, or for `stop` when given (its setter owns the signals), and says so."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("avatar serve: stopping", file=sys.stderr, flush=True)
