"""How many prompt tokens an engine round may carry beside the running streams' decode step.

A round's forward costs about `decode + fixed + per_token * tokens`: the decode step, the keys/values of the
prompts' earlier chunks read again (it grows with the prompt), and the new tokens themselves. The "auto"
budget fits the last rounds' times to that line and takes as many tokens as keep a round within `max_gap`
decode-only rounds, so the streams' inter-token gap stays bounded while a long prompt is prefilled
(Sarathi-Serve's stall-free batching, with the token budget measured instead of profiled offline).
"""

from __future__ import annotations

from collections import deque


class PrefillBudget:
    LIMIT = 512  # prompt tokens a round at most (its activations stay small)
    FIRST = 8  # before any round with prompt tokens has been timed
    SAMPLES = 12  # recent rounds the fit uses: the fixed cost drifts as a prompt grows
    TRUSTED = 4  # rounds timed before the fit is used

    def __init__(self, chunk: int | str | None = "auto", max_gap: float = 1.8):
        if chunk not in (None, "auto") and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise ValueError(f"prefill_chunk must be a positive integer, 'auto' or None, got {chunk!r}")
        if not (isinstance(max_gap, (int, float)) and max_gap > 1):
            raise ValueError(f"max_gap must be above 1, got {max_gap!r}")
        self.chunk, self.max_gap = chunk, max_gap
        self.decode_seconds: float | None = None  # moving average of a decode-only round
        self.samples: deque[tuple[int, float]] = deque(maxlen=self.SAMPLES)  # (prompt tokens, extra seconds)
        self.rounds = 0

    def tokens(self, decoding: bool) -> int | None:
        """The next round's prompt tokens (None: all); `decoding`: streams are running."""
        if self.chunk != "auto":
            return self.chunk
        if not decoding or self.decode_seconds is None:  # no stream to stall
            return self.LIMIT
        if len(self.samples) < self.TRUSTED:
            return self.FIRST
        fixed, per_token = self.fit()
        tokens = ((self.max_gap - 1) * self.decode_seconds - fixed) / per_token
        tokens = min(tokens, 2 * max(c for c, _ in self.samples))  # a noisy fit may not jump far past what was timed
        self.rounds += 1
        if self.rounds % 2:  # every other round a quarter fewer: spread for the fit, never past the bound
            tokens *= 0.75
        return max(1, min(self.LIMIT, int(tokens)))

    def fit(self) -> tuple[float, float]:
        """(fixed, per-token) seconds a round's prompt tokens add, least squares over the recent rounds."""
        n = len(self.samples)
        mean_c = sum(c for c, _ in self.samples) / n
        mean_e = sum(e for _, e in self.samples) / n
        spread = sum((c - mean_c) ** 2 for c, _ in self.samples)
        per_token = sum((c - mean_c) * (e - mean_e) for c, e in self.samples) / spread if spread > 0 else 0.0
        fixed = mean_e - per_token * mean_c
        if per_token <= 0 or fixed < 0:  # too little spread or noise: all of it per token (the cautious side)
            return 0.0, max(mean_e / mean_c, 1e-6)
        return fixed, per_token

    def observe(self, seconds: float, decode_rows: int, prompt_tokens: int) -> None:
        """One forward's time, with `decode_rows` decode tokens and `prompt_tokens` prompt tokens."""
        if prompt_tokens == 0:
            self.decode_seconds = seconds if self.decode_seconds is None else \
                0.7 * self.decode_seconds + 0.3 * seconds
        elif decode_rows and self.decode_seconds is not None:
            self.samples.append((prompt_tokens, max(seconds - self.decode_seconds, 0.0)))
