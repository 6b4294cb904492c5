"""Generates the gRPC stubs (protos/ -> avatar/v1, not committed) before setuptools looks for the
packages, so the wheel and the sdist carry them. Everything else is in pyproject.toml."""

import subprocess
import sys
from pathlib import Path

from setuptools import setup

subprocess.check_call([sys.executable, str(Path(__file__).resolve().parent / "tools" / "gen_protos.py")])
setup()
