"""`stablelm bench --serving`: the continuous-batching engine under load, in this process.

streams: aggregate decode tokens/s at N concurrent requests; multi-turn: a chat resent whole every turn, with
and without prefix caching; long-prompt: the running streams' token gaps while a long prompt is prefilled;
budget: many streams with mixed prompt lengths in a KV budget that one cache row per stream cannot fit.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .models.model import StableLmForCausalLM
from .serving.engine import Engine, Request, SamplingParams, kv_bytes_per_token
from .training.train import train_tokenizer


def _serving_model(args, ckpt: Path):
    if args.threads:
        torch.set_num_threads(args.threads)
    quant = None if args.quantization == "none" else args.quantization
    model = StableLmForCausalLM.from_pretrained(ckpt, dtype=args.dtype, quantization=quant,
                                                linear_format=args.linear_format)
    return model, train_tokenizer(["only used to turn ids into text"], 300)  # the checkpoint has none


def _run_all(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[Request]:
    """Submit greedy requests for every prompt at once and wait for them all."""
    requests = [Request(ids, SamplingParams(max_tokens=max_tokens, temperature=0), lambda e: None)
                for ids in prompts]
    for request in requests:
        engine.submit(request)
    for request in requests:
        request.done.wait()
    return requests


def _random_ids(model, gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(5, model.config.vocab_size, (n,), generator=gen).tolist()


def streams(args, ckpt: Path) -> dict:
    """Aggregate decode throughput of the engine with N concurrent requests (greedy, 64-token prompts)."""
    model, tokenizer = _serving_model(args, ckpt)
    engine = Engine(model, tokenizer, max_batch=max(args.streams), max_context=128)
    gen = torch.Generator().manual_seed(0)
    results = {}
    for count in [1] + list(args.streams):  # the first round warms up
        start = time.perf_counter()
        requests = _run_all(engine, [_random_ids(model, gen, 64) for _ in range(count)], args.decode_tokens)
        wall = time.perf_counter() - start
        tokens = sum(len(r.outputs[0]) for r in requests)
        ttft = [r.first_token_at - r.submitted for r in requests]
        results[f"streams_{count}"] = {"aggregate_tok_s": tokens / wall, "mean_ttft_s": sum(ttft) / len(ttft),
                                       "completion_tokens": tokens, "wall_s": wall}
    engine.shutdown()
    return results


def multi_turn(args, ckpt: Path) -> dict:
    """A chat resent whole every turn (--turns turns of --turn-tokens user tokens and replies as long), with
    prefix caching and without: each turn's time to first token."""
    model, tokenizer = _serving_model(args, ckpt)
    context = args.turns * 2 * args.turn_tokens + 16
    results = {}
    for label, caching in (("prefix_cache", True), ("no_prefix_cache", False)):
        engine = Engine(model, tokenizer, max_batch=1, max_context=context, prefix_caching=caching)
        gen = torch.Generator().manual_seed(0)
        history, ttft = [], []
        for _ in range(args.turns):
            history += _random_ids(model, gen, args.turn_tokens)
            request, = _run_all(engine, [history], args.turn_tokens)
            ttft.append(request.first_token_at - request.submitted)
            history += request.outputs[0]  # the client sends the reply back with the next turn
        engine.shutdown()
        results[label] = {"ttft_s": ttft}
    results["last_turn_speedup"] = results["no_prefix_cache"]["ttft_s"][-1] / results["prefix_cache"]["ttft_s"][-1]
    return results


def long_prompt(args, ckpt: Path) -> dict:
    """--streams[-1] running streams, then a --long-prompt-tokens prompt arrives: the gaps between the running
    streams' tokens (one per engine round) before it and while it is prefilled, chunked and whole."""
    model, tokenizer = _serving_model(args, ckpt)
    count = args.streams[-1]
    results = {}
    chunk = args.prefill_chunk if args.prefill_chunk == "auto" else int(args.prefill_chunk)
    for label, option in (("chunked", chunk), ("whole_prompts", None)):
        engine = Engine(model, tokenizer, max_batch=count + 1, max_context=args.long_prompt_tokens + 64,
                        prefix_caching=False, prefill_chunk=option)
        rounds: list[float] = []  # each round is one decode step of every running stream
        engine.on_step = lambda e: rounds.append(time.perf_counter()) if e.batch_size >= count else None
        gen = torch.Generator().manual_seed(0)
        running = [Request(_random_ids(model, gen, 16), SamplingParams(max_tokens=args.long_prompt_tokens,
                                                                       temperature=0), lambda e: None)
                   for _ in range(count)]
        for request in running:
            engine.submit(request)
        while len(rounds) < 8:
            time.sleep(0.01)
        arrived = time.perf_counter()
        long_request, = _run_all(engine, [_random_ids(model, gen, args.long_prompt_tokens)], 1)
        done = time.perf_counter()
        for request in running:
            request.cancel()
        engine.shutdown()
        before = [b - a for a, b in zip(rounds, rounds[1:]) if b < arrived]
        during = [b - a for a, b in zip(rounds, rounds[1:]) if b > arrived and a < done]
        result = results[label] = {"chunk": engine.budget.chunk, "median_gap_s": statistics.median(before),
                                   "worst_gap_during_prefill_s": max(during),
                                   "long_prompt_ttft_s": long_request.first_token_at - long_request.submitted}
        result["worst_over_median"] = result["worst_gap_during_prefill_s"] / result["median_gap_s"]
    return results


def budget(args, ckpt: Path) -> dict:
    """--streams[-1] requests at once, prompts of --prompt-lengths MIN..MAX tokens (uniform), --decode-tokens
    each, in a KV budget (--kv-cache-memory, default a quarter of what one cache row per stream of the longest
    sequence needs, the design before the block pool): wall time, aggregate tokens/s, preemptions."""
    model, tokenizer = _serving_model(args, ckpt)
    count = args.streams[-1]
    low, high = min(args.prompt_lengths), max(args.prompt_lengths)
    rows_need = count * (high + args.decode_tokens) * kv_bytes_per_token(model.config, model.dtype)
    memory = args.kv_cache_memory or rows_need // 4
    engine = Engine(model, tokenizer, max_batch=count, max_queue=count, max_context=high + args.decode_tokens,
                    kv_cache_memory=memory, prefix_caching=False)
    peak = []
    engine.on_step = lambda e: peak.append(e.pool.used)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(low, high + 1, (count,), generator=gen).tolist()
    start = time.perf_counter()
    requests = _run_all(engine, [_random_ids(model, gen, n) for n in lengths], args.decode_tokens)
    wall = time.perf_counter() - start
    engine.shutdown()
    engine.pool.check_empty()
    tokens = sum(len(r.outputs[0]) for r in requests)
    ttft = sorted(r.first_token_at - r.submitted for r in requests)
    return {"streams": count, "prompt_tokens": sum(lengths), "completion_tokens": tokens,
            "kv_budget_bytes": memory, "one_row_per_stream_needs_bytes": rows_need,
            "pool_blocks": engine.pool.num_blocks, "peak_blocks_used": max(peak), "preemptions": engine.preemptions,
            "wall_s": wall, "aggregate_tok_s": tokens / wall, "median_ttft_s": ttft[len(ttft) // 2],
            "worst_ttft_s": ttft[-1]}


SCENARIOS = {"multi-turn": multi_turn, "long-prompt": long_prompt, "budget": budget}
