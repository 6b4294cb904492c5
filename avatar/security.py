"""Transport security for every listener and channel: optional TLS/mTLS and bearer-token auth.

Public API (the gateway): clients send metadata ``authorization: Bearer <token>``; a missing or
wrong token ends the call with UNAUTHENTICATED before any work starts and before its request
body is read. Internal services (encoder, generator, decoder) accept calls only with the
internal token, which the gateway attaches to every downstream call; the public token never
opens them. The gRPC health service stays open so probes work.
Tokens are compared in constant time and never logged, put in messages or on spans.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

AUTH_HEADER = "authorization"
AUTH_TOKEN_ENV = "AVATAR_AUTH_TOKEN"
INTERNAL_TOKEN_ENV = "AVATAR_INTERNAL_TOKEN"
# Probes (Kubernetes gRPC probes, healthcheck) carry no credentials.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


# --- TLS -----------------------------------------------------------------------------------


def _read_pem(path: str | os.PathLike, what: str) -> bytes:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read TLS {what} {p}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"TLS {what} {p} is not a PEM file (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True)
class TLSConfig:
    """PEM file paths. cert+key: serve TLS; plus ca: require client certs signed by it (mTLS).
    On the client side: ca verifies the server; cert+key present a client certificate."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    def __post_init__(self):
        if bool(self.cert) != bool(self.key):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.ca)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        return server_credentials(self.cert, self.key, self.ca)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        return channel_credentials(self.ca, self.cert, self.key)


def server_credentials(cert: str | None, key: str | None, ca: str | None = None) -> grpc.ServerCredentials | None:
    """TLS credentials for a listener, or None for plaintext. With ca: mutual TLS, clients
    without a certificate signed by that CA are refused during the handshake."""
    if not cert and not key:
        if ca:
            raise ValueError("--tls-ca on a server needs --tls-cert and --tls-key too")
        return None
    if not (cert and key):
        raise ValueError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
    pair = (_read_pem(key, "key"), _read_pem(cert, "certificate"))
    root = _read_pem(ca, "CA") if ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


def channel_credentials(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials for a channel, or None for plaintext (no ca and no client cert)."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs its key (--tls-cert and --tls-key)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca, "CA") if ca else None,
        private_key=_read_pem(key, "key") if key else None,
        certificate_chain=_read_pem(cert, "certificate") if cert else None,
    )


def add_port(server, address: str, creds: grpc.ServerCredentials | None) -> int:
    """Binds a grpc (or grpc.aio) server to address, with TLS when creds is given."""
    port = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


def aio_channel(
    address: str, creds: grpc.ChannelCredentials | None = None, token: str | None = None, options: Iterable[tuple] = ()
) -> grpc.aio.Channel:
    """An asyncio channel that uses TLS when creds is given and sends token on every call."""
    interceptors = bearer_client_interceptors(token) if token else None
    options = list(options)
    if creds is not None:
        return grpc.aio.secure_channel(address, creds, options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options, interceptors=interceptors)


# --- tokens --------------------------------------------------------------------------------


def plaintext_token_warning(address: str, creds, token: str | None) -> str | None:
    """A warning when a token would cross the network unencrypted (no TLS, not loopback)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if token and creds is None and host not in ("127.0.0.1", "localhost", "::1"):
        return f"warning: sending the API token to {address} without TLS (pass --tls-ca to encrypt)"
    return None


def token_from(value: str | None, env: str) -> str | None:
    """A flag's value, else the environment variable, else None. Blank means unset."""
    value = value if value else os.environ.get(env, "")
    value = value.strip()
    return value or None


def token_fingerprint(token: str) -> str:
    """A short, non-reversible name for a token: safe in logs and metrics labels."""
    return "tok-" + hashlib.sha256(token.encode()).hexdigest()[:12]


