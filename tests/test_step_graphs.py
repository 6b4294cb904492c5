"""StepGraphs' static-buffer path (what a CUDA graph replays) gives the plain forward's latents.

On the CPU nothing is recorded, but every steady-state step runs exactly as a replay would: on
the static buffers, with only what was copied into them. Stale or missing inputs (a RoPE not
refreshed, a timestep not copied) change the latents and fail these tests.
"""

import pytest
import torch
from ckpt_fixtures.dit import one_torch_thread  # noqa: F401 (autouse)
from test_generator_engine import INFER_FRAMES, H, W, _inputs, _job

from avatar.presets import ModelSpec
from avatar.services.generator.engine import GeneratorEngine
from avatar.services.generator.step_graphs import StepGraphs

BLOCKS = 7  # 3 clips of 2 blocks + 1: the ring fills during clip 0, the sink is refreshed at clip 1


def _pretend_to_record(monkeypatch, recording) -> None:
    """CUDA graph recording on the CPU: `recording` stands in for torch.cuda.graph (the context a
    capture runs in); graphs replay nothing, pools are None."""
    monkeypatch.setattr(torch.cuda, "graph", recording)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: type("Recorded", (), {"replay": lambda self: None})())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)


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
        if graphs:  # the audio encoder ran on its buffer from block 2 on (recorded in block 1)
            assert session._graphs._audio is not None
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


@pytest.mark.parametrize("cache_sets", [None, 1])
def test_each_timestep_is_embedded_once_a_session(engine, cache_sets, monkeypatch):
    """The time embedding's float32 GEMVs (~1.5 ms a 704*384 block on an H100, run S1) run once
    per timestep of a session, not in every forward; the static-buffer test above shows the
    embeddings reach the replays."""
    dit, calls = engine.dit, []
    embed = dit.embed_time

    def counted(t):
        calls.append(sorted(set(t.flatten().tolist())))
        return embed(t)

    monkeypatch.setattr(dit, "embed_time", counted)
    engine.cache_sets = cache_sets
    text, ref, motion, audio = _inputs(seed=3, blocks=3)
    session = engine.open_session(_job(seed=7), text, ref, motion)
    try:
        for a in audio:
            session.generate_block(a)
    finally:
        session.close()
    block_timesteps = [[t] for t in session.sampler.timesteps] + ([[0.0]] if cache_sets == 1 else [])
    # the sink's prefill at t=0 (at the session's start and its refresh in block 2), each step's once
    assert calls == [[0.0], *block_timesteps, [0.0]]


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

    _pretend_to_record(monkeypatch, recording)

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


# -- a finished session's cache and graphs, handed to the next session of its shapes ---------------


def _session_blocks(engine, seed, blocks=5, **job_kw):
    text, ref, motion, audio = _inputs(seed=seed, blocks=blocks)
    session = engine.open_session(_job(seed=seed, **job_kw), text, ref, motion)
    try:
        out = [session.generate_block(a) for a in audio]
        return out, session
    finally:
        session.close()


@pytest.fixture()
def pooled():
    """An engine whose sessions keep graphs (on the CPU: the static-buffer path a replay runs)."""
    engine = GeneratorEngine(ModelSpec(name="tiny", seed=0))
    engine.cuda_graphs = True
    yield engine
    engine.drop_idle_slots()


def test_the_next_session_of_the_same_shapes_replays_the_last_ones_graphs(pooled):
    fresh = GeneratorEngine(ModelSpec(name="tiny", seed=0), dit=pooled.dit)
    fresh.cuda_graphs = True
    first, s1 = _session_blocks(pooled, seed=1)
    kv = s1.kv
    kept_bytes = kv.nbytes + pooled._idle[0].context.nbytes
    assert pooled.idle_slot_bytes == kept_bytes and kv.nbytes > 0 and s1._graphs is None
    from avatar import metrics

    assert metrics.REGISTRY.get_sample_value("avatar_generator_kept_cache_bytes") == kept_bytes
    kept = pooled._idle[0].graphs
    recorded = kept.num_graphs
    # another prompt, portrait, audio and seed: everything the graphs read is refreshed
    second, s2 = _session_blocks(pooled, seed=2)
    assert s2.kv is kv and s2.graphs is None and pooled._idle[0].graphs is kept
    assert kept.num_graphs == recorded  # nothing recorded again: every steady step replayed
    assert torch.equal(torch.stack(second), torch.stack(_session_blocks(fresh, seed=2)[0]))
    assert not torch.equal(torch.stack(first), torch.stack(second))
    fresh.drop_idle_slots()


