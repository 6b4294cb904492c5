"""The avatar mesh's foundation: wire format, presets, errors, media, checkpoints, telemetry,
security and gRPC utilities, shared by every service. It imports no service, no gateway and no
application code (tests/test_layers.py checks): those are installed beside it as
`avatar.services.*`, `avatar.gateway` and `avatar.app` (pyproject.toml says which folder is which).
"""

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed avatar-mesh version ("unknown" in a source tree that was never installed)."""
    try:
        return version("avatar-mesh")
    except PackageNotFoundError:
        return "unknown"
