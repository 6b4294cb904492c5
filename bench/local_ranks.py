"""N ranks of a command on this host, started the way torchrun starts them (env rendezvous on
127.0.0.1): the launcher of bench/bench_tpp.py and of the multi-rank tests (tests/conftest.py)."""

import os
import subprocess
import time
from pathlib import Path

from avatar.grpc_util import free_port  # noqa: F401 - also the tests' (tests/conftest.py)
from avatar.services.generator.distributed import torchrun_env

ROOT = Path(__file__).resolve().parents[1]


class RanksTimedOut(TimeoutError):
    """The ranks did not all finish in time (all were killed); `exit_codes` has each rank's exit
    code at the deadline, None for a rank that was still running."""

    def __init__(self, message: str, exit_codes: list[int | None]):
        super().__init__(message)
        self.exit_codes = exit_codes


def run_ranks(
    n: int, argv: list[str], timeout: float, env: dict | None = None, capture: bool = True, what: str = "group"
) -> list[tuple[int, str]]:
    """Runs `argv` as n ranks in the repository root (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT ... over this environment and `env`); returns each rank's (exit code, output: stdout
    and stderr, or "" when not `capture`d, then the ranks write to this process's). Always reaps
    them; raises RanksTimedOut when they are not all done after `timeout` seconds."""
    port = free_port()
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT} if capture else {}
    procs = []
    try:
        for r in range(n):
            rank_env = {**os.environ, **torchrun_env(r, n, port), **(env or {})}
            procs.append(subprocess.Popen(argv, cwd=ROOT, env=rank_env, **streams))
        deadline = time.monotonic() + timeout
        logs = []
        for p in procs:
            try:
                logs.append((p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] or b"").decode())
            except subprocess.TimeoutExpired:
                codes = [q.poll() for q in procs]
                raise RanksTimedOut(f"{what} of {n} did not finish in {timeout:.0f} s", codes) from None
        return [(p.returncode, log) for p, log in zip(procs, logs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
