"""Where `avatar generate`, `batch` and `converse` send requests: a gateway (--server) or an in-process mesh."""

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from avatar import telemetry
from avatar.client import AvatarClient, RetryPolicy
from avatar.errors import WeightsError
from avatar.presets import ModelSpec
from avatar.security import SecurityConfig, TLSConfig


class SetupError(Exception):
    """No client could be made: a TLS file is wrong, or the embedded mesh cannot start (weights,
    port). Something the user fixes; the message says what."""


@dataclass(frozen=True)
class Gateway:
    """Where to send public requests: an address, the TLS files to reach it, and the API token."""

    address: str
    tls: TLSConfig
    token: str | None


@contextlib.asynccontextmanager
async def gateway_for(args, model: ModelSpec | None) -> AsyncIterator[Gateway]:
    """`--server` with the TLS and token flags, or, without --server, the whole mesh (`avatar
    serve --role all`) started in this process on a free loopback port and stopped on exit: the
    same code path as a deployed mesh. SetupError for bad TLS flags or a mesh that cannot start
    (weights, port)."""
    trace_file = getattr(args, "trace_file", None)
    if args.server:
        telemetry.setup("avatar-cli", trace_file)
        try:
            sec = SecurityConfig.from_args(args)
        except ValueError as exc:
            raise SetupError(str(exc)) from None
        yield Gateway(args.server, sec.tls, sec.auth_token)
        return
    from avatar.app.serve import ServeConfig, start

    try:
        mesh = await start(ServeConfig(role="all", listen="127.0.0.1:0", model=model, trace_file=trace_file))
    except (ValueError, OSError, WeightsError) as exc:
        raise SetupError(str(exc).replace("\n", " ")) from None
    try:
        yield Gateway(mesh.address, TLSConfig(), None)  # loopback only and open: the embedded mesh takes no token
    finally:
        await mesh.stop(grace=1.0)


@contextlib.asynccontextmanager
async def client_for(args, model: ModelSpec | None, retry: RetryPolicy | None = None) -> AsyncIterator[AvatarClient]:
    """An AvatarClient of the gateway `gateway_for` gives. SetupError for bad TLS files too."""
    async with gateway_for(args, model) as gateway:
        try:
            client = AvatarClient(
                gateway.address,
                tls_ca=gateway.tls.ca,
                tls_cert=gateway.tls.cert,
                tls_key=gateway.tls.key,
                token=gateway.token,
                retry=retry or RetryPolicy(),
            )
        except ValueError as exc:
            raise SetupError(str(exc)) from None
        async with client:
            yield client
