"""`avatar serve --processes per-service`: the embedded mesh as one process per service.

In one process the gateway, the encoders, the DiT's Python loop and the VAE decode share one GIL;
on one H200 the VAE decode took 912 ms per 704*384 block there and 395 ms in its own process
(docs/performance.md, run O). So on a GPU host the embedded default starts the encoder, the
generator and the decoder as child processes on loopback behind a random internal token, and
hosts the gateway (and its public listener) itself, exactly as a deployed mesh runs them.

The children are tied to this process: they leave the terminal's process group (Ctrl-C reaches
the parent, which drains the gateway before stopping them) and die with it (PR_SET_PDEATHSIG).
A child that dies takes the whole server down with an error, so a supervisor restarts it whole.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from dataclasses import replace

from avatar import grpc_util
from avatar.security import SecurityConfig

log = logging.getLogger("avatar.app.processes")

# Started in this order: the encoder and decoder (fixed sizes, their warm-up peaks held by their
# allocators) before the generator, whose kept caches adapt to the memory left (a session short of
# memory frees them). The generator first held 55.8 GiB of an 80 GB H100 with three warmed sizes'
# caches, and the encoder's 22.8 GiB did not fit (2026-12-06, docs/performance.md).
CHILD_ROLES = ("encoder", "decoder", "generator")
METRICS_OFFSET = {"generator": 1, "encoder": 2, "decoder": 3}  # --metrics-port P: the children's P+1..P+3
MODES = ("auto", "one", "per-service")
STOP_TIMEOUT_S = 30.0


class ChildFailed(RuntimeError):
    """A child process exited: before serving, or while serving."""


def per_service(mode: str, role: str, device: str) -> bool:
    """Whether `serve` splits the embedded mesh: "auto" does on a GPU (CPU: one process is
    lighter and as fast for the tiny model)."""
    if mode not in MODES:
        raise ValueError(f"--processes {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "per-service" and role != "all":
        raise ValueError(f"--processes per-service splits --role all, not --role {role}")
    return role == "all" and (mode == "per-service" or (mode == "auto" and device.startswith("cuda")))


def _child_main(cfg, parent_pid: int, serving) -> None:
    """A child's entry point (spawned): one role of the mesh until the parent stops it. It binds
    a port of its own choosing (port 0) and sends it over `serving` once SERVING: a port the
    parent picked could be taken by an outgoing connection before the child bound it."""
    os.setpgrp()  # out of the terminal's foreground group: Ctrl-C is the parent's to handle
    if sys.platform.startswith("linux"):
        # PR_SET_PDEATHSIG: never outlive the parent. SIGKILL, not a drain: the gateway that was
        # the only client is gone.
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before that
        return
    from avatar.app.serve import serve_forever
    from avatar.logging_setup import setup_logging

    setup_logging(f"avatar-{cfg.role}")
    try:
        asyncio.run(serve_forever(cfg, on_serving=lambda running: serving.send(running.port)))
    except Exception as exc:  # noqa: BLE001 - one line for the parent's log, then a failing exit code
        print(
            f"avatar serve ({cfg.role}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            file=sys.stderr,
        )
        sys.exit(1)


class Children:
    """The encoder, generator and decoder processes of one split mesh."""

    def __init__(self, cfg):
        self.token = cfg.security.with_internal_token().internal_token
        self.addresses: dict[str, str] = {}
        self.procs: dict[str, multiprocessing.Process] = {}
        self.serving: dict = {}  # role -> the read end of the pipe its child sends its port on
        self._cfg = cfg

    def child_config(self, role: str, metrics_port: int | None):
        from avatar.app.serve import ServeConfig

        cfg = self._cfg
        # Internal services: loopback, the internal token, no TLS (as "all"'s internal listener).
        admission = cfg.admission.internal() if cfg.admission else None
        return ServeConfig(
            role=role,
            listen="127.0.0.1:0",  # the child's pick, reported once serving
            model=cfg.model,
            trace_file=f"{cfg.trace_file}.{role}" if cfg.trace_file else None,
            security=SecurityConfig(internal_token=self.token),
            admission=admission if role == "generator" else None,
            metrics_port=metrics_port,
            grace_s=cfg.grace_s,
            warmup=cfg.warmup,
            warmup_shapes=cfg.warmup_shapes,
            compile_cache=cfg.compile_cache,
            encoder_admission=cfg.encoder_admission,
        )

    async def start(self) -> None:
        """Starts the encoder and the decoder, then, once both serve, the generator (CHILD_ROLES
        says why); returns when each reports SERVING; raises if one exits first."""
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding CUDA or grpc
        metrics = self._cfg.metrics_port
        for role in CHILD_ROLES:
            child_metrics = metrics + METRICS_OFFSET[role] if metrics else None
            self.serving[role], child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_child_main,
                args=(self.child_config(role, child_metrics), os.getpid(), child_end),
                name=f"avatar-{role}",
            )
            proc.start()
            child_end.close()  # the child's copy is its own: EOF here once it exits
            self.procs[role] = proc
            log.info("started the %s (pid %d)", role, proc.pid)
            if role == "decoder":
                await self._wait_serving("encoder")
                await self._wait_serving("decoder")
        await self._wait_serving("generator")

    async def _wait_serving(self, role: str) -> None:
        proc, serving = self.procs[role], self.serving[role]
        while not serving.poll():
            if not proc.is_alive():
                break
            await asyncio.sleep(0.2)
        try:
            port = serving.recv()
        except EOFError:  # it exited before serving
            proc.join(5)
            raise ChildFailed(
                f"the {role} process exited with code {proc.exitcode} before serving (its log is above)"
            ) from None
        self.addresses[role] = f"127.0.0.1:{port}"
        log.info("the %s serves on %s", role, self.addresses[role])

    async def watch(self) -> str:
        """Returns (with the reason) when a child has exited."""
        while True:
            for role, proc in self.procs.items():
                if not proc.is_alive():
                    return f"the {role} process (pid {proc.pid}) exited with code {proc.exitcode}"
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        """SIGTERM (each drains its in-flight RPCs), then SIGKILL for one still there."""
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        deadline = asyncio.get_running_loop().time() + STOP_TIMEOUT_S
        for role, proc in self.procs.items():
            while proc.is_alive() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
            if proc.is_alive():
                log.warning("the %s process did not stop within %.0f s: killing it", role, STOP_TIMEOUT_S)
                proc.kill()
            proc.join(1)


async def serve_per_service(cfg) -> None:
    """`serve --role all` as a gateway in this process over three children; stops on SIGINT/SIGTERM
    (gateway first, then the children) or when a child dies (then raises, exit code 1)."""
    from avatar.app.serve import serve_forever

    if cfg.metrics_port and cfg.metrics_port + max(METRICS_OFFSET.values()) > 65535:
        raise ValueError(
            f"--metrics-port {cfg.metrics_port}: the children serve theirs on the next "
            f"{len(CHILD_ROLES)} ports, past 65535: choose a lower one"
        )
    # The public ports are checked (gRPC) and held (--http) before the children load for minutes.
    grpc_util._check_port_free(cfg.listen)
    web_socket = None
    if cfg.web is not None:
        from avatar.gateway.web.app import reserve_web_port

        web_socket = reserve_web_port(cfg.web)
    children = Children(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.create_task(children.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            return
        stopping.cancel()
        starting.result()
        gateway_cfg = replace(
            cfg,
            role="gateway",
            security=replace(cfg.security, internal_token=children.token),
            **{role: children.addresses[role] for role in CHILD_ROLES},
        )
        died = asyncio.create_task(children.watch())
        gateway = asyncio.create_task(serve_forever(gateway_cfg, stop=stop, web_socket=web_socket))
        await asyncio.wait({died, gateway}, return_when=asyncio.FIRST_COMPLETED)
        if died.done():
            stop.set()
            await gateway
            raise ChildFailed(f"{died.result()}: stopping the server")
        died.cancel()
        gateway.result()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await children.stop()
        if web_socket is not None:  # when the web front never took it
            web_socket.close()
