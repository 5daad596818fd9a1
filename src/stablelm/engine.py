"""Continuous batching: one loop runs decode steps over every active sequence.

A request is prefilled alone into a scratch cache, copied into free rows of the shared cache (one per
`n`), and joins the running batch at the next step. A finished or cancelled sequence leaves at once:
the last active row moves into its place, so the active rows are always 0..k-1 and each decode step
is one forward over exactly those rows.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .cache import KVCache
from .generation import decode_step, prefill


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the top k


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

    def __init__(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[Event], None]):
        self.prompt_ids = prompt_ids
        self.params = params
        self.emit = emit
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.done = threading.Event()
        self.unfinished = params.n

    def cancel(self) -> None:
        self.cancelled = True


class _Sequence:
    def __init__(self, request: Request, index: int, row: int, vocab: int, device):
        self.request, self.index, self.row = request, index, row
        self.tokens: list[int] = []
        self.sent = 0  # characters of text already emitted
        self.pending_logprobs: list[dict] = []
        params = request.params
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed + index)
        self.counts = torch.zeros(vocab, device=device) if (params.presence_penalty or params.frequency_penalty) \
            else None


class Engine:
    """Owns the model, the shared cache and the decode loop (in a background thread)."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64, max_context: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = min(max_context or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.cache = KVCache.for_model(model, max_batch, self.context)
        self.eos = set(model.config.eos_token_ids) | set(
            [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        self.waiting: deque[Request] = deque()
        self.active: list[_Sequence] = []  # active[i].row == i
        self.lock = threading.Condition()
        self.running = True
        self.steps = 0
        self.on_step: Callable[[int, int], None] | None = None  # (batch size, queue depth) after each step
        self.thread = threading.Thread(target=self._loop, name="stablelm-engine", daemon=True)
        self.thread.start()

    # -- the API side ------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; raises QueueFull when the queue is at max_queue."""
        with self.lock:
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
        return not self.active and not self.waiting

    def shutdown(self) -> None:
        with self.lock:
            self.running = False
            self.lock.notify()
        self.thread.join(timeout=10)

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.lock:
                while self.running and not self.waiting and not self.active:
                    self.lock.wait()
                if not self.running:
                    return
            try:
                self._admit()
                self._drop_cancelled()
                if self.active:
                    self._step()
            except Exception as e:  # never let one bad step kill the server: fail the affected requests
                for seq in list(self.active):
                    self._finish(seq, "error", error=str(e))
            if self.on_step:
                self.on_step(len(self.active), len(self.waiting))

    def _admit(self) -> None:
        while True:
            with self.lock:
                if not self.waiting or self.max_batch - len(self.active) < self.waiting[0].params.n:
                    return
                request = self.waiting.popleft()
            if request.cancelled:
                request.done.set()
                continue
            try:
                ids = torch.tensor([request.prompt_ids], device=self.model.device)
                scratch = KVCache.for_model(self.model, 1, ids.shape[1])
                logits = prefill(self.model, ids, torch.ones_like(ids), scratch)[0]
            except Exception as e:
                for index in range(request.params.n):
                    request.emit(Event(index, str(e), finish_reason="error"))
                request.done.set()
                continue
            for index in range(request.params.n):
                row = len(self.active)
                self.cache.copy_row(row, scratch, 0)
                seq = _Sequence(request, index, row, logits.shape[-1], logits.device)
                self.active.append(seq)
                self._take(seq, logits)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.active if s.request.cancelled]:
            self._finish(seq, "cancelled")

    def _step(self) -> None:
        rows = len(self.active)
        tokens = torch.tensor([s.tokens[-1] for s in self.active], device=self.model.device)
        positions = torch.tensor([self.cache.lengths[i] for i in range(rows)], device=self.model.device)
        view = self.cache.narrow(rows)
        logits = decode_step(self.model, tokens, positions, view)
        self.cache.absorb(view)
        self.steps += 1
        for seq, row_logits in zip(list(self.active), logits):
            self._take(seq, row_logits)

    # -- one sequence ------------------------------------------------------------------------
    def _take(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Choose the next token of `seq` from its logits (V,), emit text, finish if done."""
        params = seq.request.params
        scores = logits.float()
        if seq.counts is not None:
            scores = scores - params.frequency_penalty * seq.counts - params.presence_penalty * (seq.counts > 0)
        if params.temperature == 0:
            token = int(scores.argmax())
        else:
            scores = scores / params.temperature
            if params.top_p < 1.0:
                sorted_scores, order = torch.sort(scores, descending=False)
                remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - params.top_p
                remove[-1] = False
                scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
            token = int(torch.multinomial(F.softmax(scores, dim=-1), 1, generator=seq.generator))
        if seq.counts is not None:
            seq.counts[token] += 1
        if params.logprobs is not None:
            seq.pending_logprobs.append(self._logprobs(logits, token, params.logprobs))
        request = seq.request
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        if token in self.eos:
            self._emit(seq, self.tokenizer.decode(seq.tokens, skip_special_tokens=True), final=True)
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        for stop in params.stop:
            at = text.find(stop)
            if at != -1:
                self._emit(seq, text[:at], final=True)
                self._finish(seq, "stop")
                return
        if len(seq.tokens) >= params.max_tokens or self.cache.lengths[seq.row] + 1 >= self.context:
            self._emit(seq, text, final=True)
            self._finish(seq, "length")
            return
        self._emit(seq, text, final=False)

    def _emit(self, seq: _Sequence, text: str, final: bool) -> None:
        """Send the new part of `text`, holding back an incomplete character or a possible stop prefix."""
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                return
            for stop in seq.request.params.stop:
                for k in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:k]):
                        end = min(end, len(text) - k)
                        break
        if end > seq.sent or seq.pending_logprobs:
            seq.request.emit(Event(seq.index, text[seq.sent:end], seq.pending_logprobs,
                                   completion_tokens=len(seq.tokens)))
            seq.sent = max(seq.sent, end)
            seq.pending_logprobs = []

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        """Leave the batch now: free the row by moving the last active row into it."""
        last = self.active[-1]
        if last is not seq:
            self.cache.copy_row(seq.row, self.cache, last.row)
            last.row = seq.row
            self.active[seq.row] = last
        self.active.pop()
        self.cache.reset_rows([len(self.active)])
        request = seq.request
        if reason != "cancelled":
            request.emit(Event(seq.index, "" if error is None else error, seq.pending_logprobs,
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


class QueueFull(Exception):
    """The engine's queue is at max_queue."""

