"""StepGraphs' static-buffer path (what a CUDA graph replays) gives the plain forward's latents.

On the CPU nothing is recorded, but every steady-state step runs exactly as a replay would: on
the static buffers, with only what was copied into them. Stale or missing inputs (a RoPE not
refreshed, a timestep not copied) change the latents and fail these tests.
"""

import pytest
import torch
from ckpt_fixtures.dit import one_torch_thread  # noqa: F401 (autouse)
from test_generator_engine import _inputs, _job

from avatar.presets import ModelSpec
from avatar.services.generator.engine import GeneratorEngine
from avatar.services.generator.step_graphs import StepGraphs

BLOCKS = 7  # 3 clips of 2 blocks + 1: the ring fills during clip 0, the sink is refreshed at clip 1


@pytest.fixture(scope="module")
def engine():
    return GeneratorEngine(ModelSpec(name="tiny", seed=0))


def _run(engine, cache_sets, graphs: bool):
    engine.cache_sets = cache_sets
    text, ref, motion, audio = _inputs(seed=3, blocks=BLOCKS)
    session = engine.open_session(_job(seed=7), text, ref, motion)
    if graphs:
        session._graphs = StepGraphs(engine.dit, session.context, session.kv, capture=False)
    try:
        blocks = [session.generate_block(a) for a in audio]
        counts = (session._graphs.num_graphs, session._graphs.replays) if graphs else None
        return blocks, counts
    finally:
        session.close()


@pytest.mark.parametrize("cache_sets", [None, 1])
def test_static_buffer_steps_equal_plain_steps(engine, cache_sets):
    plain, _ = _run(engine, cache_sets, graphs=False)
    replayed, (num_graphs, replays) = _run(engine, cache_sets, graphs=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, replayed))
    sets = 4 if cache_sets is None else 1
    # one graph per (cache set, slot in the ring): 2 blocks per clip -> 2 slots
    assert num_graphs == 2 * sets
    # steady from the last block of clip 0: blocks 1..6, each with `sets` graphs' worth of forwards,
    # all replays except the first use of each graph
    forwards_per_block = 4 + (1 if sets == 1 else 0)
    assert replays == 6 * forwards_per_block - num_graphs


def test_the_first_blocks_never_wait_for_a_capture(engine):
    engine.cache_sets = None
    text, ref, motion, audio = _inputs(seed=3, blocks=1)
    session = engine.open_session(_job(seed=7), text, ref, motion)
    session._graphs = StepGraphs(engine.dit, session.context, session.kv, capture=False)
    try:
        session.generate_block(audio[0])  # block 0: the ring is not full yet
        assert session._graphs.num_graphs == 0
    finally:
        session.close()


def test_offloaded_modules_are_copied_in_for_one_use_and_left_in_place():
    from avatar.services.generator.causal_s2v_dit import CrossAttention, _on_device

    attn = CrossAttention(16, 2, 1e-6).to("meta")  # "the GPU" here
    attn.k = torch.nn.Linear(16, 16)  # offloaded: on another device than the rest
    meta = torch.device("meta")
    twin = _on_device(attn, meta)
    assert twin is not attn and twin.k is not attn.k and twin.q is attn.q  # only what lives elsewhere is copied
    assert twin.k.weight.device == meta and attn.k.weight.device.type == "cpu"  # the module stays put
    assert _on_device(twin, meta) is twin


def test_text_context_is_computed_once_and_matches_per_step_projections(engine):
    dit = engine.dit
    text = torch.randn(1, 5, dit.config.text_dim)
    ctx = dit.embed_text(text)
    assert len(ctx.kv) == dit.config.num_layers and ctx.nbytes > 0
    tokens = dit.text_embedding(torch.nn.functional.pad(text, (0, 0, 0, dit.config.text_len - 5)))
    x = torch.randn(1, 10, dit.config.dim)
    attn = dit.blocks[1].cross_attn
    assert torch.equal(attn(x, tokens), attn(x, ctx.kv[1]))


def test_captures_on_one_device_take_turns(engine, monkeypatch):
    """Two sessions reaching their first steady block at once record one after the other (one
    shared capture stream per device: two at once broke both on the H200, run Q); other devices
    are not held up."""
    import contextlib
    import threading
    import time

    from avatar.services.generator import step_graphs

    inside, most, guard = [0], [0], threading.Lock()

    @contextlib.contextmanager
    def recording(graph, pool=None, capture_error_mode="global"):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.2)  # long enough for the other thread to arrive
        yield
        with guard:
            inside[0] -= 1

    monkeypatch.setattr(torch.cuda, "graph", recording)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: type("Recorded", (), {"replay": lambda self: None})())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)

    def first_steady_block(results, i):
        engine.cache_sets = 1
        text, ref, motion, audio = _inputs(seed=3, blocks=3)  # block 1 is the first steady one
        session = engine.open_session(_job(seed=7), text, ref, motion)
        session._graphs = StepGraphs(engine.dit, session.context, session.kv, capture=True)
        try:
            results[i] = [session.generate_block(a) for a in audio]
        finally:
            session.close()

    results = [None, None]
    threads = [threading.Thread(target=first_steady_block, args=(results, i)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in results)
    assert most[0] == 1  # never two recordings at once on the CPU "device"
    assert step_graphs.capture_lock(torch.device("cpu")) is step_graphs.capture_lock(torch.device("cpu"))
    assert step_graphs.capture_lock(torch.device("cpu")) is not step_graphs.capture_lock(torch.device("cuda", 1))
