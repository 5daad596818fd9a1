"""Continuous batching: one loop runs every active sequence, one forward a round.

Keys and values live in one pool of fixed-size blocks sized by a memory budget (stablelm.serving.paged);
each sequence holds the blocks it has written, and full blocks stay cached by their token prefix, so a
request that repeats an earlier start (a chat's history) prefills only what is new.
Each round is one forward: a decode token for every running sequence and a budget of prompt tokens
(`prefill_chunk`), side by side, so a long prompt does not stall the streams already running. By default
the budget follows the measured cost of a prompt token, so that a round with prompt tokens takes at most
`max_gap` times a round of decode alone (Sarathi-Serve's stall-free batching).
When the pool runs out of blocks, the newest sequence gives its blocks back and is recomputed later.
A finished or cancelled sequence leaves at once. Sampling, stop strings and the text hand-out are
generate()'s own (stablelm.sampling, stablelm.streaming).
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
from ..generation.streaming import IncrementalText, StopScanner
from ..models import parallel
from ..models.cache import kv_heads
from .budget import PrefillBudget
from .paged import BLOCK_SIZE, BlockPool, BlockTable, PagedBatch, Segment

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

    def __init__(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Event], None],
                 cache_namespace: bytes = b""):
        self.serial = next(Request.serials)  # names the request to the other ranks of a tensor-parallel engine
        self.prompt_ids = prompt_ids
        self.cache_namespace = cache_namespace  # prefix-cache blocks are shared only within one (paged.root)
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
    def __init__(self, request: Request, index: int, table: BlockTable, engine: Engine):
        self.request, self.index, self.table = request, index, table
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
    """Tokens whose keys/values must be written before sampling goes on: a new request's prompt, or a
    preempted sequence's prompt and output so far (`sequence` then resumes, nothing is sampled)."""

    request: Request
    ids: list[int]
    table: BlockTable | None = None  # None while waiting for memory
    sequence: _Sequence | None = None

    @property
    def order(self) -> tuple[int, int]:
        return self.request.serial, self.sequence.index if self.sequence is not None else -1

    @property
    def sequences(self) -> int:
        """Batch rows it takes once in: the request's n, or the one preempted sequence."""
        return self.request.params.n if self.sequence is None else 1