def bearer_token(metadata) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry in call metadata, if any."""
    for key, value in metadata or ():
        if key.lower() == AUTH_HEADER:
            value = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""
    return None


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls whose bearer token is not one of `tokens` with UNAUTHENTICATED.

    realm names the credential in the refusal ("API token" for the public API, "internal
    token" for internal services) so an operator knows which secret is wrong.
    """

    def __init__(
        self, tokens: Iterable[str], realm: str = "API token", open_prefixes: Iterable[str] = OPEN_METHOD_PREFIXES
    ):
        self._tokens = [t.encode() for t in tokens if t]
        if not self._tokens:
            raise ValueError("BearerAuthInterceptor needs at least one non-empty token")
        self._realm = realm
        self._open = tuple(open_prefixes)

    def _allowed(self, token: str | None) -> bool:
        if not token:
            return False
        given = token.encode()
        # compare against every token (no early exit) so timing says nothing about which matched
        return any([hmac.compare_digest(given, t) for t in self._tokens])

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._open):
            return handler
        token = bearer_token(details.invocation_metadata)
        if self._allowed(token):
            return handler
        if token is None:
            reason = f"missing {self._realm}: send metadata 'authorization: Bearer <token>'"
        else:
            reason = f"invalid {self._realm}"
        return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, reason)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, reason: str):
    """A handler that ends the call with code and reason without reading the request.

    Always shaped as a request stream that is never iterated: for a unary method grpc would
    first buffer the whole request message (up to the message limit) before calling us, so an
    unauthenticated client could make the server hold 32 MiB per call. HTTP/2 frames carry no
    call shape, so the client sees a normal unary or streaming call end with `code`."""

    async def stream(requests, context):
        await context.abort(code, reason)
        yield  # never reached: makes this an async generator as streaming handlers must be

    return grpc.stream_stream_rpc_method_handler(
        stream, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class _BearerClientBase:
    def __init__(self, token: str):
        if not token:
            raise ValueError("a bearer token must not be empty")
        self._entry = (AUTH_HEADER, f"Bearer {token}")

    def _with_token(self, details):
        metadata = [(k, v) for k, v in (details.metadata or ()) if k.lower() != AUTH_HEADER]
        metadata.append(self._entry)
        return details._replace(metadata=grpc.aio.Metadata(*metadata))


class _UnaryUnaryBearer(_BearerClientBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._with_token(details), request)


class _UnaryStreamBearer(_BearerClientBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._with_token(details), request)


class _StreamUnaryBearer(_BearerClientBase, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._with_token(details), request_iterator)


class _StreamStreamBearer(_BearerClientBase, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._with_token(details), request_iterator)


def bearer_client_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add ``authorization: Bearer <token>`` to every call of an asyncio
    channel (grpc.aio files an interceptor under one call shape only, hence four)."""
    return [cls(token) for cls in (_UnaryUnaryBearer, _UnaryStreamBearer, _StreamUnaryBearer, _StreamStreamBearer)]


def auth_metadata(token: str | None) -> list[tuple[str, str]]:
    """Call metadata carrying token (for sync stubs and one-off calls); empty without a token."""
    return [(AUTH_HEADER, f"Bearer {token}")] if token else []


@dataclass(frozen=True)
class SecurityConfig:
    """Everything a server or client process needs to know about TLS and tokens."""

    tls: TLSConfig = TLSConfig()
    auth_token: str | None = None  # public API token (gateway); None: no auth
    internal_token: str | None = None  # internal services' token; None: no auth

    def __repr__(self) -> str:  # never print tokens, even by accident
        return (
            f"SecurityConfig(tls={self.tls!r}, auth_token={'set' if self.auth_token else None}, "
            f"internal_token={'set' if self.internal_token else None})"
        )

    __str__ = __repr__

    def server_interceptors(self, role: str) -> list[grpc.aio.ServerInterceptor]:
        """Auth for a listener hosting `role` ("gateway", "encoder", ..., "internal", or "all").

        The gateway checks the public token. Internal roles check the internal token. "all" is
        the public listener of the embedded mesh: it hosts only the gateway (its internal
        services listen on loopback behind the internal token: avatar.app.serve), so a public
        token never opens an internal service.
        """
        if role in ("gateway", "all"):
            tokens, realm = [self.auth_token], "API token"
        else:
            tokens, realm = [self.internal_token], "internal token"
        tokens = [t for t in tokens if t]
        return [BearerAuthInterceptor(tokens, realm)] if tokens else []

    def peer_credentials(self, role: str) -> grpc.ChannelCredentials | None:
        """TLS for the gateway's calls to encoder/generator/decoder.

        With a CA: mutual TLS (this process's certificate is its client certificate). A gateway
        with only a public certificate talks to its peers in plaintext, and so does the embedded
        mesh ("all") on its internal loopback listener.
        """
        if role != "all" and self.tls.ca:
            return self.tls.channel_credentials()
        return None

    def peer_token(self, role: str) -> str | None:
        """Token the gateway sends to its peers: the internal one."""
        return self.internal_token

    def with_internal_token(self) -> SecurityConfig:
        """This config with an internal token: the given one, else a random one for this process
        (the embedded mesh's internal listener must not be open to other local users)."""
        if self.internal_token:
            return self
        return replace(self, internal_token=secrets.token_urlsafe(32))

    def exposure_warnings(self, role: str, listen: str) -> list[str]:
        """What an operator should know before `role` listens on `listen` (HOST:PORT) beyond
        loopback without credentials; empty for loopback or when tokens are set."""
        host = listen.rsplit(":", 1)[0].strip("[]")
        if host in ("127.0.0.1", "localhost", "::1"):
            return []
        out = []
        if role in ("gateway", "all") and not self.auth_token:
            out.append(f"the public API on {listen} accepts calls without a token (set {AUTH_TOKEN_ENV})")
        if role not in ("gateway", "all") and not self.internal_token:
            out.append(f"internal services on {listen} accept calls without a token (set {INTERNAL_TOKEN_ENV})")
        return out

    @classmethod
    def from_args(cls, args) -> SecurityConfig:
        """From parsed CLI flags (--tls-cert/--tls-key/--tls-ca/--auth-token/--internal-token)
        with AVATAR_AUTH_TOKEN / AVATAR_INTERNAL_TOKEN as fallbacks."""
        return cls(
            tls=TLSConfig(
                getattr(args, "tls_cert", None), getattr(args, "tls_key", None), getattr(args, "tls_ca", None)
            ),
            auth_token=token_from(getattr(args, "auth_token", None), AUTH_TOKEN_ENV),
            internal_token=token_from(getattr(args, "internal_token", None), INTERNAL_TOKEN_ENV),
        )


def add_security_args(parser) -> None:
    """The TLS/auth flags, shared by `avatar serve`, `avatar generate` and `avatar batch`."""
    g = parser.add_argument_group("security")
    g.add_argument(
        "--tls-cert", metavar="PEM", help="TLS certificate chain (server: listen with TLS; client: present it for mTLS)"
    )
    g.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    g.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="CA bundle (server: require client certs it signed = mTLS; client: verify the server with it)",
    )
    g.add_argument(
        "--auth-token",
        metavar="TOKEN",
        help=f"bearer token of the public API (default: ${AUTH_TOKEN_ENV}; prefer the variable: flags show up in `ps`)",
    )
    g.add_argument(
        "--internal-token",
        metavar="TOKEN",
        help=f"token between gateway and internal services (default: ${INTERNAL_TOKEN_ENV})",
    )
