"""`avatar serve --http`: the flags of the web front (avatar.gateway.web) and its config."""

from __future__ import annotations

import argparse


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("web front (HTTP, WebSocket, the page)")
    g.add_argument(
        "--http",
        metavar="[HOST:]PORT",
        default=None,
        help="also serve the web page, WebSocket live sessions and HTTP video jobs on this port "
        "(host default 127.0.0.1; HTTPS with --tls-cert/--tls-key; same --auth-token); default: off",
    )
    g.add_argument(
        "--http-allowed-origins",
        metavar="ORIGIN[,ORIGIN]",
        default="",
        help="WebSocket origins allowed beside the page's own host, e.g. https://app.example.com ('*': any)",
    )


def web_config(args, security):
    """The WebConfig for `--http`, or None when it is off; UserError for a bad value."""
    from avatar.app.cli import UserError
    from avatar.gateway.web.app import WebConfig, parse_listen

    if args.http is None:
        return None
    try:
        host, port = parse_listen(args.http)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    origins = tuple(o.strip().rstrip("/") for o in args.http_allowed_origins.split(",") if o.strip())
    bad = [o for o in origins if o != "*" and "://" not in o]
    if bad:
        raise UserError(f"--http-allowed-origins: {bad[0]!r} is not an origin like https://app.example.com")
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return WebConfig(listen=listen, auth_token=security.auth_token, allowed_origins=origins, tls=security.tls)