class Engine:
    """Owns the model, the block pool and the decode loop (in a background thread).

    Every submitted request ends with a finish event for each of its sequences, whatever happens: a
    failure while admitting or stepping one sequence ends that sequence alone, with an error event.

    A tensor-parallel model (model.tp) runs one engine per rank. Rank 0 takes the requests; at the start of
    each round it tells the others which requests start, which were cancelled and whether to go on, and
    every rank then runs the same admissions and forwards on its slice (`follow` on the other ranks).
    Sampled tokens are rank 0's.
    """

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, max_context: int | None = None,
                 kv_cache_memory: int | None = None, prefix_caching: bool = True,
                 prefill_chunk: int | str | None = "auto", max_gap: float = 1.8, block_size: int = BLOCK_SIZE):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        # Prompt tokens per round, in the same forward as the running sequences' decode step, so a long
        # prompt does not stall them ("auto": as many as keep the round within max_gap decode rounds;
        # None: whole prompts at once).
        self.budget = PrefillBudget(prefill_chunk, max_gap)
        self.prefilling: deque[_Prefill] = deque()
        self.preempted: list[_Prefill] = []  # sequences and prompts that gave their blocks back, oldest first
        self.preemptions = 0
        self.observations: list[tuple[str, float]] = []  # ("queue" | "token_gap", seconds), drained by on_step
        self.vocab_size = model.config.vocab_size
        self.tp = getattr(model, "tp", None)
        # seconds between the rounds an idle rank 0 still sends, well within the collectives' timeout
        self.heartbeat = min(10.0, parallel.collective_timeout() / 3) if self.tp is not None else None
        self.failure: str | None = None  # why the engine stopped by itself (a tensor-parallel rank was lost)
        self.on_failure: Callable[[str], None] | None = None  # the server exits then: it cannot answer any more
        plan = plan_pool(model.config, model.dtype, max_context, kv_cache_memory, kv_heads(model), block_size)
        if self.tp is not None:  # free memory differs between ranks; the plan (and so every decision) must not
            plan = self.tp.share(plan)
        self.context, self.kv_cache_memory, num_blocks = plan
        self.pool = BlockPool.for_model(model, num_blocks, block_size, caching=prefix_caching)
        self.eos = set(model.config.eos_token_ids) | set(
            [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        self.no_eos = torch.empty(0, dtype=torch.long)
        self.waiting: deque[Request] = deque()
        self.active: list[_Sequence] = []  # oldest first; the newest is preempted first
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
        if self._blocks_for(len(ids), request.params.n) > self.pool.num_blocks:
            raise ValueError(f"the prompt's {request.params.n} sequences do not fit the KV cache pool "
                             f"({self.pool.num_blocks} blocks of {self.pool.block_size} tokens)")
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
        return len(self.waiting) + len(self.preempted)

    @property
    def batch_size(self) -> int:
        return len(self.active)

    def idle(self) -> bool:
        return not self.active and not self.waiting and not self.prefilling and not self.preempted

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
        for job in [*self.prefilling, *self.preempted]:
            self._drop(job, message)
        self.prefilling.clear()
        self.preempted.clear()
        for seq in list(self.active):
            self._finish(seq, "error", error=message)
        for request in waiting:
            self._fail(request, message)

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.lock:
                while self.running and self.idle():
                    if not self.lock.wait(timeout=self.heartbeat):
                        break  # a tensor-parallel round with nothing in it
                running = self.running
            starts = self._choose() if running else []
            cancelled = {seq.request.serial for seq in self.active if seq.request.cancelled} | \
                {p.request.serial for p in [*self.prefilling, *self.preempted] if p.request.cancelled}
            budget = self.budget.tokens(decoding=bool(self.active))
            if self.tp is not None:
                try:
                    self.tp.share((running, [(r.serial, r.prompt_ids, r.params, r.cache_namespace) for r in starts],
                                   cancelled, budget))
                except RuntimeError as e:  # another rank is gone or hung past the timeout: nothing can run
                    self.failure = f"a tensor-parallel process stopped or hung ({str(e).splitlines()[0][:200]})"
                    log.error("%s; the engine stops", self.failure)
                    with self.lock:
                        self.running = False
                    self.waiting.extendleft(reversed(starts))
                    self._end_all("a tensor-parallel process of the server stopped")
                    if self.on_failure:
                        self.on_failure(self.failure)
                    return
            if not running:
                return
            self._round(starts, cancelled, budget)
            if self.on_step:
                self.on_step(self)
            self.observations.clear()

    def follow(self) -> None:
        """The loop of a tensor-parallel rank other than 0: run the rounds rank 0 sends until it stops."""
        torch.set_grad_enabled(False)
        while True:
            running, starts, cancelled, budget = self.tp.share()
            if not running:
                return
            self._round([self._mirror(*start) for start in starts], cancelled, budget)

    def _mirror(self, serial: int, prompt_ids: list[int], params: SamplingParams, namespace: bytes) -> Request:
        request = Request(prompt_ids, params, lambda event: None, namespace)  # rank 0 answers the client
        request.serial = serial
        return request

    def _round(self, starts: list[Request], cancelled: set[int], budget: int | None) -> None:
        """Drop `cancelled` requests, take back preempted work and `starts` where memory allows, then one
        forward: a decode step of every running sequence and up to `budget` prompt tokens (None: all)."""
        for seq in [s for s in self.active if s.request.serial in cancelled]:
            self._finish(seq, "cancelled")
        for job in [p for p in [*self.prefilling, *self.preempted] if p.request.serial in cancelled]:
            (self.prefilling if job in self.prefilling else self.preempted).remove(job)
            self._drop(job, None)
        while self.preempted and self._fits(self.preempted[0]):
            self._resume(self.preempted.pop(0))
        for request in starts:
            self.observations.append(("queue", time.perf_counter() - request.submitted))
            self._resume(_Prefill(request, request.prompt_ids))
        if self.active or self.prefilling:
            self._forward(budget)

    def _blocks_for(self, tokens: int, n: int) -> int:
        """Blocks a prompt of `tokens` needs to start its n sequences (each with room for a first token)."""
        size = self.pool.block_size
        return -(-tokens // size) + n

    def _promised(self) -> int:
        """Blocks the prompts in prefill still need."""
        return sum(self._blocks_for(len(job.ids), job.sequences) - len(job.table.blocks) for job in self.prefilling)

    def _rows_free(self) -> int:
        """Batch rows neither running nor promised to a prompt in prefill."""
        return self.max_batch - len(self.active) - sum(job.sequences for job in self.prefilling)

    def _fits(self, job: _Prefill) -> bool:
        return job.sequences <= self._rows_free() and \
            self._blocks_for(len(job.ids), job.sequences) <= self.pool.available - self._promised()

    def _choose(self) -> list[Request]:
        """The waiting requests that start now: in order, while the batch has rows for their n sequences and
        the pool has blocks for their prompts, once every preempted sequence is back."""
        starts = []
        if self.preempted:
            return starts
        rows = self._rows_free()
        blocks = self.pool.available - self._promised()
        with self.lock:
            while self.waiting:
                request = self.waiting[0]
                if request.cancelled:
                    self.waiting.popleft()
                    request.done.set()
                    continue
                n, need = request.params.n, self._blocks_for(len(request.prompt_ids), request.params.n)
                if n > rows or need > blocks:
                    break
                starts.append(self.waiting.popleft())
                rows, blocks = rows - n, blocks - need
        return starts

    def _resume(self, job: _Prefill) -> None:
        """Start prefilling `job`: a block table that begins with the cached blocks of its longest prefix."""
        try:
            namespace = job.request.cache_namespace
            blocks = self.pool.match(job.ids, namespace)
            job.table = BlockTable(self.pool, blocks, job.ids[:len(blocks) * self.pool.block_size], namespace)
            self.prefilling.append(job)
        except Exception as e:  # this request alone ends
            log.exception("admitting a request failed")
            self._drop(job, f"generation failed: {e}")

    def _preempt(self, job_or_seq) -> None:
        """Give back the blocks of a running sequence or a prompt in prefill; it starts again (recomputing
        what it had, most of it from the cached blocks if they are still there) once memory allows."""
        self.preemptions += 1
        if isinstance(job_or_seq, _Sequence):
            seq = job_or_seq
            self.active.remove(seq)
            job = _Prefill(seq.request, seq.request.prompt_ids + seq.tokens[:-1], sequence=seq)
            seq.table.free()
        else:
            job = job_or_seq
            self.prefilling.remove(job)
            job.table.free()
            job.table = None
        self.preempted.append(job)
        self.preempted.sort(key=lambda j: j.order)

    # -- one forward -------------------------------------------------------------------------
    def _forward(self, budget: int | None) -> None:
        """Schedule a decode token for every running sequence (preempting the newest when the pool is
        out of blocks) and prompt chunks within `budget` tokens, and run them as one forward."""
        decode = []
        queue = list(self.active)
        while queue:
            seq = queue.pop(0)
            while seq.table.blocks_needed(1) > self.pool.available:
                victim = queue.pop() if queue else (self.prefilling[-1] if self.prefilling else seq)
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                seq.table.grow(1)
                decode.append(seq)
        chunks = []
        for job in list(self.prefilling):
            if budget == 0:
                break
            table = job.table
            room = len(table.blocks) * self.pool.block_size - len(table) + self.pool.available * self.pool.block_size
            n = min(len(job.ids) - len(table), room, budget if budget is not None else len(job.ids))
            if n == 0:
                break
            table.grow(n)
            chunks.append((job, n))
            budget = None if budget is None else budget - n
        if not decode and not chunks:
            if self.prefilling:  # out of blocks with nothing running: the newest prompt steps back
                self._preempt(self.prefilling[-1])
            return
        try:
            start = time.perf_counter()
            logits = self._run(decode, chunks)
            self.budget.observe(time.perf_counter() - start, len(decode), sum(n for _, n in chunks))
        except Exception as e:
            log.exception("a forward failed; running its parts apart to find which")
            self._isolate(decode, chunks, e)
            return
        self._after(decode, chunks, logits)

    def _run(self, decode: list[_Sequence], chunks: list[tuple[_Prefill, int]]) -> torch.Tensor:
        """One forward over `decode` (one token each) and `chunks`; logits (decode + finishing prompts, V)."""
        segments, ids, keep = [], [], []
        for seq in decode:
            keep.append(len(ids))
            segments.append(Segment(seq.table, len(seq.table), 1))
            ids.append(seq.tokens[-1])
        for job, n in chunks:
            start = len(job.table)
            segments.append(Segment(job.table, start, n))
            ids.extend(job.ids[start:start + n])
            if start + n == len(job.ids) and job.sequence is None:
                keep.append(len(ids) - 1)
        device = self.model.device
        keep = torch.tensor(keep, dtype=torch.long, device=device)
        return forward(self.model, torch.tensor([ids], device=device), PagedBatch(self.pool, segments), keep)

    def _isolate(self, decode, chunks, error: Exception) -> None:
        """After a failed forward: the decode step and each prompt chunk alone, so a failure ends only the
        sequences whose own forward fails."""
        parts = ([(decode, [])] if decode else []) + [([], [chunk]) for chunk in chunks]
        for part_decode, part_chunks in parts:
            if len(parts) > 1:
                try:
                    self._after(part_decode, part_chunks, self._run(part_decode, part_chunks))
                    continue
                except Exception as e:  # noqa: BLE001 - this part alone ends
                    error = e
            for seq in part_decode:
                self._finish(seq, "error", error=f"generation failed: {error}")
            for job, _ in part_chunks:
                self.prefilling.remove(job)
                self._drop(job, f"generation failed: {error}")

    def _after(self, decode, chunks, logits: torch.Tensor) -> None:
        """Record what the forward wrote, sample the decode tokens, start the prompts that are in."""
        self.steps += 1
        for seq in decode:
            seq.table.written([seq.tokens[-1]])
        row = len(decode)
        finished = []
        for job, n in chunks:
            start = len(job.table)
            job.table.written(job.ids[start:start + n])
            if len(job.table) == len(job.ids):
                self.prefilling.remove(job)
                if job.sequence is not None:  # a preempted sequence: its next token is already chosen
                    job.sequence.table = job.table
                    self.active.append(job.sequence)
                else:
                    finished.append((job, logits[row]))
                    row += 1
        for seq, row_logits in zip(decode, logits):
            self._take_or_end(seq, row_logits)
        for job, row_logits in finished:
            self._start(job, row_logits)

    def _start(self, job: _Prefill, logits: torch.Tensor) -> None:
        """The prompt is in `job.table`: its n sequences join the batch and take their first tokens."""
        request = job.request
        tables = [job.table] + [job.table.fork() for _ in range(request.params.n - 1)]
        for index, table in enumerate(tables):
            seq = _Sequence(request, index, table, self)
            request.started += 1
            self.active.append(seq)
            self._take_or_end(seq, logits)

    def _take_or_end(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """`_take`; a failure ends this sequence alone."""
        try:
            self._take(seq, logits)
        except Exception as e:
            log.exception("sampling failed")
            self._finish(seq, "error", error=f"generation failed: {e}")

    def _drop(self, job: _Prefill, message: str | None) -> None:
        """End a prompt in prefill or waiting for memory: give back its blocks; `message` (None: cancelled)."""
        if job.table is not None:
            job.table.free()
            job.table = None
        if job.sequence is not None:  # a preempted sequence: it ends as a running one would
            self._close(job.sequence, "error" if message else "cancelled", error=message)
        elif message is None:
            job.request.done.set()
        else:
            self._fail(job.request, message)

    def _fail(self, request: Request, message: str) -> None:
        """End the sequences of `request` that never started, with an error event each."""
        for index in range(request.started, request.params.n):
            _send(request, Event(index, message, finish_reason="error"))
            request.unfinished -= 1
        request.started = request.params.n
        if request.unfinished <= 0:
            request.done.set()

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
        elif len(seq.tokens) >= params.max_tokens or len(seq.table) + 1 >= self.context:
            self._emit(seq, piece + seq.text.flush())
            self._finish(seq, "length")
        else:
            self._emit(seq, piece)

    def _emit(self, seq: _Sequence, piece: str) -> None:
        if piece or seq.pending_logprobs:
            _send(seq.request, Event(seq.index, piece, seq.pending_logprobs, completion_tokens=len(seq.tokens)))
            seq.pending_logprobs = []

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        """Leave the batch now; its full blocks stay cached for requests that repeat its tokens."""
        if seq not in self.active:
            return
        self.active.remove(seq)
        seq.table.free()
        self._close(seq, reason, error)

    def _close(self, seq: _Sequence, reason: str, error: str | None) -> None:
        """Hand out a sequence's last event and count it off its request."""
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
def forward(model, ids: torch.Tensor, batch: PagedBatch, keep: torch.Tensor) -> torch.Tensor:
    """One forward of the scheduled tokens `ids` (1, T) through the pool; logits (len(keep), V) of the
    tokens at the indices `keep`."""
    return model(ids, past_key_values=batch, logits_to_keep=keep).logits[0].float()


def _send(request: Request, event: Event) -> None:
    """Hand an event to the request's client; a client that is gone must not stop the engine."""
    try:
        request.emit(event)
    except Exception:
        log.debug("could not deliver an event", exc_info=True)


def plan_pool(config, dtype: torch.dtype, max_context: int | None, kv_cache_memory: int | None,
              kv_heads: int | None = None, block_size: int = BLOCK_SIZE) -> tuple[int, int, int]:
    """(context, budget in bytes, blocks) for a block pool that fits the memory budget.

    The budget (per process) defaults to a quarter of the memory available now, shared by the processes
    of this machine. The context is the model's, or `max_context`, and at most what the pool holds; a
    `max_context` the pool cannot hold is an error naming both numbers. kv_heads: the heads this process
    caches.
    """
    if kv_cache_memory is None:
        kv_cache_memory = available_memory() // 4 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    per_token = kv_bytes_per_token(config, dtype, kv_heads)
    blocks = kv_cache_memory // (per_token * block_size)
    pool_tokens = blocks * block_size
    context = min(config.max_position_embeddings, max_context or config.max_position_embeddings)
    if max_context is not None and context > pool_tokens:
        raise ValueError(f"one sequence of {context} tokens needs {_gib(per_token * context)} of KV cache, over "
                         f"the budget of {_gib(kv_cache_memory)}: lower --max-context or raise --kv-cache-memory")
    context = min(context, pool_tokens)
    if context < 2:
        raise ValueError(f"the KV cache budget of {_gib(kv_cache_memory)} holds no useful context "
                         f"({per_token} bytes a token): raise --kv-cache-memory")
    return context, kv_cache_memory, blocks


def kv_bytes_per_token(config, dtype: torch.dtype, kv_heads: int | None = None) -> int:
    """Bytes of keys and values one token takes over every layer (kv_heads: those this process caches)."""
    kv_heads = config.num_key_value_heads if kv_heads is None else kv_heads
    return 2 * config.num_hidden_layers * kv_heads * config.head_dim * dtype.itemsize


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