def test_kept_slots_are_bounded_and_freed_for_memory_and_after_failures(pooled, monkeypatch):
    from avatar.errors import ResourceExhausted
    from avatar.services.generator.engine import IDLE_SLOTS

    kvs = []
    for steps in range(2, 3 + IDLE_SLOTS):  # a cache layout per step count: none matches another
        kvs.append(_session_blocks(pooled, seed=steps, blocks=1, sample_steps=steps)[1].kv)
    assert len(pooled._idle) == IDLE_SLOTS
    assert kvs[0].nbytes == 0 and all(kv.nbytes > 0 for kv in kvs[1:])  # the oldest was freed
    # short of memory, the smallest kept cache goes first (the cheapest to capture again), and
    # only as many as it takes: kept caches of a 12-, a 48- and a 24-frame clip
    pooled.drop_idle_slots()
    sized = [_session_blocks(pooled, seed=8, blocks=1, infer_frames=f)[1].kv for f in (12, 48, 24)]
    assert sized[0].nbytes < sized[2].nbytes < sized[1].nbytes
    pooled.free_memory = lambda: 0 if all(kv.nbytes for kv in sized) else 80 * 2**30
    _session_blocks(pooled, seed=8, blocks=1, sample_steps=2)  # matches no kept layout
    assert sized[0].nbytes == 0 and sized[1].nbytes > 0 and sized[2].nbytes > 0
    kvs = sized + kvs
    # a session that does not fit while finished sessions hold memory: they go first
    pooled.free_memory = lambda: 0 if pooled._idle else 80 * 2**30
    _session_blocks(pooled, seed=9, blocks=1, sample_steps=1)  # matches no kept layout
    assert all(kv.nbytes == 0 for kv in kvs) and len(pooled._idle) == 1
    pooled.drop_idle_slots()
    from avatar import metrics

    assert metrics.REGISTRY.get_sample_value("avatar_generator_kept_cache_bytes") == 0
    pooled.free_memory = lambda: 0
    with pytest.raises(ResourceExhausted):
        _session_blocks(pooled, seed=9, blocks=1)
    pooled.free_memory = None
    # a session that fails inside the model is not handed on
    text, ref, motion, audio = _inputs(seed=4, blocks=1)
    session = pooled.open_session(_job(seed=4), text, ref, motion)
    monkeypatch.setattr(pooled.dit, "encode_audio", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        session.generate_block(audio[0])
    assert pooled._idle == [] and session.kv.nbytes == 0


def test_a_block_out_of_memory_frees_kept_caches_one_by_one_and_runs_again(pooled, monkeypatch, caplog):
    """Run L2 (docs/performance.md): a 384*256 session ran out of memory at its sink refresh while
    a 704*384 session's kept cache held 20+ GiB; kept caches are an optimisation, so they give way."""
    from avatar.errors import ResourceExhausted

    fresh = GeneratorEngine(ModelSpec(name="tiny", seed=0), dit=pooled.dit)
    want, _ = _session_blocks(fresh, seed=5, blocks=BLOCKS)
    small, large = (_session_blocks(pooled, seed=8, blocks=1, infer_frames=f)[1].kv for f in (12, 48))
    real_prefill, failures = pooled.dit.prefill_sink, []

    def prefill_short_of_memory(*args):  # the sink refresh of clip 1 fails while anything is kept
        if failures or not pooled._idle:
            return real_prefill(*args)
        failures.append(len(pooled._idle))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 600.00 MiB")

    text, ref, motion, audio = _inputs(seed=5, blocks=BLOCKS)
    session = pooled.open_session(_job(seed=5), text, ref, motion)  # matches neither kept layout
    monkeypatch.setattr(pooled.dit, "prefill_sink", prefill_short_of_memory)
    try:
        got = [session.generate_block(a) for a in audio]
    finally:
        session.close()
    assert failures == [2] and small.nbytes == 0 and large.nbytes > 0  # the smallest went, only it
    assert torch.equal(torch.stack(got), torch.stack(want))  # the block ran again from its start
    assert "out of GPU memory in a" in caplog.text
    # nothing left to give way: the session fails with its own numbers and CUDA's words
    pooled.drop_idle_slots()
    monkeypatch.setattr(pooled.dit, "encode_audio", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("Tried")))
    session = pooled.open_session(_job(seed=5), text, ref, motion)
    with pytest.raises(ResourceExhausted, match=r"ran out of GPU memory in a \d+\*\d+ session .*\n(.|\n)*CUDA: Tried"):
        session.generate_block(audio[0])
    assert session.kv.nbytes == 0


