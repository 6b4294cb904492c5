"""TPP ring messages: typed, and their tensors carried bit for bit whatever their dtype, shape or layout."""

import pytest
import torch

from avatar.errors import InvalidInput, ResourceExhausted
from avatar.jobs import Job
from avatar.services.generator.distributed.messages import Block, OpenSession, RankError, decode, encode


def _round_trip(msg):
    header, tensors = encode(msg)
    queue = list(tensors)
    return decode(header, lambda n: queue.pop(0)[:n]), tensors


def test_tensors_of_any_dtype_travel_bit_for_bit_beside_the_header():
    x = torch.randn(1, 16, 3, 8, 8).to(torch.bfloat16)
    audio = torch.randn(5, 12, 32).transpose(0, 1)  # not contiguous
    first = torch.empty(1, 16, 0, 8, 8)  # empty: no bytes on the wire
    back, tensors = _round_trip(Block(sid=3, index=7, x=x, audio=audio, first=first))
    assert len(tensors) == 2 and all(t.dtype == torch.uint8 for t in tensors)
    assert (back.sid, back.index, back.error) == (3, 7, None)
    assert back.x.dtype == torch.bfloat16 and torch.equal(back.x.view(torch.int16), x.view(torch.int16))
    assert torch.equal(back.audio, audio) and back.first.shape == first.shape
    header, _ = encode(Block(sid=3, index=7, x=x, audio=audio, first=first))
    assert len(header) < 1024  # the tensors are not in the header


def test_open_session_carries_the_job_and_a_failure_reaches_rank_0_as_its_error():
    job = Job(width=64, height=64, infer_frames=24, sample_steps=2, num_blocks=4, seed=9)
    back, _ = _round_trip(OpenSession(1, job, torch.zeros(7, 32), torch.zeros(16, 1, 8, 8), torch.zeros(16, 19, 8, 8)))
    assert back.job == job and back.text.shape == (7, 32)
    failed = Block(1, 0, torch.zeros(1), torch.zeros(1)).failed(RankError.of(InvalidInput("bad audio"), 2))
    reply = _round_trip(failed)[0].reply()
    assert reply.x is None and isinstance(reply.error.exception(), InvalidInput)
    assert str(reply.error.exception()) == "generator rank 2: bad audio"
    oom = RankError.of(torch.OutOfMemoryError("CUDA out of memory"), 1).exception()
    assert isinstance(oom, ResourceExhausted) and "rank 1 ran out of GPU memory" in str(oom)
    with pytest.raises(RuntimeError, match=r"generator rank 0: injected \(ValueError\)"):
        raise RankError.of(ValueError("injected"), 0).exception()


def test_a_block_with_steps_left_goes_up_as_itself_and_a_finished_one_as_its_result():
    x = torch.randn(1, 16, 3, 8, 8)
    lap = Block(sid=2, index=5, x=x, audio=torch.zeros(12, 5, 32), step=2, steps=5)
    back, _ = _round_trip(lap)
    assert (back.step, back.steps) == (2, 5) and not back.finished
    assert back.reply() is back  # another lap: rank 0 runs step 2
    done = _round_trip(Block(sid=2, index=5, x=x, audio=None, step=5, steps=5))[0].reply()
    assert done.index == 5 and done.error is None and torch.equal(done.x, x)
    opened = _round_trip(
        OpenSession(
            1, Job(64, 64, sample_steps=3), torch.zeros(1, 32), torch.zeros(16, 1, 8, 8), torch.zeros(16, 19, 8, 8), 2
        )
    )[0]
    assert opened.offset == 2 and opened.reply().kv_cache_bytes == 0
