"""The OpenAI-compatible server, as a real process on a loopback port, driven by the official client."""

from __future__ import annotations

import json
import threading

import pytest

from conftest import Server, tiny_checkpoint

openai = pytest.importorskip("openai", reason="the server tests drive the official openai client")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("served")
    tiny_checkpoint(path, max_position_embeddings=256)
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--max-batch", "40", "--max-queue", "64")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)


def greedy(client, prompt, n=24):
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0).choices[0].text


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert server.health()["status"] == "ok"


def test_completion_and_stream_agree(client):
    full = client.completions.create(model="tiny", prompt="To be, or", max_tokens=12, temperature=0)
    assert full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 0
    assert full.choices[0].finish_reason in ("length", "stop")
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="To be, or", max_tokens=12,
                                                                   temperature=0, stream=True)]
    assert "".join(pieces) == full.choices[0].text


def test_chat_and_stream_agree(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == full.choices[0].message.content


def test_n_and_seed(client):
    a = client.completions.create(model="tiny", prompt="To be", max_tokens=8, n=3, seed=5, temperature=1.0)
    b = client.completions.create(model="tiny", prompt="To be", max_tokens=8, n=3, seed=5, temperature=1.0)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_stop_sequences(client):
    text = greedy(client, "Whether 'tis", 20)
    assert len(text) > 4
    stop = text[3:5]
    out = client.completions.create(model="tiny", prompt="Whether 'tis", max_tokens=20, temperature=0, stop=[stop])
    assert out.choices[0].text == text[:text.find(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_logprobs(client):
    out = client.completions.create(model="tiny", prompt="To be", max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) >= 1
    # keys are decoded text, and byte-level tokens of one character can decode alike
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert all(abs(max(top.values()) - v) < 1e-5 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert all(v <= 0 for v in lp.token_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 2 for c in content)
    # greedy: the chosen token is the most likely one
    assert all(abs(c.logprob - c.top_logprobs[0].logprob) < 1e-5 for c in content)


@pytest.fixture(scope="module")
def demo_server():
    import stablelm

    s = Server(stablelm.demo_model_path(), "--max-batch", "32", "--max-queue", "64")
    yield s
    s.stop()


def test_32_concurrent_streams_equal_solo_greedy(demo_server):
    """On the demo model: 32 streams at once, each the same as that prompt alone; the engine ends idle."""
    server = demo_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    speakers = ["ROMEO", "JULIET", "HAMLET", "KING LEAR", "PORTIA", "FALSTAFF", "OTHELLO", "MACBETH"]
    prompts = [f"{speakers[i % 8]}:\n{'O ' * (i // 8)}What news" for i in range(32)]
    solo = [greedy(client, p, n=16) for p in prompts]
    results = [None] * 32

    def run(i):
        stream = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=16, temperature=0,
                                           stream=True)
        results[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == solo
    assert server.wait_idle() == {"status": "ok", "batch_size": 0, "queue_depth": 0}


def test_disconnect_mid_stream_frees_the_row(server):
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        assert server.health()["batch_size"] == 1
    assert server.wait_idle(timeout=30)["batch_size"] == 0


@pytest.mark.parametrize("payload,status,param", [
    (b"{not json", 400, None),
    (json.dumps({"model": "tiny", "prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": -1}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": 5}).encode(), 400, "temperature"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "other", "prompt": "x"}).encode(), 400, "model"),
    (json.dumps({"model": "tiny", "prompt": "to be " * 300}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x" * (2 << 20)}).encode(), 413, None),
])
def test_bad_requests(server, payload, status, param):
    r = httpx.post(server.url + "/v1/completions", content=payload, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert (err["param"] or "").startswith(param)
    assert server.health()["status"] == "ok"  # still serving


def test_metrics(server, client):
    greedy(client, "To be", 3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("stablelm_requests_total", "stablelm_completion_tokens_total", "stablelm_queue_depth",
                 "stablelm_batch_size", "stablelm_time_to_first_token_seconds_bucket",
                 "stablelm_request_latency_seconds_bucket"):
        assert name in text


def test_api_key_and_full_queue(ckpt):
    s = Server(ckpt, "--api-key", "sekrit", "--max-batch", "1", "--max-queue", "1")
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="x", max_tokens=1)
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0, timeout=60)
        assert good.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0).choices
        # one row and one queue place: of a burst of requests, some are refused with 429
        body = {"model": "tiny", "prompt": "x", "max_tokens": 200, "temperature": 0}
        headers = {"Authorization": "Bearer sekrit"}
        codes = []

        def post():
            r = httpx.post(s.url + "/v1/completions", json=body, headers=headers, timeout=120)
            codes.append((r.status_code, r.json()))

        threads = [threading.Thread(target=post) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert {code for code, _ in codes} == {200, 429}
        assert all(body["error"]["type"] == "rate_limit_error" for code, body in codes if code == 429)
        assert s.wait_idle()["batch_size"] == 0
    finally:
        s.stop()
