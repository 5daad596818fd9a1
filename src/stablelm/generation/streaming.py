"""Text out of a growing token sequence: one incremental decoder for streamers, generate() and the server.

A piece is handed out as soon as its text is final: never in the middle of a multi-byte character
(the decoder shows an incomplete UTF-8 sequence as U+FFFD, which is held back until completed), and
never the start of what may become a stop string (held back until it is one or cannot be).
"""

from __future__ import annotations

import queue
import sys

import torch


class StopScanner:
    """Where the first stop string occurs in a text, and how much of a text's end could still start one."""

    def __init__(self, strings):
        self.strings = [strings] if isinstance(strings, str) else list(strings or [])
        if not all(isinstance(s, str) and s for s in self.strings):
            raise ValueError(f"stop strings must be non-empty strings, got {strings!r}")

    def __bool__(self) -> bool:
        return bool(self.strings)

    def find(self, text: str, start: int = 0) -> int:
        """Index of the earliest stop string in text[start:] (as an index of text), or -1."""
        hits = [at for at in (text.find(s, start) for s in self.strings) if at != -1]
        return min(hits) if hits else -1

    def held(self, text: str) -> int:
        """Length of the longest end of `text` that is the beginning of a stop string (not yet the whole)."""
        longest = 0
        for stop in self.strings:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest


class IncrementalText:
    """Decodes a token sequence as it grows and hands out the text that is final.

    `add(ids)` -> (new final text, whether a stop string was reached: the text ends before it);
    `flush()` -> whatever is left once the sequence ends.
    """

    def __init__(self, tokenizer, stop=(), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = stop if isinstance(stop, StopScanner) else StopScanner(stop)
        self.skip_special_tokens = skip_special_tokens
        self._tokens: list[int] = []  # since the last line end (decoding stays cheap on long outputs)
        self._sent = 0  # characters of the window's text already handed out
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self._tokens, skip_special_tokens=self.skip_special_tokens)

    def add(self, ids: list[int]) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self._tokens.extend(ids)
        text = self._text()
        at = self.stop.find(text, self._sent) if self.stop else -1
        if at != -1:
            piece, self.stopped = text[self._sent:at], True
            self._tokens, self._sent = [], 0
            return piece, True
        if text.endswith("\ufffd"):
            return "", False  # an incomplete character: wait for its remaining bytes
        end = len(text) - (self.stop.held(text) if self.stop else 0)
        piece = text[self._sent:end]
        if end == len(text) and text.endswith("\n"):
            self._tokens, self._sent = [], 0
        else:
            self._sent = max(self._sent, end)
        return piece, False

    def flush(self) -> str:
        """The rest of the text (up to a stop string), and a fresh start."""
        piece = ""
        if self._tokens and not self.stopped:
            text = self._text()
            at = self.stop.find(text, self._sent) if self.stop else -1
            piece = text[self._sent:at if at != -1 else len(text)]
        self._tokens, self._sent = [], 0
        return piece


class TextStreamer:
    """Decodes tokens incrementally; `on_text` gets each new piece (default: print to stdout)."""

    def __init__(self, tokenizer, skip_prompt: bool = False, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self._text = IncrementalText(tokenizer, skip_special_tokens=skip_special_tokens)
        self._prompt_pending = True

    def put(self, value: torch.Tensor) -> None:
        """Token ids of one row: the prompt (first call) or the newest token."""
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("TextStreamer streams a single sequence (batch size 1)")
            value = value[0]
        if self.skip_prompt and self._prompt_pending:
            self._prompt_pending = False
            return
        self._prompt_pending = False
        piece, _ = self._text.add(value.tolist())
        if piece:
            self.on_text(piece, stream_end=False)

    def end(self) -> None:
        piece = self._text.flush()
        self._prompt_pending = True
        self.on_text(piece, stream_end=True)

    def on_text(self, text: str, stream_end: bool = False) -> None:
        sys.stdout.write(text + ("\n" if stream_end else ""))
        sys.stdout.flush()


class TextIteratorStreamer(TextStreamer):
    """Iterate over the text pieces from another thread: `for piece in streamer: ...`."""

    def __init__(self, tokenizer, skip_prompt: bool = False, timeout: float | None = None, **kwargs):
        super().__init__(tokenizer, skip_prompt, **kwargs)
        self._queue: queue.Queue = queue.Queue()
        self._stop = object()
        self.timeout = timeout

    def on_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._queue.put(text, timeout=self.timeout)
        if stream_end:
            self._queue.put(self._stop, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        value = self._queue.get(timeout=self.timeout)
        if value is self._stop:
            raise StopIteration
        return value
