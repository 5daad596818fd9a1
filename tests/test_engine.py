"""The continuous-batching engine in-process: the same tokens as generate(), and one failing sequence
ends alone (issue 13, item 1)."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import TINY

import stablelm
from stablelm.serving.engine import Engine, Request, SamplingParams, plan_pool


class Collector:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    def text(self):
        return "".join(e.text for e in self.events if e.finish_reason != "error")

    def reasons(self):
        return [e.finish_reason for e in self.events if e.finish_reason]


def _engine(monkeypatch=None, **kw):
    model = stablelm.AutoModelForCausalLM.from_pretrained(stablelm.demo_model_path())
    tok = stablelm.AutoTokenizer.from_pretrained(stablelm.demo_model_path())
    return Engine(model, tok, **kw), tok


def test_a_failing_sequence_ends_alone_in_the_engine(monkeypatch):
    """Sampling that raises for one request (while admitting it, and later while stepping it) ends that
    request with an error event; the requests beside it finish with the text they have alone."""
    from stablelm.generation import sampling
    from stablelm.serving import engine as engine_module

    engine, tok = _engine(max_batch=4)
    try:
        greedy = SamplingParams(max_tokens=12, temperature=0)
        ids = tok.encode("ROMEO:")

        def run(params, prompt=ids):
            c = Collector()
            req = Request(prompt, params, c)
            engine.submit(req)
            return req, c

        solo_req, solo = run(greedy)
        assert solo_req.done.wait(60)
        real_choose = sampling.choose
        calls = {"n": 0}

        def choose(scores, do_sample, generator=None):
            if generator is not None:  # only the seeded request
                calls["n"] += 1
                if calls["n"] >= 3:
                    raise RuntimeError("probability tensor contains inf")
            return real_choose(scores, do_sample, generator)

        monkeypatch.setattr(sampling, "choose", choose)
        (ra, a), (rb, bad), (rc, c) = run(greedy), run(SamplingParams(max_tokens=12, temperature=0.8, seed=1)), \
            run(greedy)
        real_forward = engine_module.forward
        poison = tok.encode("O")[0]

        def forward(model, ids, *args):  # any forward that holds the poisoned prompt fails
            if int(ids[0, -1]) == poison:
                raise RuntimeError("prefill exploded")
            return real_forward(model, ids, *args)

        monkeypatch.setattr(engine_module, "forward", forward)
        rd, d = run(greedy, tok.encode("O"))
        for req in (ra, rb, rc, rd):
            assert req.done.wait(60)
        assert a.text() == c.text() == solo.text() and a.reasons() == c.reasons() == ["length"]
        assert bad.reasons() == ["error"] and "inf" in bad.events[-1].text
        assert d.reasons() == ["error"] and "prefill exploded" in d.events[-1].text
        assert engine.idle()
    finally:
        engine.shutdown()


def test_shutdown_ends_every_open_request():

    engine, tok = _engine(max_batch=1)
    collectors = []
    for _ in range(3):
        c = Collector()
        collectors.append((Request(tok.encode("ROMEO:"), SamplingParams(max_tokens=400, temperature=0), c), c))
        engine.submit(collectors[-1][0])
    time.sleep(0.3)
    engine.shutdown()
    for req, c in collectors:
        assert req.done.is_set() and c.reasons() in (["error"], ["length"])


def test_kv_cache_pool_is_sized_from_a_memory_budget():
    config = stablelm.StableLmConfig(**{**TINY, "max_position_embeddings": 2**22})
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    context, budget, blocks = plan_pool(config, torch.float32, None, 2**30, block_size=16)
    assert blocks == 2**30 // (per_token * 16) and context == blocks * 16 and budget == 2**30
    assert plan_pool(config, torch.float32, None, None)[2] * per_token * 16 <= (1 << 62)
    assert plan_pool(config, torch.float32, 1000, 2**30)[0] == 1000
    with pytest.raises(ValueError, match="over the budget"):
        plan_pool(config, torch.float32, 2**22, 2**20)


def run(engine, prompt_ids, params):
    c = Collector()
    req = Request(prompt_ids, params, c)
    engine.submit(req)
    assert req.done.wait(60)
    return c


@pytest.fixture(scope="module")
def demo_engine():
    engine, tok = _engine(max_batch=4)
    yield engine, tok
    engine.shutdown()


def test_greedy_equals_generate(demo_engine):
    engine, tok = demo_engine
    model = engine.model
    for prompt in ("ROMEO:", "JULIET:\nO"):
        ids = tok.encode(prompt)
        expected = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, repetition_penalty=1.0)
        text = run(engine, ids, SamplingParams(max_tokens=20, temperature=0)).text()
        assert text == tok.decode(expected[0, len(ids):], skip_special_tokens=True)


def test_seeded_sampling_repeats_and_n_sequences_differ(demo_engine):
    engine, tok = demo_engine
    ids = tok.encode("ROMEO:")
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=7, n=3)
    first, second = run(engine, ids, params), run(engine, ids, params)
    by_index = [[e.text for e in c.events if e.index == i] for c in (first, second) for i in range(3)]
    assert by_index[:3] == by_index[3:]  # the same seed, the same three texts
    assert len({"".join(t) for t in by_index[:3]}) > 1  # seed + index: the three differ


def test_stop_strings_cut_the_text(demo_engine):
    engine, tok = demo_engine
    ids = tok.encode("ROMEO:")
    full = run(engine, ids, SamplingParams(max_tokens=40, temperature=0)).text()
    stop = full[10:13]
    cut = run(engine, ids, SamplingParams(max_tokens=40, temperature=0, stop=[stop]))
    assert cut.text() == full[:full.index(stop)] and cut.reasons() == ["stop"]


def test_bad_values_are_refused_at_submit(demo_engine):
    engine, tok = demo_engine
    for params, message in ((SamplingParams(temperature=1e-30), "temperature"), (SamplingParams(seed=-1), "seed"),
                            (SamplingParams(max_tokens=0), "max_tokens"), (SamplingParams(top_p=0.0), "top_p")):
        with pytest.raises(ValueError, match=message):
            engine.submit(Request(tok.encode("x"), params, Collector()))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit(Request([10**6], SamplingParams(), Collector()))


def test_prefix_reuse_gives_the_same_tokens_as_a_full_prefill():
    """A multi-turn chat: each turn's prompt is the previous prompt, its reply and a new line. With the prefix
    cache the engine prefills only the new part, and the greedy replies are those without it."""
    with_reuse, tok = _engine(max_batch=2)
    without, _ = _engine(max_batch=2, prefix_caching=False)
    try:
        replies = {}
        for engine in (with_reuse, without):
            history = tok.encode("ROMEO:\nWhat light through yonder window breaks?\n\nJULIET:\n")
            texts = []
            for turn in range(4):
                c = run(engine, history, SamplingParams(max_tokens=12, temperature=0))
                texts.append(c.text())
                history = history + tok.encode(c.text()) + tok.encode(f"\n\nROMEO:\nAnd {turn}\n\nJULIET:\n")
            replies[engine is with_reuse] = texts
        assert replies[True] == replies[False]
        pool = with_reuse.pool
        assert pool.hits >= 3 and pool.tokens_reused > 3 * 16 and without.pool.hits == 0
        assert pool.cached_blocks > 0 and without.pool.cached_blocks == 0
    finally:
        with_reuse.shutdown()
        without.shutdown()


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_gives_the_same_greedy_text(chunk):
    """Prompts prefilled `chunk` tokens a round, at every offset against the chunk boundary, alone and on top
    of a prefix-cache hit: the same greedy text as generate()."""
    engine, tok = _engine(max_batch=2, prefill_chunk=chunk)
    try:
        model = engine.model
        base = tok.encode("ROMEO:\nWhat light through yonder window breaks? It is the east.\n\nJULIET:\n")
        for extra in range(3):  # the prompt's last chunk is 1, 2 and 3 tokens past a boundary in turn
            ids = base + tok.encode(" O" * (extra + 1))
            expected = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, repetition_penalty=1.0)
            text = run(engine, ids, SamplingParams(max_tokens=10, temperature=0)).text()
            assert text == tok.decode(expected[0, len(ids):], skip_special_tokens=True), (chunk, extra)
        assert engine.pool.hits >= 1  # the later prompts started from the earlier ones' keys/values
        assert engine.idle() and not engine.prefilling
    finally:
        engine.shutdown()


def test_a_long_prompt_does_not_stall_running_streams():
    """While a 150-token prompt is prefilled 8 tokens a round, the running stream gets a token every round;
    prefilled whole, it gets none until the prompt is in."""
    got = {}
    for chunk in (8, None):
        engine, tok = _engine(max_batch=2, prefill_chunk=chunk)
        try:
            running = Collector()
            engine.submit(Request(tok.encode("ROMEO:"), SamplingParams(max_tokens=300, temperature=0), running))
            while len(running.events) < 3:
                time.sleep(0.01)
            marks = {}

            def first(event, running=running, marks=marks):
                marks.setdefault("first", len(running.events))

            long_prompt = (tok.encode("JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n") * 20)[:150]
            marks["submitted"] = len(running.events)
            long = Request(long_prompt, SamplingParams(max_tokens=2, temperature=0), first)
            engine.submit(long)
            assert long.done.wait(60)
            got[chunk] = marks["first"] - marks["submitted"]
        finally:
            engine.shutdown()
    assert got[8] >= 150 // 8 - 1  # a decode step per chunk
    assert got[None] <= 2


def test_engine_metrics_report_the_pool_prefix_hits_and_latencies():
    pytest.importorskip("prometheus_client", reason="metrics come with the [serve] extra")
    from stablelm.serving.metrics import Metrics

    engine, tok = _engine(max_batch=2, prefill_chunk=4)
    metrics = Metrics()
    engine.on_step = metrics.observe_engine
    try:
        ids = tok.encode("ROMEO:\nWhat light through yonder window breaks? It is the east.\n")
        for _ in range(2):
            run(engine, ids, SamplingParams(max_tokens=6, temperature=0))
        engine.shutdown()  # its thread has ended: every round's figures are in
        text = metrics.render()[0].decode()
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                  if line and not line.startswith("#")}
        assert values["stablelm_prefix_cache_hits"] == 1 and values["stablelm_prefix_cache_lookups"] == 2
        assert values["stablelm_prefix_cache_reused_tokens"] >= 16 and values["stablelm_prefix_cache_blocks"] > 0
        assert values["stablelm_queue_time_seconds_count"] == 2
        assert values["stablelm_inter_token_latency_seconds_count"] == 2 * 5  # 6 tokens each: 5 gaps
        assert values["stablelm_kv_cache_blocks_used_ratio"] == 0 and values["stablelm_prefilling_requests"] == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("attention", ["native", "torch"])
def test_preemption_and_every_block_offset_give_generate_s_tokens(attention, monkeypatch):
    """Six prompts of 5..10 tokens (every offset against blocks of 4) in a pool of 24 blocks that cannot hold
    them all to the end: the newest sequences give their blocks back and are recomputed, prompts are
    prefilled 7 tokens a round beside the decode steps, a seeded n=2 request forks a partial block, one
    request is cancelled midway; every greedy text is generate()'s, and the pool ends empty. Decode attention
    runs in the native kernel and in torch's fallback (gather, then masked attention)."""
    from stablelm.serving import paged

    if attention == "native" and paged.kernels.native_isa() is None:
        pytest.skip("the native kernels are not built here")
    if attention == "torch":
        monkeypatch.setattr(paged.kernels, "native_isa", lambda: None)
    model = stablelm.AutoModelForCausalLM.from_pretrained(stablelm.demo_model_path())
    tok = stablelm.AutoTokenizer.from_pretrained(stablelm.demo_model_path())
    config = model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    engine = Engine(model, tok, max_batch=8, kv_cache_memory=24 * 4 * per_token, block_size=4, prefill_chunk=7)
    try:
        base = tok.encode("ROMEO:\nWhat light through yonder window breaks?")
        prompts = [base[:length] for length in range(5, 11)]
        expected = [tok.decode(model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                              repetition_penalty=1.0)[0, len(ids):], skip_special_tokens=True)
                    for ids in prompts]
        greedy = [Request(ids, SamplingParams(max_tokens=16, temperature=0), Collector()) for ids in prompts]
        sampled = Request(base[:9], SamplingParams(max_tokens=12, temperature=0.9, seed=3, n=2), Collector())
        doomed = Request(base[:6], SamplingParams(max_tokens=200, temperature=0), Collector())
        for request in greedy + [sampled, doomed]:
            engine.submit(request)
        while len(doomed.emit.events) < 3:
            time.sleep(0.01)
        doomed.cancel()
        for request in greedy + [sampled, doomed]:
            assert request.done.wait(60)
        assert [r.emit.text() for r in greedy] == expected
        assert sorted(e.index for e in sampled.emit.events if e.finish_reason) == [0, 1]
        assert engine.preemptions > 0 and engine.pool.evictions > 0 and engine.pool.hits > 0
        deadline = time.time() + 5
        while not engine.idle() and time.time() < deadline:
            time.sleep(0.01)
        engine.pool.check_empty()
    finally:
        engine.shutdown()
