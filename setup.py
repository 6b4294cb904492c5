"""Generates the gRPC stubs (protos/ -> avatar/v1, not committed) before the wheel is packaged.
Everything else is in pyproject.toml."""
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithStubs(build_py):
    def run(self):
        subprocess.check_call([sys.executable, str(Path(__file__).parent / "tools" / "gen_protos.py")])
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
