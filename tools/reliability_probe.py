"""Measure the figures of docs/reliability.md: the attacks of issue 13 against `stablelm serve` on the demo model.

    python tools/reliability_probe.py            # prints a markdown table

Loopback only; every loop is bounded. Takes about a minute.
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import Server, tiny_checkpoint  # noqa: E402

import stablelm  # noqa: E402

JSON = {"content-type": "application/json"}


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main() -> None:
    rows = []
    s = Server(stablelm.demo_model_path(), "--max-batch", "8", "--max-queue", "64", "--request-timeout", "2")
    try:
        url = s.url
        body = {"prompt": "x", "temperature": 0.7, "seed": 18446744073709551616}
        r, t = timed(lambda: httpx.post(url + "/v1/completions", json=body, timeout=30))
        rows.append(("1", "seed 2**64 at temperature 0.7", f"{r.status_code} in {t * 1000:.0f} ms"))
        r, t = timed(lambda: httpx.post(url + "/v1/completions", json={"prompt": "x", "temperature": 1e-40}))
        rows.append(("1", "temperature 1e-40", f"{r.status_code} in {t * 1000:.0f} ms"))

        before = s.rss()
        r, t = timed(lambda: httpx.post(url + "/v1/completions", headers=JSON, timeout=60,
                                        content=(b"x" * 2**20 for _ in range(200))))
        rows.append(("4", "200 MB chunked body", f"{r.status_code} in {t:.2f} s, RSS {before / 2**20:.0f} -> "
                                                  f"{s.rss() / 2**20:.0f} MiB"))

        def gone():
            try:
                httpx.post(url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 400}, timeout=0.5)
            except httpx.TimeoutException:
                pass

        threads = [threading.Thread(target=gone) for _ in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        left = time.perf_counter()
        s.wait_idle(timeout=30)
        rows.append(("5", "8 non-streaming clients gone after 0.5 s", f"batch empty {time.perf_counter() - left:.2f} s later"))

        with httpx.Client(base_url=url) as client:
            for i in range(20000):
                client.get(f"/probe/{i}")
        size = len(httpx.get(url + "/metrics").content)
        rows.append(("6", "20,000 distinct 404 paths", f"/metrics is {size / 1024:.1f} KB"))

        prompt = "To be, or not to be: that is the question. " * 23_000
        done = threading.Event()
        th = threading.Thread(target=lambda: (httpx.post(url + "/v1/completions", json={"prompt": prompt},
                                                         timeout=60), done.set()))
        th.start()
        worst = 0.0
        while not done.is_set():
            _, t = timed(lambda: httpx.get(url + "/health", timeout=10))
            worst = max(worst, t)
            time.sleep(0.02)
        th.join()
        rows.append(("9", f"/health while a {len(prompt) / 1e6:.1f} MB prompt is tokenized", f"worst {worst * 1000:.0f} ms"))

        socks = []
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", s.port))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
            socks.append(sock)
        _, t = timed(lambda: httpx.get(url + "/health", timeout=10))
        time.sleep(2.5)
        open_ = 0
        for sock in socks:
            sock.settimeout(0.2)
            try:
                open_ += sock.recv(1) != b""
            except ConnectionResetError:
                pass
            except socket.timeout:
                open_ += 1
            sock.close()
        rows.append(("14", "300 slowloris connections (request timeout 2 s)",
                     f"/health {t * 1000:.0f} ms meanwhile; {open_} still open 2.5 s later"))
    finally:
        s.stop()

    with tempfile.TemporaryDirectory() as tmp:
        tiny_checkpoint(Path(tmp))
        config = json.loads((Path(tmp) / "config.json").read_text())
        for change in ({"num_labels": 10**8}, {"num_hidden_layers": 20000}):
            (Path(tmp) / "config.json").write_text(json.dumps({**config, **change}))
            started = time.perf_counter()
            try:
                stablelm.AutoModelForSequenceClassification.from_pretrained(tmp)
                outcome = "loaded!"
            except ValueError as e:
                outcome = f"ValueError in {(time.perf_counter() - started) * 1000:.0f} ms: {str(e).split(': ', 1)[-1]}"
            rows.append(("7", f"config.json {change}", outcome))
        (Path(tmp) / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2**22}))
        log = Path(tmp) / "serve.log"
        s = Server(tmp, log=log)
        s.stop()
        line = next(x for x in log.read_text().splitlines() if "KV cache" in x)
        rows.append(("7", "serve with max_position_embeddings 2**22", line.split(" ", 2)[2]))

    print("| item | probe | result |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
