"""Streamers: receive token ids as generate() produces them and hand out text pieces.

A piece is emitted as soon as its text is final: never in the middle of a multi-byte character
(the decoder shows an incomplete UTF-8 sequence as U+FFFD, which is held back until completed).
"""

from __future__ import annotations

import queue
import sys

import torch


class TextStreamer:
    """Decodes tokens incrementally; `on_text` gets each new piece (default: print to stdout)."""

    def __init__(self, tokenizer, skip_prompt: bool = False, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self._tokens: list[int] = []
        self._printed = 0
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
        self._tokens.extend(value.tolist())
        text = self.tokenizer.decode(self._tokens, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return  # an incomplete character: wait for its remaining bytes
        piece = text[self._printed:]
        if text.endswith("\n"):
            # Restart the window at a line end, so decoding stays cheap on long outputs.
            self._tokens, self._printed = [], 0
        else:
            self._printed = len(text)
        if piece:
            self.on_text(piece, stream_end=False)

    def end(self) -> None:
        if self._tokens:
            text = self.tokenizer.decode(self._tokens, skip_special_tokens=self.skip_special_tokens)
            piece = text[self._printed:]
            self._tokens, self._printed = [], 0
        else:
            piece = ""
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
