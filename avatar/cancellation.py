"""Cancellation that reaches blocking torch work: a flag set by the RPC, checked between layers.

A gRPC handler runs torch work in a thread (avatar.grpc_util.run_blocking). When the RPC is
cancelled or its deadline passes, the thread cannot be interrupted; instead run_blocking sets
the work's CancelFlag and the work stops at its next check: between VAE chunks, between
transformer layers (forward pre-hooks, `check_between_layers`), between blocks. Engines import
this module, never grpc.
"""

from __future__ import annotations

import contextvars
import threading

import torch


class Cancelled(Exception):
    """The work's caller gave up (cancel, disconnect or deadline): stop, nothing to report."""


class CancelFlag:
    """Set once by the side that gave up; read by the worker thread at its checks."""

    def __init__(self):
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()


# The flag of the work running in this thread (run_blocking sets it in the thread's context).
CURRENT: contextvars.ContextVar[CancelFlag | None] = contextvars.ContextVar("avatar_cancel_flag", default=None)


def check_cancelled() -> None:
    """Raises Cancelled when the current work's caller has given up; free when nobody has."""
    flag = CURRENT.get()
    if flag is not None and flag.is_set:
        raise Cancelled("the request was cancelled or its deadline passed")


def _pre_hook(module, args) -> None:
    check_cancelled()


def check_between_layers(model: torch.nn.Module, depth: int = 2) -> int:
    """Checks for cancellation before every submodule `depth` levels down (e.g. the encoder's
    stages and their blocks): a cancelled call stops within one layer, not at the end of a
    24 s encode. Only for eager modules: a compiled one would guard on the hook. Returns the
    number of hooks."""
    count = 0

    def walk(m: torch.nn.Module, level: int):
        nonlocal count
        for child in m.children():
            child.register_forward_pre_hook(_pre_hook)
            count += 1
            if level < depth:
                walk(child, level + 1)

    walk(model, 1)
    return count
