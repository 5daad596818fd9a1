"""Continuous batching: one loop runs decode steps over every active sequence.

A request is prefilled alone into a scratch cache, at most `prefill_chunk` prompt tokens a round over the
prompts waiting (each round is also a decode step of the running batch, so a long prompt does not stall
the streams already running), then copied into free rows of the shared cache (one per `n`), and joins the
running batch at the next step.
A finished or cancelled sequence leaves at once: the last active row moves into its place, so the active
rows are always 0..k-1 and each decode step is one forward over exactly those rows. Sampling, stop strings
and the text hand-out are generate()'s own (stablelm.sampling, stablelm.streaming).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..generation import sampling
from ..generation.generate import decode_step
from ..generation.streaming import IncrementalText, StopScanner
from .prefix_cache import PrefixCache
from ..models.cache import KVCache, kv_heads

log = logging.getLogger("stablelm.engine")


@dataclass
class SamplingParams:
    """One request's decoding options (OpenAI's names); `sampling.validate` checks them at submit."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the top k
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    # The names sampling.process / validate read (generate()'s GenerationConfig has the same).
    min_length, min_new_tokens, num_beams, num_return_sequences, early_stopping = 0, None, 1, 1, False

    @property
    def do_sample(self) -> bool:
        return self.temperature != 0

    @property
    def max_new_tokens(self) -> int:
        return self.max_tokens

    def validate(self) -> None:
        """Raise ValueError naming the value that cannot work."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        StopScanner(self.stop)
        sampling.validate(self)


@dataclass
class Event:
    """One piece of output for one sequence of a request."""

    index: int  # which of the n sequences
    text: str
    token_logprobs: list[dict] = field(default_factory=list)  # one per token in this piece
    finish_reason: str | None = None
    completion_tokens: int = 0


class Request:
    """A submitted prompt; `emit` receives Events (from the engine thread)."""

    serials = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Event], None]):
        self.serial = next(Request.serials)  # names the request to the other ranks of a tensor-parallel engine
        self.prompt_ids = prompt_ids
        self.params = params
        self.emit = emit
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.done = threading.Event()
        self.unfinished = params.n
        self.started = 0  # sequences that joined the batch
        self.outputs: dict[int, list[int]] = {}  # each finished sequence's generated token ids, by index

    def cancel(self) -> None:
        self.cancelled = True


class _Sequence:
    def __init__(self, request: Request, index: int, row: int, engine: Engine):
        self.request, self.index, self.row = request, index, row
        self.tokens: list[int] = []
        self.text = IncrementalText(engine.tokenizer, request.params.stop)
        self.pending_logprobs: list[dict] = []
        self.last_token_at: float | None = None
        params = request.params
        device = engine.model.device
        self.generator = None
        if params.seed is not None:  # validated to [0, 2**63 - 1]; index < n keeps it a valid 64-bit seed
            self.generator = torch.Generator(device=device).manual_seed(params.seed + index)
        self.counts = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(1, engine.vocab_size, device=device)


@dataclass
class _Prefill:
    """A request whose prompt is being prefilled, `done` tokens so far, into its own scratch cache."""

    request: Request
    scratch: KVCache
    done: int


class Engine:
    """Owns the model, the shared cache and the decode loop (in a background thread).

    Every submitted request ends with a finish event for each of its sequences, whatever happens: a
    failure while admitting or stepping one sequence ends that sequence alone, with an error event.

    A tensor-parallel model (model.tp) runs one engine per rank. Rank 0 takes the requests; at the start of
    each round it tells the others which requests start, which were cancelled and whether to go on, and
    every rank then runs the same admissions and forwards on its slice (`follow` on the other ranks).
    Sampled tokens are rank 0's.
    """

    HEARTBEAT = 10.0  # seconds: an idle rank 0 still sends a round, so the others' collectives never time out

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, max_context: int | None = None,
                 kv_cache_memory: int | None = None, prefix_cache_memory: int | None = None,
                 prefill_chunk: int | None = 256):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
        # A prompt is prefilled this many tokens per round, each round also a decode step for the running
        # sequences, so a long prompt does not stall them (None: whole prompts at once).
        self.prefill_chunk = prefill_chunk
        self.prefilling: deque[_Prefill] = deque()
        self.observations: list[tuple[str, float]] = []  # ("queue" | "token_gap", seconds), drained by on_step
        self.vocab_size = model.config.vocab_size
        self.tp = getattr(model, "tp", None)
        self.context, self.kv_cache_memory = plan_cache(model.config, model.dtype, max_batch, max_context,
                                                        kv_cache_memory, kv_heads(model))
        if self.tp is not None:  # free memory differs between ranks; the plan (and so every decision) must not
            self.context, self.kv_cache_memory = self.tp.share((self.context, self.kv_cache_memory))
        self.cache = KVCache.for_model(model, max_batch, self.context)
        # Finished sequences' keys/values for requests that repeat their start (default: a quarter of the budget).
        prefix_bytes = self.kv_cache_memory // 4 if prefix_cache_memory is None else prefix_cache_memory
        self.prefix = PrefixCache(prefix_bytes) if prefix_bytes > 0 else None
        self.eos = set(model.config.eos_token_ids) | set(
            [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        self.no_eos = torch.empty(0, dtype=torch.long)
        self.waiting: deque[Request] = deque()
        self.active: list[_Sequence] = []  # active[i].row == i
        self.lock = threading.Condition()
        self.running = True
        self.steps = 0
        self.on_step: Callable[[Engine], None] | None = None  # after each round (metrics read the engine)
        self.thread = None
        if self.tp is None or self.tp.leader:
            self.thread = threading.Thread(target=self._loop, name="stablelm-engine", daemon=True)
            self.thread.start()

    # -- the API side ------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; ValueError for options or a prompt that cannot run, QueueFull at max_queue."""
        request.params.validate()
        ids = request.prompt_ids
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.context:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context is {self.context}")
        if request.params.n > self.max_batch:
            raise ValueError(f"n = {request.params.n} exceeds the batch size {self.max_batch}")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (size {self.vocab_size})")
        with self.lock:
            if not self.running:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self.waiting.append(request)
            self.lock.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.active)

    def idle(self) -> bool:
        return not self.active and not self.waiting and not self.prefilling

    def shutdown(self) -> None:
        """Stop the loop; every request still waiting or running ends with an error event."""
        with self.lock:
            self.running = False
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self._end_all("the server is shutting down")

    def _end_all(self, message: str) -> None:
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        waiting = [p.request for p in self.prefilling] + waiting
        self.prefilling.clear()
        for seq in list(self.active):
            self._finish(seq, "error", error=message)
        for request in waiting:
            self._fail(request, message)

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.lock:
                while self.running and not self.waiting and not self.active and not self.prefilling:
                    if not self.lock.wait(timeout=self.HEARTBEAT if self.tp is not None else None):
                        break  # a tensor-parallel round with nothing in it
                running = self.running
            starts = self._choose() if running else []
            cancelled = {seq.request.serial for seq in self.active if seq.request.cancelled} | \
                {p.request.serial for p in self.prefilling if p.request.cancelled}
            if self.tp is not None:
                try:
                    self.tp.share((running, [(r.serial, r.prompt_ids, r.params) for r in starts], cancelled))
                except RuntimeError as e:  # another rank is gone: nothing can run any more
                    log.error("a tensor-parallel process stopped (%s); the engine stops", str(e).splitlines()[0])
                    with self.lock:
                        self.running = False
                    self.waiting.extendleft(reversed(starts))
                    self._end_all("a tensor-parallel process of the server stopped")
                    return
            if not running:
                return
            self._round(starts, cancelled)
            if self.on_step:
                self.on_step(self)
            self.observations.clear()

    def follow(self) -> None:
        """The loop of a tensor-parallel rank other than 0: run the rounds rank 0 sends until it stops."""
        torch.set_grad_enabled(False)
        while True:
            running, starts, cancelled = self.tp.share()
            if not running:
                return
            self._round([self._mirror(*start) for start in starts], cancelled)

    def _mirror(self, serial: int, prompt_ids: list[int], params: SamplingParams) -> Request:
        request = Request(prompt_ids, params, lambda event: None)  # rank 0 answers the client
        request.serial = serial
        return request

    def _round(self, starts: list[Request], cancelled: set[int]) -> None:
        """Queue `starts` for prefill, drop `cancelled` requests, prefill one chunk of a prompt, then one
        decode step."""
        for request in starts:
            self._admit(request)
        for seq in [s for s in self.active if s.request.serial in cancelled]:
            self._finish(seq, "cancelled")
        for job in [p for p in self.prefilling if p.request.serial in cancelled]:
            self.prefilling.remove(job)
            job.request.done.set()
        budget = self.prefill_chunk  # prompt tokens this round, over as many prompts as it covers (None: all)
        while self.prefilling and (budget is None or budget > 0):
            used = self._prefill_chunk(budget)
            budget = None if budget is None else budget - used
        if self.active:
            try:
                self._step()
            except Exception as e:  # the batched forward failed: every sequence in it ends
                log.exception("decode step failed")
                for seq in list(self.active):
                    self._finish(seq, "error", error=f"generation failed: {e}")

    def _choose(self) -> list[Request]:
        """The waiting requests that start now: in order, while the batch has rows for their n sequences
        (rows promised to requests still in prefill count as taken)."""
        starts, free = [], self.max_batch - len(self.active) - sum(p.request.params.n for p in self.prefilling)
        with self.lock:
            while self.waiting and free >= self.waiting[0].params.n:
                request = self.waiting.popleft()
                if request.cancelled:
                    request.done.set()
                    continue
                starts.append(request)
                free -= request.params.n
        return starts

    def _admit(self, request: Request) -> None:
        """Set up `request`'s prefill: a scratch cache, filled from the prefix cache where it can be."""
        try:
            self.observations.append(("queue", time.perf_counter() - request.submitted))
            ids = request.prompt_ids
            reused, entry = self.prefix.longest(ids) if self.prefix else (0, None)
            scratch = KVCache.for_model(self.model, 1, max(len(ids), entry.capacity if entry is not None else 0))
            if entry is not None:  # the first `reused` tokens' keys/values from an earlier sequence
                scratch.copy_row(0, entry, 0)
                scratch.lengths[0] = reused
                scratch.valid[0, reused:] = False
            self.prefilling.append(_Prefill(request, scratch, reused))
        except Exception as e:  # this request alone ends
            log.exception("admitting a request failed")
            self._fail(request, f"generation failed: {e}")

    def _prefill_chunk(self, budget: int | None) -> int:
        """Up to `budget` more tokens (None: all) of the oldest prompt in prefill; once the prompt is in, its
        sequences join the batch. Returns the tokens it took from the budget."""
        job = self.prefilling[0]
        request = job.request
        ids = request.prompt_ids
        end = len(ids) if budget is None else min(len(ids), job.done + budget)
        used = end - job.done
        try:
            logits = prefill_chunk(self.model, torch.tensor([ids[job.done:end]], device=self.model.device), job.scratch)
            job.done = end
            if end < len(ids):
                return used
            self.prefilling.popleft()
            self._start(request, job.scratch, logits)
        except Exception as e:  # this request alone ends
            log.exception("prefilling a request failed")
            if self.prefilling and self.prefilling[0] is job:
                self.prefilling.popleft()
            for seq in [s for s in self.active if s.request is request]:
                self._finish(seq, "error", error=f"generation failed: {e}")
            self._fail(request, f"generation failed: {e}")
        return used

    def _start(self, request: Request, scratch: KVCache, logits: torch.Tensor) -> None:
        """The prompt is in `scratch`: its n sequences take batch rows and their first tokens."""
        for index in range(request.params.n):
            row = len(self.active)
            self.cache.copy_row(row, scratch, 0)
            seq = _Sequence(request, index, row, self)
            request.started += 1
            self.active.append(seq)
            self._take(seq, logits)

    def _fail(self, request: Request, message: str) -> None:
        """End the sequences of `request` that never started, with an error event each."""
        for index in range(request.started, request.params.n):
            _send(request, Event(index, message, finish_reason="error"))
            request.unfinished -= 1
        request.started = request.params.n
        if request.unfinished <= 0:
            request.done.set()

    def _step(self) -> None:
        rows = len(self.active)
        tokens = torch.tensor([s.tokens[-1] for s in self.active], device=self.model.device)
        positions = torch.tensor([self.cache.lengths[i] for i in range(rows)], device=self.model.device)
        view = self.cache.narrow(rows)
        logits = decode_step(self.model, tokens, positions, view)
        self.cache.absorb(view)
        self.steps += 1
        for seq, row_logits in zip(list(self.active), logits):
            try:
                self._take(seq, row_logits)
            except Exception as e:  # this sequence alone ends
                log.exception("sampling failed")
                self._finish(seq, "error", error=f"generation failed: {e}")

    # -- one sequence ------------------------------------------------------------------------
    def _take(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Choose the next token of `seq` from its logits (V,), emit text, finish if done."""
        params = seq.request.params
        seen = torch.tensor([seq.request.prompt_ids + seq.tokens], device=logits.device) \
            if params.repetition_penalty != 1.0 else None
        scores = sampling.process(logits.float()[None], seen, len(seq.tokens), params, self.no_eos,
                                  counts=seq.counts)
        chosen = sampling.choose(scores, params.do_sample, seq.generator)
        if params.do_sample and self.tp is not None:  # each rank's generator would pick its own
            chosen = self.tp.agree(chosen)
        token = int(chosen[0])
        if seq.counts is not None:
            seq.counts[0, token] += 1
        if params.logprobs is not None:
            seq.pending_logprobs.append(self._logprobs(logits, token, params.logprobs))
        request = seq.request
        now = time.perf_counter()
        if request.first_token_at is None:
            request.first_token_at = now
        if seq.last_token_at is not None:
            self.observations.append(("token_gap", now - seq.last_token_at))
        seq.last_token_at = now
        if token in self.eos:
            self._emit(seq, seq.text.flush())
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        piece, stopped = seq.text.add([token])
        if stopped:
            self._emit(seq, piece)
            self._finish(seq, "stop")
        elif len(seq.tokens) >= params.max_tokens or self.cache.lengths[seq.row] + 1 >= self.context:
            self._emit(seq, piece + seq.text.flush())
            self._finish(seq, "length")
        else:
            self._emit(seq, piece)

    def _emit(self, seq: _Sequence, piece: str) -> None:
        if piece or seq.pending_logprobs:
            _send(seq.request, Event(seq.index, piece, seq.pending_logprobs, completion_tokens=len(seq.tokens)))
            seq.pending_logprobs = []

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        """Leave the batch now: free the row by moving the last active row into it."""
        if seq not in self.active:
            return
        if self.prefix is not None and reason in ("stop", "length"):
            held = self.cache.lengths[seq.row]  # the last sampled token was never fed
            self.prefix.store((seq.request.prompt_ids + seq.tokens)[:held], self.cache, seq.row)
        last = self.active[-1]
        if last is not seq:
            self.cache.copy_row(seq.row, self.cache, last.row)
            last.row = seq.row
            self.active[seq.row] = last
        self.active.pop()
        self.cache.reset_rows([len(self.active)])
        request = seq.request
        request.outputs[seq.index] = list(seq.tokens)
        if reason != "cancelled":
            _send(request, Event(seq.index, "" if error is None else error, seq.pending_logprobs,
                                 finish_reason=reason, completion_tokens=len(seq.tokens)))
        request.unfinished -= 1
        if request.unfinished == 0:
            request.done.set()

    def _logprobs(self, logits: torch.Tensor, token: int, top: int) -> dict:
        logp = F.log_softmax(logits.float(), dim=-1)
        entry = {"token_id": token, "logprob": float(logp[token]), "top": []}
        if top:
            values, ids = torch.topk(logp, top)
            entry["top"] = [(int(i), float(v)) for v, i in zip(values, ids)]
        return entry


@torch.inference_mode()
def prefill_chunk(model, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Append the prompt tokens `ids` (1, S) after what the one-row `cache` holds; the next-token logits (V,)."""
    return model(ids, past_key_values=cache, logits_to_keep=1).logits[0, -1].float()


def _send(request: Request, event: Event) -> None:
    """Hand an event to the request's client; a client that is gone must not stop the engine."""
    try:
        request.emit(event)
    except Exception:
        log.debug("could not deliver an event", exc_info=True)


def plan_cache(config, dtype: torch.dtype, max_batch: int, max_context: int | None,
               kv_cache_memory: int | None, kv_heads: int | None = None) -> tuple[int, int]:
    """(context, budget in bytes) for a `max_batch` x context KV cache that fits the memory budget.

    The budget (per process) defaults to a quarter of the memory available now, shared by the processes
    of this machine. Without `max_context` the context is the model's, shortened to fit; a `max_context`
    that does not fit is an error naming both numbers. kv_heads: the heads this process caches.
    """
    if kv_cache_memory is None:
        kv_cache_memory = available_memory() // 4 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    kv_heads = config.num_key_value_heads if kv_heads is None else kv_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * config.head_dim * dtype.itemsize
    fits = kv_cache_memory // (per_token * max_batch)
    model_context = config.max_position_embeddings
    if max_context is not None:
        context = min(max_context, model_context)
        if context > fits:
            raise ValueError(f"a KV cache of {max_batch} x {context} tokens needs "
                             f"{_gib(per_token * max_batch * context)}, over the budget of {_gib(kv_cache_memory)}: "
                             "lower --max-context or --max-batch, or raise --kv-cache-memory")
    else:
        context = min(model_context, fits)
    if context < 2:
        raise ValueError(f"the KV cache budget of {_gib(kv_cache_memory)} holds no useful context for "
                         f"{max_batch} sequences: raise --kv-cache-memory or lower --max-batch")
    return context, kv_cache_memory


def available_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable; physical memory where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


class QueueFull(Exception):
    """The engine's queue is at max_queue."""
