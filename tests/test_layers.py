"""Every arrow points down: the foundation (`avatar`, the folder avatar/) imports no service, no
gateway and no application code, neither at import time nor inside a function."""

import ast
import json
import subprocess
import sys

from tests.conftest import ROOT

UPPER = ("avatar.services", "avatar.gateway", "avatar.app")


def foundation_modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "avatar").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def test_the_foundation_imports_nothing_above_it():
    """Imports every foundation module in a fresh interpreter, then lists what got loaded."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {foundation_modules()!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = json.loads(r.stdout)
    assert "avatar.wire" in loaded and "avatar.v1.avatar_pb2" in loaded, "the check imported the foundation"
    above = [m for m in loaded if m.startswith(UPPER)]
    assert not above, f"the foundation imported {above}"


def test_no_foundation_source_names_an_upper_layer():
    """Also the imports inside functions, which the first test does not run."""
    offenders = []
    for path in sorted((ROOT / "avatar").rglob("*.py")):
        if "v1" in path.relative_to(ROOT).parts:  # generated stubs
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            bad = [n for n in names if n.startswith(UPPER) or n.split(".")[0] in ("services", "gateway", "app")]
            if bad:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {bad[0]}")
    assert not offenders, "foundation modules import upward:\n" + "\n".join(offenders)


def test_the_upper_layers_are_installed_under_avatar():
    """`services`, `gateway` and `app` are not top-level import names (they would clash with other
    code); the CLI is avatar.app.cli."""
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util as u; "
            "print([n for n in ('services', 'gateway', 'app') if u.find_spec(n)]); "
            "import avatar.app.cli, avatar.gateway.server, avatar.services.generator.engine",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
