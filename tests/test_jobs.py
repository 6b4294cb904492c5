"""Job, the engines' job: built from the wire's JobSpec at the server edge, field for field."""

import dataclasses

import pytest

from avatar.jobs import Job
from avatar.v1 import tensor_pb2


def test_job_has_every_jobspec_field_and_round_trips():
    spec = tensor_pb2.JobSpec(
        width=704,
        height=384,
        fps=25,
        infer_frames=48,
        latent_frames_per_block=3,
        num_blocks=11,
        total_frames=125,
        sample_steps=4,
        seed=2**40 + 7,
        model="s2v-14b",
        audio_sample_rate=48000,
        request_id="3f2a9c1e",
    )
    # a field added to the proto and not to Job would be dropped silently at the edge
    assert {f.name for f in dataclasses.fields(Job)} == {f.name for f in tensor_pb2.JobSpec.DESCRIPTOR.fields}
    job = Job.from_proto(spec)
    assert job.to_proto() == spec
    assert (job.frames_per_block, job.clip_latent_frames, job.blocks_per_clip) == (12, 12, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.seed = 1


def test_unset_wire_fields_stay_zero_for_the_engines_to_refuse():
    job = Job.from_proto(tensor_pb2.JobSpec(width=64, height=64))
    assert (job.sample_steps, job.infer_frames, job.latent_frames_per_block, job.fps) == (0, 0, 0, 0)
