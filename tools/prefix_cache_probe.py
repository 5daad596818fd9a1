"""Time to first token of the last turn of a multi-turn chat, with and without the engine's prefix cache.

    python tools/prefix_cache_probe.py [--model PATH] [--tokenizer PATH] [--turns 6] [--user-tokens 40] [--reply-tokens 40]

Each turn sends the whole conversation so far (as chat clients do); greedy replies. Prints both TTFTs,
their ratio, and whether the replies were identical.
"""

from __future__ import annotations

import argparse
import time

import stablelm
from stablelm.serving.engine import Engine, Request, SamplingParams


def conversation(engine, tok, turns, user_tokens, reply_tokens):
    history, replies, ttft = [], [], 0.0
    words = "what light through yonder window breaks it is the east and juliet is the sun".split()
    for turn in range(turns):
        user = " ".join(words[(turn + i) % len(words)] for i in range(user_tokens))
        history = history + tok.encode(f"ROMEO:\n{user}\n\nJULIET:\n")
        first, pieces = [], []

        def emit(event):
            if not first:
                first.append(time.perf_counter())
            pieces.append(event.text)

        started = time.perf_counter()
        request = Request(history, SamplingParams(max_tokens=reply_tokens, temperature=0), emit)
        engine.submit(request)
        request.done.wait()
        ttft = first[0] - started
        reply = "".join(pieces)
        replies.append(reply)
        history = history + tok.encode(reply + "\n\n")
    return ttft, replies, len(history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(stablelm.demo_model_path()))
    parser.add_argument("--tokenizer", default=None, help="default: the model's (e.g. the demo's for a bench checkpoint)")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--user-tokens", type=int, default=40)
    parser.add_argument("--reply-tokens", type=int, default=40)
    args = parser.parse_args()
    model = stablelm.AutoModelForCausalLM.from_pretrained(args.model)
    tok = stablelm.AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    results = {}
    for label, budget in (("without", 0), ("with", None)):
        engine = Engine(model, tok, max_batch=1, prefix_cache_memory=budget)
        try:
            results[label] = conversation(engine, tok, args.turns, args.user_tokens, args.reply_tokens)
        finally:
            engine.shutdown()
    (t0, r0, n), (t1, r1, _) = results["without"], results["with"]
    print(f"last turn: {n} tokens of history; TTFT without prefix cache {t0 * 1000:.0f} ms, with "
          f"{t1 * 1000:.0f} ms ({t0 / t1:.1f}x); replies identical: {r0 == r1}")


if __name__ == "__main__":
    main()
