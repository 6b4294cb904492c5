"""The TPP ring's messages: one frozen dataclass per kind, and the channel that carries them between two ranks.

Down the ring (rank 0 -> 1 -> ... -> R-1) travel OpenSession, Block, CloseSession, Ping and
Shutdown; the last rank answers each with its reply (`message.reply()`) up to rank 0. A Block
whose sampling steps are not all done yet goes up as itself: rank 0 runs its next step and sends
it round again (a lap per R steps). A rank that fails sets `error` on the message it passes on,
so rank 0 learns it with the reply.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist

from avatar import errors
from avatar.jobs import Job


@dataclass(frozen=True)
class RankError:
    """The first failure on the way round: the error's class name (avatar.errors) and its message."""

    kind: str
    message: str

    @classmethod
    def of(cls, exc: BaseException, at_rank: int) -> RankError:
        if isinstance(exc, torch.OutOfMemoryError):  # the session is freed on every rank; others may fit
            return cls("ResourceExhausted", f"generator rank {at_rank} ran out of GPU memory: {exc}")
        return cls(type(exc).__name__, f"generator rank {at_rank}: {exc}")

    def exception(self) -> Exception:
        cls = getattr(errors, self.kind, None)
        if isinstance(cls, type) and issubclass(cls, errors.AvatarError):
            return cls(self.message)
        return RuntimeError(f"{self.message} ({self.kind})")


# ---------------------------------------------------------------- replies (last rank -> rank 0)


@dataclass(frozen=True)
class Opened:
    sid: int
    error: RankError | None = None
    kv_cache_bytes: int = 0  # the largest share of the session's KV cache on one rank


@dataclass(frozen=True)
class BlockDone:
    sid: int
    index: int
    x: torch.Tensor | None = None  # the finished block [1, 16, F, h, w]; None on error
    error: RankError | None = None


@dataclass(frozen=True)
class Closed:
    sid: int


@dataclass(frozen=True)
class Pong:
    pass


@dataclass(frozen=True)
class ShutDown:
    pass


# ---------------------------------------------------------------- down the ring


@dataclass(frozen=True)
class OpenSession:
    """A session starts: every rank opens its step's share and prefills its own sink."""

    sid: int
    job: Job
    text: torch.Tensor  # [L, text_dim]
    ref_latent: torch.Tensor  # [16, 1, h, w]
    motion_latents: torch.Tensor  # [16, T, h, w]
    offset: int = 0  # sampling step k runs on rank (offset + k) % R (tpp.step_rank)
    error: RankError | None = None
    kv_cache_bytes: int = 0  # the largest share so far: each rank raises it to its own

    def reply(self) -> Opened:
        return Opened(self.sid, self.error, self.kv_cache_bytes)


@dataclass(frozen=True)
class Block:
    """One block on its way round: x after sampling steps 0..step-1; the rank that runs `step`
    runs it next (and the ranks between pass it on)."""

    sid: int
    index: int
    x: torch.Tensor | None  # [1, 16, F, h, w]; None once a rank failed
    audio: torch.Tensor | None  # [F*4, audio_layers, audio_dim]; None once a rank failed
    first: torch.Tensor | None = None  # block 0's first latent frame, for the sink refresh at clip 1
    error: RankError | None = None
    step: int = 0  # the next sampling step to run
    steps: int = 1  # the session's sampling steps

    @property
    def finished(self) -> bool:
        """Every step has run, or one failed: nothing is left to do but to reach rank 0."""
        return self.error is not None or self.step >= self.steps

    def failed(self, error: RankError) -> Block:
        return replace(self, x=None, audio=None, first=None, error=error)

    def reply(self) -> BlockDone | Block:
        """What the last rank sends up: the finished block, or this block for another lap."""
        if not self.finished:
            return self
        return BlockDone(self.sid, self.index, self.x if self.error is None else None, self.error)


@dataclass(frozen=True)
class CloseSession:
    sid: int

    def reply(self) -> Closed:
        return Closed(self.sid)


@dataclass(frozen=True)
class Ping:
    """Keeps idle ranks' receives short of the group timeout."""

    def reply(self) -> Pong:
        return Pong()


@dataclass(frozen=True)
class Shutdown:
    def reply(self) -> ShutDown:
        return ShutDown()


Message = OpenSession | Block | CloseSession | Ping | Shutdown
Reply = Opened | BlockDone | Closed | Pong | ShutDown | Block


def encode(msg: Message | Reply) -> tuple[bytes, list[torch.Tensor]]:
    """A message as its header (the dataclass without its tensors, with each tensor's dtype and
    shape; pickled) and each non-empty tensor's bytes as a flat uint8 tensor, bit for bit."""
    tensors = {f.name: getattr(msg, f.name) for f in fields(msg) if isinstance(getattr(msg, f.name), torch.Tensor)}
    header = pickle.dumps(
        (replace(msg, **dict.fromkeys(tensors)), [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]),
        protocol=5,
    )
    return header, [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors.values() if t.numel()]


def decode(header: bytes, read) -> Message | Reply:
    """encode's inverse; `read(nbytes)` gives the next tensor's bytes as a uint8 tensor."""
    msg, specs = pickle.loads(header)  # peers are this job's own ranks
    tensors = {}
    for name, dtype, shape in specs:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        data = read(nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)
        tensors[name] = data.view(dtype).reshape(shape)
    return replace(msg, **tensors)


class Channel:
    """Messages to/from one peer over one process group: the header's length, the header, then
    each tensor's bytes (encode). Sends are asynchronous, one message in flight: the next send,
    or flush(), waits for the previous one."""

    def __init__(self, peer: int, group, device: torch.device):
        self.peer, self.group, self.device = peer, group, device
        self._in_flight: list = []  # the works and their buffers, which must outlive the sends

    def send(self, msg: Message | Reply) -> None:
        header, tensors = encode(msg)
        buffers = [torch.frombuffer(bytearray(header), dtype=torch.uint8)] + tensors
        buffers = [b.to(self.device) for b in buffers]
        size = torch.tensor([buffers[0].numel()], dtype=torch.int64, device=self.device)
        self.flush()
        works = [dist.isend(b, self.peer, group=self.group) for b in (size, *buffers)]
        self._in_flight = [works, size, buffers]

    def flush(self) -> None:
        if self._in_flight:
            for work in self._in_flight[0]:
                work.wait()
            self._in_flight = []

    def recv(self) -> Message | Reply:
        """The next message, its tensors on the CPU."""
        size = torch.empty(1, dtype=torch.int64, device=self.device)
        dist.recv(size, self.peer, group=self.group)
        header = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        dist.recv(header, self.peer, group=self.group)

        def read(nbytes: int) -> torch.Tensor:
            data = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            dist.recv(data, self.peer, group=self.group)
            return data.cpu()

        return decode(header.cpu().numpy().tobytes(), read)