def test_a_session_that_fails_while_opening_on_a_kept_cache_frees_it(pooled, monkeypatch):
    kv = _session_blocks(pooled, seed=1, blocks=1)[1].kv
    assert pooled.idle_slot_bytes > 0
    monkeypatch.setattr(pooled.dit, "prefill_sink", lambda *a: (_ for _ in ()).throw(RuntimeError("prefill failed")))
    text, ref, motion, _ = _inputs(seed=2, blocks=1)
    with pytest.raises(RuntimeError, match="prefill failed"):
        pooled.open_session(_job(seed=2), text, ref, motion)
    assert pooled._idle == [] and kv.nbytes == 0  # taken, then freed with the failed session


def test_the_warm_up_records_the_first_clip_and_the_next_session_replays_every_block(pooled):
    fresh = GeneratorEngine(ModelSpec(name="tiny", seed=0), dit=pooled.dit)
    pooled.warm_up([(W, H, INFER_FRAMES, 4)])
    (warm,) = pooled._idle
    # 2 blocks per clip: block 0's span (the ring filling) and the two full-ring spans, per cache set
    assert warm.graphs.num_graphs == 3 * 4
    replays = warm.graphs.replays
    blocks, session = _session_blocks(pooled, seed=2, blocks=3)
    assert session.kv is warm.kv and warm.graphs.num_graphs == 3 * 4  # nothing recorded in the request
    assert warm.graphs.replays - replays == 3 * 4  # every forward of every block, block 0 included
    assert torch.equal(torch.stack(blocks), torch.stack(_session_blocks(fresh, seed=2, blocks=3)[0]))
    # a session of the same shapes that opens meanwhile records only the full-ring spans; of the
    # two kept afterwards, the next session takes the one with the first clip's graphs
    text, ref, motion, audio = _inputs(seed=5, blocks=3)
    a = pooled.open_session(_job(seed=5), text, ref, motion)
    b = pooled.open_session(_job(seed=6), text, ref, motion)
    for s in (a, b):
        for x in audio:
            s.generate_block(x)
    assert a.graphs is warm.graphs and b.graphs.num_graphs == 2 * 4
    b.close()
    a.close()
    assert [slot.graphs.num_graphs for slot in pooled._idle] == [2 * 4, 3 * 4]
    _, c = _session_blocks(pooled, seed=7, blocks=1)
    assert c.kv is warm.kv


def test_a_failed_first_clip_capture_keeps_the_full_ring_graphs(engine, monkeypatch, caplog):
    import contextlib

    captures = []

    @contextlib.contextmanager
    def recording(graph, pool=None, capture_error_mode="global"):
        captures.append(graph)
        if len(captures) == 1:  # block 0's first step: a span of the ring still filling
            raise RuntimeError("operation not permitted when stream is capturing")
        yield

    _pretend_to_record(monkeypatch, recording)
    engine.cache_sets = None
    text, ref, motion, audio = _inputs(seed=3, blocks=3)
    session = engine.open_session(_job(seed=7), text, ref, motion)
    session._graphs = graphs = StepGraphs(engine.dit, session.context, session.kv, capture=True)
    session.record_first_clip = True
    try:
        for a in audio:
            session.generate_block(a)
        assert graphs.filling_failed and graphs.enabled
        assert graphs.num_graphs == 2 * 4  # the two full-ring spans per cache set; block 0 ran as it is
    finally:
        session.close()
    # + the audio encoder's, recorded in block 1
    assert len(captures) == 1 + 2 * 4 + 1 and "first-clip block failed" in caplog.text


