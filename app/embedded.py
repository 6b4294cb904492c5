"""Where `avatar generate` and `avatar batch` send requests: a gateway (--server) or an in-process mesh."""

import contextlib
from collections.abc import AsyncIterator

from avatar import telemetry
from avatar.client import AvatarClient, RetryPolicy
from avatar.errors import WeightsError
from avatar.presets import ModelSpec
from avatar.security import SecurityConfig


class SetupError(Exception):
    """No client could be made: a TLS file is wrong, or the embedded mesh cannot start (weights,
    port). Something the user fixes; the message says what."""


@contextlib.asynccontextmanager
async def client_for(args, model: ModelSpec | None, retry: RetryPolicy | None = None) -> AsyncIterator[AvatarClient]:
    """A client of `--server` with the TLS and token flags, or, without --server, of the whole
    mesh (`avatar serve --role all`) started in this process on a free loopback port and stopped
    on exit: the same code path as a deployed mesh. SetupError for bad TLS files or a mesh that
    cannot start (weights, port)."""
    retry = retry or RetryPolicy()
    trace_file = getattr(args, "trace_file", None)
    if args.server:
        telemetry.setup("avatar-cli", trace_file)
        try:
            sec = SecurityConfig.from_args(args)
            client = AvatarClient(
                args.server,
                tls_ca=sec.tls.ca,
                tls_cert=sec.tls.cert,
                tls_key=sec.tls.key,
                token=sec.auth_token,
                retry=retry,
            )
        except ValueError as exc:
            raise SetupError(str(exc)) from None
        async with client:
            yield client
        return
    from avatar.app.serve import ServeConfig, start

    try:
        mesh = await start(ServeConfig(role="all", listen="127.0.0.1:0", model=model, trace_file=trace_file))
    except (ValueError, OSError, WeightsError) as exc:
        raise SetupError(str(exc).replace("\n", " ")) from None
    try:
        # loopback only and open: the embedded mesh takes no token
        async with AvatarClient(mesh.address, retry=retry) as client:
            yield client
    finally:
        await mesh.stop(grace=1.0)
