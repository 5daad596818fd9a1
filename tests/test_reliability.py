"""Reliability and security, tried as an attacker and a careless client would (issue 13, one test per item).

Server items run against a real `stablelm serve` process on a loopback port; docs/reliability.md lists them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, Server, perturb_, tiny_checkpoint, tiny_tokenizer

import stablelm

httpx = pytest.importorskip("httpx", reason="the server tests need httpx (requirements-test.txt)")
pytest.importorskip("fastapi", reason="the server tests need the [serve] extra")

JSON = {"content-type": "application/json"}
STRICT_TEMPLATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
                   "{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("reliability")
    tiny_checkpoint(path, max_position_embeddings=1024)  # room for generations that outlast their clients
    tok = tiny_tokenizer(STRICT_TEMPLATE)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    s = Server(ckpt, "--max-batch", "8", "--max-queue", "64", "--request-timeout", "2", log=log)
    yield s
    s.stop()


def post(server, path, body=None, content=None, headers=JSON, timeout=60):
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=timeout)


def completion(server, prompt, max_tokens=8, **extra):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return post(server, "/v1/completions", body)


# -- 1. one request never hurts another --------------------------------------------------------
@pytest.mark.parametrize("extra,param", [
    ({"temperature": 0.7, "seed": 2**64}, "seed"),
    ({"temperature": 0.7, "seed": -1}, "seed"),
    ({"temperature": 1e-40}, "temperature"),
    ({"temperature": float("nan")}, None),
    ({"top_p": 0}, "top_p"),
    ({"presence_penalty": 1e30}, "presence_penalty"),
])
def test_unsafe_sampling_values_are_400_and_others_go_on(server, extra, param):
    solo = completion(server, "To be", 16).json()["choices"][0]["text"]
    results = {}

    def stream():
        body = {"model": "tiny", "prompt": "To be", "max_tokens": 16, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data: {")]
        results["text"] = "".join(c["choices"][0]["text"] for c in chunks if "choices" in c)
        results["finish"] = [c["choices"][0]["finish_reason"] for c in chunks if "choices" in c][-1]

    t = threading.Thread(target=stream)
    t.start()
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 4, **extra}, allow_nan=True)
    r = post(server, "/v1/completions", content=body.encode(), timeout=10)
    t.join(60)
    assert r.status_code == 400, r.text
    if param:
        assert r.json()["error"]["param"] == param
    assert results == {"text": solo, "finish": "length"}


def test_sigterm_stops_the_server_with_requests_in_flight(ckpt):
    s = Server(ckpt, "--max-batch", "1")
    bodies = {"model": "tiny", "prompt": "To be", "max_tokens": 250, "temperature": 0}
    threads = [threading.Thread(target=lambda: _quiet_post(s, bodies)) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    started = time.time()
    # Bounded generously (a loaded 2-core machine took over 15 s): before, SIGTERM did not stop it at all.
    assert s.stop(timeout=60) is not None, "SIGTERM did not stop the server"
    assert time.time() - started < 60


def _quiet_post(server, body):
    try:
        post(server, "/v1/completions", body, timeout=30)
    except httpx.HTTPError:
        pass


# -- 2. a save is all-or-nothing ---------------------------------------------------------------
def _model(seed):
    model = stablelm.StableLmForCausalLM.from_config(stablelm.StableLmConfig(**TINY), seed=seed)
    perturb_(model, seed)
    return model


def _which(folder, states) -> int:
    loaded = stablelm.StableLmForCausalLM.from_pretrained(folder, fast_inference=False).state_dict()
    for i, state in enumerate(states):
        if all(torch.equal(loaded[k], state[k]) for k in state):
            return i
    raise AssertionError("the checkpoint mixes tensors of two saves")


def _save_in_child(model, folder, kill_at: int = 0, loop: bool = False):
    """Fork; the child saves `model` (SIGKILLing itself just before file operation number `kill_at`, counting
    shard writes, renames and removals; or saving in a loop until killed). Returns (pid, pipe to read)."""
    from stablelm.io import checkpoint

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: patches live in its own memory only
        try:
            events = [0]

            def counted(real):
                def wrapper(*args, **kwargs):
                    events[0] += 1
                    if events[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)
                return wrapper

            if kill_at > 0:  # so that operation k is the same step every time; plain saves clean up themselves
                checkpoint.remove_leftovers(Path(folder))
            for name in ("save_file", "_replace", "_unlink"):
                setattr(checkpoint, name, counted(getattr(checkpoint, name)))
            os.write(write, b"saving\n")
            while True:
                model.save_pretrained(folder, max_shard_size="8KB")
                if not loop:
                    break
            os.write(write, f"{events[0]}\n".encode())
        finally:
            os._exit(0)
    os.close(write)
    return pid, os.fdopen(read)


def _wait(pid) -> int:
    return os.waitpid(pid, 0)[1]


def test_kill_9_during_save_leaves_old_or_new_never_a_mix(tmp_path):
    folder = tmp_path / "ckpt"
    models = [_model(0), _model(1)]
    states = [m.state_dict() for m in models]

    def save(seed, kill_at=0):
        pid, out = _save_in_child(models[seed], folder, kill_at)
        status, lines = _wait(pid), out.read().split()
        out.close()
        return status, lines

    assert save(0)[0] == 0
    shards = len(list(folder.glob("model-*.safetensors")))
    assert shards >= 6
    events = int(save(0)[1][-1])  # a full save over an existing one: this many file operations
    # Operations: shards written (1..S), moved in (S+1..2S), the index switch (2S+1), config files, old shards
    # removed. Kill before the first write, amid the moves, just before and just after the switch, at the end.
    for kill_at in (1, shards + 2, 2 * shards + 1, 2 * shards + 2, events):
        old = _which(folder, states)
        status, _ = save(1 - old, kill_at)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, kill_at
        assert _which(folder, states) == (old if kill_at <= 2 * shards + 1 else 1 - old), kill_at
    # A kill -9 at a random moment of a loop of saves, a few times.
    rng = random.Random(0)
    for i in range(4):
        pid, out = _save_in_child(models[i % 2], folder, loop=True)
        assert out.readline().strip() == "saving"
        time.sleep(0.02 + 0.1 * rng.random())
        os.kill(pid, signal.SIGKILL)
        _wait(pid)
        out.close()
        _which(folder, states)
    # The next save cleans up what the kills left behind.
    assert save(1)[0] == 0
    assert _which(folder, states) == 1
    assert not list(folder.glob(".saving-*"))
    listed = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert {p.name for p in folder.glob("model*.safetensors")} == listed


def test_saved_files_are_readable_like_the_others(tmp_path):
    model = stablelm.AutoModelForCausalLM.from_pretrained(stablelm.demo_model_path(), quantization="int8")
    model.save_pretrained(tmp_path)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert len(set(modes.values())) == 1, modes
    assert modes["model.safetensors"] & 0o044 == 0o044 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- 3. a checkpoint stays in its folder -------------------------------------------------------
@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "a/../../outside.safetensors"])
def test_shard_index_cannot_point_outside_its_folder(tmp_path, name):
    outside = tmp_path / "outside.safetensors"
    folder = tmp_path / "ckpt"
    tiny_checkpoint(folder).save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").rename(outside)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": name}}))
    with pytest.raises(ValueError, match="not a file inside the checkpoint folder"):
        stablelm.AutoModelForCausalLM.from_pretrained(folder)


def test_weight_map_must_be_an_object(tmp_path):
    folder = tmp_path / "ckpt"
    tiny_checkpoint(folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(ValueError, match="weight_map must be an object"):
        stablelm.AutoModelForCausalLM.from_pretrained(folder)


# -- 4. bodies are counted as they arrive --------------------------------------------------------
def test_chunked_body_is_cut_at_the_limit(server):
    before = server.rss()

    def chunks():
        for _ in range(200):  # 200 MB offered, chunked (no Content-Length)
            yield b"x" * 2**20

    started = time.time()
    r = post(server, "/v1/completions", content=chunks(), timeout=60)
    assert r.status_code == 413 and time.time() - started < 10
    assert server.rss() - before < 50 * 2**20


def test_a_slow_body_times_out(server):
    def slow():
        yield b'{"prompt": '
        time.sleep(3)  # the server gives 2 s (--request-timeout 2)
        yield b'"x"}'

    try:
        r = post(server, "/v1/completions", content=slow(), timeout=20)
        assert r.status_code == 408
    except httpx.HTTPError:
        pass  # closed on us: as good
    assert server.health()["status"] == "ok"


# -- 5. an abandoned non-streaming request stops -------------------------------------------------
def test_abandoned_non_streaming_requests_are_cancelled(server):
    # 1000 decode steps outlast the client's 0.5 s and the server's 0.25 s disconnect poll on any CPU (with 240,
    # a fast run finished one of the six before its client was missed: 5 cancelled)
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 1000, "temperature": 0}

    def gone():
        try:
            post(server, "/v1/completions", body, timeout=0.5)
        except httpx.TimeoutException:
            pass

    def cancelled() -> float:
        line = next(x for x in httpx.get(server.url + "/metrics").text.splitlines()
                    if x.startswith("stablelm_requests_cancelled_total"))
        return float(line.split()[-1])

    before = cancelled()
    threads = [threading.Thread(target=gone) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.wait_idle(timeout=30)["batch_size"] == 0  # 0.07 s on a quiet machine; was 12.7 s
    assert cancelled() - before == 6


# -- 6. metric labels stay bounded ---------------------------------------------------------------
def test_metrics_label_by_route_template(server):
    with httpx.Client(base_url=server.url) as client:
        for i in range(300):
            client.get(f"/no/such/path/{i}")
    text = httpx.get(server.url + "/metrics").text
    assert "/no/such/path" not in text
    assert 'path="unmatched",status="404"' in text
    assert len(text) < 20_000


# -- 7. a hostile config.json is refused before anything is built --------------------------------
@pytest.mark.parametrize("change,message", [
    ({"num_labels": 10**8}, "num_labels"),
    ({"num_hidden_layers": 20000}, "num_hidden_layers=20000"),
    ({"vocab_size": 10**9}, "vocab_size"),
    ({"rope_theta": float("inf")}, "rope_theta"),
    ({"rope_scaling": {"rope_type": "linear", "factor": float("nan")}}, "rope_scaling.factor"),
    ({"layer_norm_eps": float("nan")}, "layer_norm_eps"),
])
def test_hostile_config_is_refused_quickly(tmp_path, change, message):
    tiny_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value in change.items():  # RoPE keys live in rope_parameters in transformers 5's layout
        if key.startswith("rope") and "rope_parameters" in config:
            config["rope_parameters"].update(value if key == "rope_scaling" else {key: value})
        else:
            config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config, allow_nan=True))
    started = time.time()
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("=", "=")):
        stablelm.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert time.time() - started < 20  # ms now; 61 s and 85 s before


def test_serve_says_what_cache_it_chose(ckpt, tmp_path):
    s = Server(ckpt, "--kv-cache-memory", "64KiB", "--max-batch", "2", log=tmp_path / "log")
    try:
        s.stop()
        text = (tmp_path / "log").read_text()
        assert "KV cache: 8 blocks of 16 tokens (budget 0.00 GiB), up to 2 sequences of up to 128 tokens" in text
    finally:
        s.stop()


# -- 8. numpy is declared ------------------------------------------------------------------------
def test_numpy_is_a_declared_dependency():
    from importlib.metadata import requires

    assert any(r.split(">")[0].split("=")[0].strip() == "numpy" for r in requires("stablelm"))


# -- 9. the event loop keeps answering -----------------------------------------------------------
def test_health_answers_while_a_huge_prompt_is_tokenized(server):
    prompt = "To be, or not to be: that is the question. " * 20_000  # ~880 KB
    done = {}

    def big():
        done["status"] = completion(server, prompt, 4).status_code

    t = threading.Thread(target=big)
    t.start()
    worst = 0.0
    while t.is_alive():
        started = time.time()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        worst = max(worst, time.time() - started)
        time.sleep(0.05)
    t.join()
    assert done["status"] == 400  # past the context
    assert worst < 3.0  # 70 ms on a quiet machine; 4.5 s while the event loop tokenized


def test_template_rendering_is_bounded(monkeypatch):
    from jinja2.exceptions import TemplateError

    from stablelm.io import chat

    monkeypatch.setattr(chat, "MAX_RENDER_SECONDS", 0.3)
    slow = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    started = time.time()
    with pytest.raises(TemplateError, match="longer than"):
        chat.render_chat(slow, [{"role": "user", "content": "x"}])
    assert time.time() - started < 10  # the loops alone would take hours
    monkeypatch.setattr(chat, "MAX_RENDER_CHARS", 1000)
    with pytest.raises(TemplateError, match="more than 1000 characters"):
        chat.render_chat("{% for a in range(100) %}{{ messages[0].content }}{% endfor %}",
                         [{"role": "user", "content": "x" * 100}])


# -- 10. client mistakes are 400s ----------------------------------------------------------------
@pytest.mark.parametrize("content,path,fragment", [
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "/v1/completions", "invalid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "/v1/completions", "invalid JSON"),
    (b'{"prompt": "\\ud800"}', "/v1/completions", "lone surrogate"),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}).encode(),
     "/v1/chat/completions", "roles must alternate"),
])
def test_client_mistakes_are_400(server, content, path, fragment):
    r = post(server, path, content=content)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]


# -- 11. max_tokens 0 ----------------------------------------------------------------------------
def test_max_tokens_zero_is_refused(server):
    for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 0}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                 "max_completion_tokens": 0})):
        r = post(server, path, body)
        assert r.status_code == 400 and "greater than or equal to 1" in r.json()["error"]["message"]


# -- 12. a tampered quantized checkpoint fails at load -------------------------------------------
def test_tampered_quantized_shape_fails_at_load(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_checkpoint(tmp_path / "src")
    model = stablelm.AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization="int8")
    model.save_pretrained(tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    with pytest.raises(ValueError, match="up_proj.weight has shape"):
        stablelm.AutoModelForCausalLM.from_pretrained(tmp_path / "q")


# -- 13. clear errors ----------------------------------------------------------------------------
def test_legacy_pickle_loads_when_allowed(tmp_path):
    tiny_checkpoint(tmp_path)
    state = stablelm.AutoModelForCausalLM.from_pretrained(tmp_path, fast_inference=False).state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    (tmp_path / "model.safetensors").unlink()
    model = stablelm.AutoModelForCausalLM.from_pretrained(tmp_path, allow_pickle=True, fast_inference=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_integer_weight_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_checkpoint(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.self_attn.q_proj.weight"
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"q_proj\.weight' has dtype int32"):
        stablelm.AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("ids,message", [
    (torch.zeros(1, 0, dtype=torch.long), "at least one token"),
    (torch.tensor([[5, 320]]), "token id 320, outside the vocabulary \\(vocab_size 320\\)"),
    (torch.tensor([[-1, 5]]), "token id -1"),
])
def test_bad_input_ids_are_named(tmp_path, ids, message):
    model = tiny_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=message):
        model(ids)


def test_generate_past_the_context_warns(tmp_path):
    model = tiny_checkpoint(tmp_path, max_position_embeddings=16)
    with pytest.warns(UserWarning, match="past the model's context of 16"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=20)


@pytest.mark.parametrize("option,value", [("--max-batch", "-1"), ("--max-context", "0"), ("--port", "99999"),
                                          ("--max-queue", "-3"), ("--kv-cache-memory", "lots")])
def test_serve_refuses_bad_numbers_before_loading(option, value, capsys):
    from stablelm.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", option, value])
    assert exit_.value.code == 2 and f"argument {option}" in capsys.readouterr().err


def test_client_disconnects_are_not_logged_as_errors(server):
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 200, "temperature": 0, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            next(line for line in r.iter_lines() if line.startswith("data:"))
    server.wait_idle()
    log = Path(server.log).read_text()
    assert "Traceback" not in log and " 500 " not in log


# -- 14. hardening -------------------------------------------------------------------------------
def test_slowloris_connections_are_dropped(ckpt):
    s = Server(ckpt, "--request-timeout", "1", "--max-connections", "64")
    socks = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")  # and never the blank line
            socks.append(sock)
        started = time.time()
        assert httpx.get(s.url + "/health", timeout=5).status_code == 200
        open_socks = list(socks)
        while open_socks and time.time() - started < 30:  # ~2.5 s on a quiet machine: 1 s timeout, 1 s checks
            time.sleep(0.5)
            for sock in list(open_socks):
                sock.settimeout(0.01)
                try:
                    if sock.recv(1) == b"":
                        open_socks.remove(sock)
                except ConnectionResetError:  # closed with our bytes unread
                    open_socks.remove(sock)
                except socket.timeout:
                    pass
        assert not open_socks, f"{len(open_socks)} slow connections still open after 30 s (all held before)"
    finally:
        for sock in socks:
            sock.close()
        s.stop()


def test_host_and_content_type_are_checked(server):
    r = httpx.get(server.url + "/health", headers={"Host": "attacker.example:8000"})
    assert r.status_code == 421
    for host in ("localhost", f"127.0.0.1:{server.port}", "[::1]:80"):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200
    r = post(server, "/v1/completions", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = post(server, "/v1/completions", content=b'{"prompt": "x"}',
             headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415


def test_api_key_covers_metrics_and_schema_and_docs_are_off(ckpt):
    s = Server(ckpt, "--api-key", "sekrit")
    try:
        for path in ("/metrics", "/openapi.json", "/v1/models"):
            assert httpx.get(s.url + path).status_code == 401
            assert httpx.get(s.url + path, headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert httpx.get(s.url + "/docs", headers={"Authorization": "Bearer sekrit"}).status_code == 404
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


# -- 15. the command line as a new user meets it -------------------------------------------------
def test_serve_prints_a_ready_line_and_a_clear_port_error(ckpt, tmp_path):
    s = Server(ckpt, log=tmp_path / "a.log")
    try:
        assert f"ready on http://127.0.0.1:{s.port}/v1" in (tmp_path / "a.log").read_text()
        proc = subprocess.run([sys.executable, "-m", "stablelm.cli", "serve", "--model", str(ckpt), "--port",
                               str(s.port)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1
        assert f"cannot listen on 127.0.0.1:{s.port}" in proc.stderr and "--port" in proc.stderr
        assert "Errno" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    finally:
        s.stop()


def test_every_command_and_option_is_described():
    from stablelm.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, command in sub.choices.items():
        assert command.description, f"stablelm {name} has no description"
        for action in command._actions:
            if action.dest not in ("help", "worker", "checkpoint"):
                assert action.help, f"stablelm {name} {action.option_strings or action.dest} has no help text"
    proc = subprocess.run([sys.executable, "-m", "stablelm.cli", "--version"], capture_output=True, text=True)
    assert proc.stdout.strip() == f"stablelm {stablelm.__version__}"


def test_hub_failures_say_why(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as e:
            raise LocalEntryNotFoundError("cannot find the files") from e

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match="cannot reach the hub, no network"):
        stablelm.AutoModelForCausalLM.from_pretrained("someone/some-model")


def test_the_serve_extra_installs_the_readme_client():
    from importlib.metadata import requires

    assert any(r.startswith("openai") and 'extra == "serve"' in r for r in requires("stablelm"))


# -- 16. without the [serve] extra ---------------------------------------------------------------
def test_serve_without_fastapi_names_the_extra():
    code = "import sys; sys.modules['fastapi'] = None; from stablelm.cli import main; sys.exit(main(['serve']))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "pip install 'stablelm[serve]'" in proc.stderr and "internal error" not in proc.stderr


# -- the soak ------------------------------------------------------------------------------------
def test_soak_mixed_good_bad_and_vanishing_clients(server):
    """200 requests from 12 threads (every other kind 14-19 times): greedy ones (checked against their solo
    answers), bad ones, streams dropped midway, clients that time out. Afterwards every good answer matched,
    the engine is idle, memory is back near where it was, and the server still answers."""
    prompts = ["To be", "or not", "Whether 'tis", "Caf\u00e9 na\u00efve", "Or to take arms"]
    solo = {p: completion(server, p, 12).json()["choices"][0]["text"] for p in prompts}
    for _ in range(20):  # warm up, then take the baseline
        completion(server, "warm", 12)
    baseline = server.rss()
    rng = random.Random(0)
    kinds = ["good"] * 5 + ["stream_good", "bad_seed", "bad_json", "bad_temp", "drop_stream", "timeout", "n3"]
    plan = [(rng.choice(kinds), rng.choice(prompts)) for _ in range(200)]
    failures = []

    def one(kind, prompt):
        try:
            if kind == "good":
                r = completion(server, prompt, 12)
                if r.json()["choices"][0]["text"] != solo[prompt]:
                    failures.append((kind, prompt, r.text))
            elif kind == "stream_good":
                body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True}
                with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                    text = "".join(json.loads(line[5:])["choices"][0]["text"] for line in r.iter_lines()
                                   if line.startswith("data: {"))
                if text != solo[prompt]:
                    failures.append((kind, prompt, text))
            elif kind == "bad_seed":
                r = completion(server, prompt, 4, temperature=0.5, seed=2**70)
                if r.status_code != 400:
                    failures.append((kind, r.status_code))
            elif kind == "bad_json":
                r = post(server, "/v1/completions", content=b'{"prompt": [' * 50)
                if r.status_code != 400:
                    failures.append((kind, r.status_code))
            elif kind == "bad_temp":
                r = completion(server, prompt, 4, temperature=1e-30)
                if r.status_code != 400:
                    failures.append((kind, r.status_code))
            elif kind == "drop_stream":
                body = {"model": "tiny", "prompt": prompt, "max_tokens": 200, "temperature": 0.9, "stream": True}
                with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                    next(line for line in r.iter_lines() if line.startswith("data:"))
            elif kind == "timeout":
                body = {"model": "tiny", "prompt": prompt, "max_tokens": 200, "temperature": 0.9,
                        "seed": rng.randrange(2**63)}
                try:
                    post(server, "/v1/completions", body, timeout=0.3)
                except httpx.TimeoutException:
                    pass
            elif kind == "n3":
                r = completion(server, prompt, 12, n=3)
                if [c["text"] for c in r.json()["choices"]] != [solo[prompt]] * 3:
                    failures.append((kind, prompt, r.text))
        except Exception as e:  # noqa: BLE001 - every surprise is a failure to report
            failures.append((kind, prompt, repr(e)))

    def worker(items):
        for kind, prompt in items:
            one(kind, prompt)

    threads = [threading.Thread(target=worker, args=(plan[i::12],)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not failures, failures[:5]
    assert server.wait_idle(timeout=10) == {"status": "ok", "batch_size": 0, "queue_depth": 0}
    grown = server.rss() - baseline
    print(f"soak: {len(plan)} requests from 12 threads, RSS {baseline / 2**20:.0f} MiB -> "
          f"{(baseline + grown) / 2**20:.0f} MiB")
    assert grown < 64 * 2**20
    assert completion(server, prompts[0], 12).json()["choices"][0]["text"] == solo[prompts[0]]


def test_prefix_cache_is_shared_only_within_one_key_and_salt():
    """Issue 27 item 2: client B cannot tell whether client A's prompt is cached. Each API key, and each
    cache_salt within a key, has its own prefix cache: B's guess of A's prompt reuses nothing (no metric moves,
    nothing is faster) while A's own repeat reuses its blocks; the answers are the same either way."""
    from fastapi.testclient import TestClient

    from stablelm.serving.server import create_app

    model = stablelm.AutoModelForCausalLM.from_pretrained(stablelm.demo_model_path())
    tok = stablelm.AutoTokenizer.from_pretrained(stablelm.demo_model_path())
    app = create_app(model, tok, "demo", api_key=["key-a", "key-b"], max_batch=2, kv_cache_memory=8 << 20)
    secret = "ROMEO:\nThe password to the vault is juliet-balcony-1597, tell no one.\n" * 3
    pool = app.state.engine.pool

    def ask(key, **extra):
        before = pool.tokens_reused
        r = client.post("/v1/completions", headers={"authorization": f"Bearer {key}"},
                        json={"prompt": secret, "max_tokens": 4, "temperature": 0, **extra})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"], pool.tokens_reused - before

    with TestClient(app) as client:
        text, reused = ask("key-a")
        assert reused == 0 and len(tok.encode(secret)) > 3 * pool.block_size
        assert ask("key-b") == (text, 0)  # the right guess from another key: nothing reused
        assert ask("key-a")[1] > 2 * pool.block_size  # the key's own repeat still reuses its blocks
        assert ask("key-a", cache_salt="tenant-1") == (text, 0)  # a salt is its own namespace within a key
        assert ask("key-a", cache_salt="tenant-1")[1] > 0
        assert ask("key-b", cache_salt="tenant-1")[1] == 0
        metrics = client.get("/metrics", headers={"authorization": "Bearer key-b"}).text
        assert "stablelm_prefix_cache_reused_tokens" in metrics
        assert client.get("/metrics", headers={"authorization": "Bearer key-c"}).status_code == 401