def test_the_warm_up_slots_are_dropped_last(pooled):
    from avatar.services.generator.engine import IDLE_SLOTS

    assert IDLE_SLOTS == 3
    pooled.warm_up([(W, H, INFER_FRAMES, 4), (W, H, INFER_FRAMES, 3)])  # like hd and preview
    warm = list(pooled._idle)
    assert all(slot.graphs.first_clip for slot in warm)
    kept = [_session_blocks(pooled, seed=steps, blocks=3, sample_steps=steps)[1].kv for steps in (2, 1)]
    # the first request's slot went, not the older warm-ups'
    assert pooled._idle[:2] == warm and pooled._idle[2].kv is kept[1] and kept[0].nbytes == 0
    assert not pooled._idle[2].graphs.first_clip


def test_every_warmed_shape_keeps_its_slot_beside_one_for_requests(pooled):
    """--warmup-shape can warm more shapes than IDLE_SLOTS: none of them may evict another."""
    from avatar.services.generator.engine import IDLE_SLOTS

    shapes = [(W, H, INFER_FRAMES, steps) for steps in range(1, IDLE_SLOTS + 2)]
    pooled.warm_up(shapes)
    warm = list(pooled._idle)
    assert len(warm) == len(shapes) > IDLE_SLOTS and all(slot.graphs.first_clip for slot in warm)
    kept = [_session_blocks(pooled, seed=7, blocks=3, sample_steps=steps)[1].kv for steps in (6, 7)]
    assert pooled._idle[: len(shapes)] == warm and len(pooled._idle) == len(shapes) + 1
    assert pooled._idle[-1].kv is kept[1] and kept[0].nbytes == 0  # the older request's went


def test_a_returning_portrait_and_prompt_copy_the_kept_sink_and_get_the_same_latents(pooled, monkeypatch):
    from avatar import metrics
    from avatar.services.generator.sink_cache import SinkCache

    pooled.sinks = SinkCache()
    fresh = GeneratorEngine(ModelSpec(name="tiny", seed=0), dit=pooled.dit)
    runs = []
    real = pooled.dit.prefill_sink
    monkeypatch.setattr(pooled.dit, "prefill_sink", lambda *a: runs.append(1) or real(*a))

    def session(seed, inputs_seed, engine=pooled):
        text, ref, motion, audio = _inputs(seed=inputs_seed, blocks=5)  # past the sink refresh (clip 1)
        s = engine.open_session(_job(seed=seed), text, ref, motion)
        try:
            return [s.generate_block(a) for a in audio], s.sink_restored
        finally:
            s.close()

    first, restored = session(seed=1, inputs_seed=3)
    assert not restored and len(runs) == 2  # the sink, then its refresh after clip 0
    kept = pooled.sinks._sinks[-1]  # matched on the host (no device sync); only the sink counts as device memory
    assert all(t.device.type == "cpu" for t in kept.inputs)
    assert pooled.sinks.nbytes == sum(t.numel() * t.element_size() for t in kept.tensors) > 0
    assert metrics.REGISTRY.get_sample_value("avatar_generator_kept_cache_bytes") == pooled.idle_slot_bytes
    again, restored = session(seed=2, inputs_seed=3)  # same portrait, motion and prompt; another seed
    assert restored and len(runs) == 3 and pooled.sinks.hits == 1  # only the refresh ran
    assert torch.equal(torch.stack(again), torch.stack(session(seed=2, inputs_seed=3, engine=fresh)[0]))
    other, restored = session(seed=2, inputs_seed=4)  # another portrait and prompt: its own sink
    assert not restored and not torch.equal(torch.stack(other), torch.stack(again))
    # two kept: both inputs restore; reclaimed with the slots when a session needs the memory
    assert session(seed=5, inputs_seed=3)[1] and session(seed=5, inputs_seed=4)[1]
    assert pooled.drop_idle_slots() > 0 and pooled.sinks.nbytes == 0


