"""Probe a server's gRPC health service: `python -m avatar.app.healthcheck HOST:PORT` (exit 0 = SERVING,
1 = not serving or unreachable, 2 = a bad address or TLS file)."""

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from avatar.app import arg_types


def check(
    address: str,
    service: str = "",
    timeout: float = 3.0,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    server_name: str | None = None,
) -> str:
    """Returns the serving status name ("SERVING", "NOT_SERVING", ...) or raises grpc.RpcError."""
    from avatar.grpc_util import check_port_range
    from avatar.security import channel_credentials

    check_port_range(address)
    creds = channel_credentials(tls_ca, tls_cert, tls_key)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = (
        grpc.secure_channel(address, creds, options) if creds is not None else grpc.insecure_channel(address, options)
    )
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="avatar.app.healthcheck", description=__doc__)
    p.add_argument("address", help="HOST:PORT of an avatar server, e.g. 127.0.0.1:50051")
    p.add_argument("--service", default="", help="health service name; empty: the whole server")
    p.add_argument("--timeout", type=arg_types.positive_seconds, default=3.0, help="seconds, e.g. 3")
    p.add_argument("--tls-ca", default=os.environ.get("AVATAR_TLS_CA"), help="CA bundle (PEM) for TLS")
    p.add_argument("--tls-cert", default=os.environ.get("AVATAR_TLS_CLIENT_CERT"), help="client cert for mTLS")
    p.add_argument("--tls-key", default=os.environ.get("AVATAR_TLS_CLIENT_KEY"), help="client key for mTLS")
    p.add_argument("--server-name", default=None, help="TLS name to expect when it differs from HOST")
    a = p.parse_args(argv)
    try:
        status = check(a.address, a.service, a.timeout, a.tls_ca, a.tls_cert, a.tls_key, a.server_name)
    except grpc.RpcError as e:
        print(f"{a.address}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # a bad address or TLS file: the caller's to fix
        print(f"avatar.app.healthcheck: error: {e}", file=sys.stderr)
        return 2
    print(f"{a.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
