"""N ranks of a command on this host, started the way torchrun starts them (env rendezvous on
127.0.0.1): the launcher of bench/bench_tpp.py and of the multi-rank tests (tests/conftest.py)."""

import os
import random
import socket
import subprocess
import time
from pathlib import Path

from avatar.services.generator.distributed import torchrun_env

ROOT = Path(__file__).resolve().parents[1]


class RanksTimedOut(TimeoutError):
    """The ranks did not all finish in time (all were killed); `exit_codes` has each rank's exit
    code at the deadline, None for a rank that was still running."""

    def __init__(self, message: str, exit_codes: list[int | None]):
        super().__init__(message)
        self.exit_codes = exit_codes


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A loopback port nothing listens on, for a server about to start.

    Outside the kernel's ephemeral range on purpose: a port from that range (what binding port 0
    gives) can be taken by any outgoing connection (the server's own, a test's) between this check
    and the server's bind, which then fails with "address already in use". Below 20000 are Ray's
    worker ports."""
    low, high = _ephemeral_ports()
    first, last = (20000, low - 1) if low > 21000 else (high + 1, 65535)
    pick = random.Random()  # not the global generator: a test that seeds it must not pin the ports
    for _ in range(200):
        port = pick.randint(first, last)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free loopback port in {first}-{last}")


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