def test_a_sink_short_of_memory_for_its_copy_makes_the_older_ones_go_first(pooled, monkeypatch, caplog):
    """keep_sink: out of memory for the copy, the kept sinks are dropped and the copy tried once
    more (run P2 on an H100 saw a returning portrait miss the sink it had kept, 2026-12-06); out of
    memory again, none is kept and the session goes on, with a warning."""
    import logging

    from avatar.services.generator.kv_cache import KVCache
    from avatar.services.generator.sink_cache import SinkCache

    pooled.sinks = SinkCache()
    text, ref, motion, _ = _inputs(seed=3, blocks=1)
    s = pooled.open_session(_job(seed=1), text, ref, motion)
    s.close()
    assert len(pooled.sinks._sinks) == 1
    real, failures = KVCache.sink, []

    def sink(kv):
        if failures and failures.pop():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.08 GiB")
        return real(kv)

    monkeypatch.setattr(KVCache, "sink", sink)
    failures[:] = [True]  # once: the older sink goes, the copy is kept
    text, ref, motion, _ = _inputs(seed=4, blocks=1)
    pooled.open_session(_job(seed=1), text, ref, motion).close()
    assert len(pooled.sinks._sinks) == 1 and torch.equal(pooled.sinks._sinks[0].inputs[0], ref)
    failures[:] = [True, True]  # twice: nothing kept, the session opened anyway
    text, ref, motion, _ = _inputs(seed=5, blocks=1)
    with caplog.at_level(logging.WARNING, logger="avatar.services.generator.engine"):
        pooled.open_session(_job(seed=1), text, ref, motion).close()
    assert pooled.sinks._sinks == [] and "kept no sink" in caplog.text


def test_the_warm_up_keeps_no_sink_of_its_zeros(pooled):
    """The warm-up's sessions run on zeros, which no request sends: their sinks would only hold
    memory (1.08 GB each at 704*384) beside the requests' own; its kept caches and graphs stay."""
    from avatar.services.generator.sink_cache import SinkCache

    pooled.sinks = SinkCache()
    pooled.warm_up([(W, H, INFER_FRAMES, 4)])
    assert pooled.sinks.nbytes == 0 and len(pooled._idle) == 1 and pooled._idle[0].graphs.first_clip
    text, ref, motion, audio = _inputs(seed=3, blocks=1)
    first = pooled.open_session(_job(seed=1), text, ref, motion)
    first.close()
    again = pooled.open_session(_job(seed=1), text, ref, motion)
    assert not first.sink_restored and again.sink_restored  # the requests' sinks are kept as before
    again.close()


def test_a_failed_audio_encoder_capture_leaves_it_eager(engine, monkeypatch, caplog):
    """The audio encoder's graph is an optimisation: when its recording fails the session goes on,
    encoding every block's audio eagerly, and never tries again."""
    import contextlib

    capturing, calls = [False], []
    encode = engine.dit.encode_audio

    def encode_audio(features):
        calls.append(capturing[0])
        if capturing[0]:
            raise RuntimeError("operation not permitted when stream is capturing")
        return encode(features)

    @contextlib.contextmanager
    def recording(graph, pool=None, capture_error_mode="global"):
        capturing[0] = True
        try:
            yield
        finally:
            capturing[0] = False

    monkeypatch.setattr(engine.dit, "encode_audio", encode_audio)
    _pretend_to_record(monkeypatch, recording)
    engine.cache_sets = None
    text, ref, motion, audio = _inputs(seed=3, blocks=4)
    session = engine.open_session(_job(seed=7), text, ref, motion)
    session._graphs = graphs = StepGraphs(engine.dit, session.context, session.kv, capture=True)
    try:
        for a in audio:
            session.generate_block(a)
        assert graphs.enabled and graphs._audio is None
    finally:
        session.close()
    # blocks 0 and 1 eager, block 1's recording (failed), blocks 2 and 3 eager: no second try
    assert calls == [False, False, True, False, False]
    assert caplog.text.count("audio encoder failed") == 1
