"""Logit processing as pure functions on (B, V) float32 scores, in the reference's order and semantics.

`process` applies every processor of one step, `choose` picks the tokens and `validate` refuses values
whose math is unsafe; generate() and the server's engine both go through these three.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NEG_INF = -float("inf")
# Below this a temperature turns float32 scores into inf (and the softmax into NaN): sample greedily instead.
MIN_TEMPERATURE = 1e-5
MAX_SEED = 2**63 - 1


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in `seen` (B, T) less likely: divide positive scores, multiply negative ones."""
    if penalty == 1.0:
        return scores
    picked = scores.gather(1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seen, picked)


def suppress(scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Forbid the given token ids (e.g. EOS before min_new_tokens)."""
    token_ids = token_ids.to(scores.device)
    token_ids = token_ids[(token_ids >= 0) & (token_ids < scores.shape[-1])]  # ids past the vocabulary: none to forbid
    return scores.index_fill(-1, token_ids, NEG_INF)  # not isin over the vocabulary: 0.4 ms a step at 100k


def count_penalties(scores: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: counts (B, V) = times each token was generated so far."""
    if not presence and not frequency:
        return scores
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


def temperature(scores: torch.Tensor, t: float) -> torch.Tensor:
    return scores if t == 1.0 else scores / t


def top_k(scores: torch.Tensor, k: int, min_keep: int = 1) -> torch.Tensor:
    """Keep the k highest scores (ties with the k-th kept too)."""
    if not k:
        return scores
    k = min(max(k, min_keep), scores.shape[-1])
    kth = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p(scores: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    if p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -min_keep:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def min_p(scores: torch.Tensor, p: float | None, min_keep: int = 1) -> torch.Tensor:
    """Drop tokens less likely than p times the most likely one."""
    if p is None:
        return scores
    probs = scores.softmax(dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    keep = torch.topk(probs, min(min_keep, probs.shape[-1]), dim=-1).indices
    remove.scatter_(-1, keep, False)
    return scores.masked_fill(remove, NEG_INF)


def process(scores: torch.Tensor, sequences: torch.Tensor, new_tokens: int, options, eos_ids: torch.Tensor,
            min_keep: int = 1, counts: torch.Tensor | None = None) -> torch.Tensor:
    """All processors of one decoding step: penalties and length rules, then (if sampling) the warpers.

    scores (B, V) float32; sequences (B, T) everything so far (prompt included); new_tokens generated so far;
    counts (B, V): generated-token counts, for the presence/frequency penalties (the server's options).
    """
    scores = repetition_penalty(scores, sequences, options.repetition_penalty)
    if counts is not None:
        scores = count_penalties(scores, counts, getattr(options, "presence_penalty", 0.0),
                                 getattr(options, "frequency_penalty", 0.0))
    if len(eos_ids) and (sequences.shape[1] < options.min_length or new_tokens < (options.min_new_tokens or 0)):
        scores = suppress(scores, eos_ids)
    if options.do_sample:
        scores = temperature(scores, options.temperature)
        scores = top_k(scores, options.top_k or 0, min_keep)
        scores = top_p(scores, options.top_p, min_keep)
        scores = min_p(scores, options.min_p, min_keep)
    return scores


def choose(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) processed scores -> (B,) next tokens: the most likely, or drawn from the softmax."""
    if not do_sample:
        return torch.argmax(scores, dim=-1)
    top = scores.amax(dim=-1, keepdim=True)
    if bool(torch.isposinf(top).any()):  # a score past float32 (e.g. repetition_penalty 1e-300): in the limit,
        # the tokens at +inf share the whole mass equally, where the softmax would give NaN
        scores = torch.where(torch.isposinf(top), torch.where(torch.isposinf(scores), 0.0, NEG_INF), scores)
    return torch.multinomial(F.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(1)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(options) -> None:
    """Raise ValueError naming the decoding option whose value cannot work."""
    if options.max_new_tokens is not None and options.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {options.max_new_tokens}")
    if options.do_sample:
        if not (_finite(options.temperature) and options.temperature >= MIN_TEMPERATURE):
            raise ValueError(f"temperature must be >= {MIN_TEMPERATURE} when sampling (0 or do_sample=False is "
                             f"greedy), got {options.temperature!r}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(options, name, 0.0)
        if not (_finite(value) and -2.0 <= value <= 2.0):
            raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
    seed = getattr(options, "seed", None)
    if seed is not None and not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")
    if not (_finite(options.top_p) and 0.0 < options.top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {options.top_p!r}")
    if options.top_k is not None and (not isinstance(options.top_k, int) or options.top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {options.top_k!r}")
    if options.min_p is not None and not (_finite(options.min_p) and 0.0 <= options.min_p <= 1.0):
        raise ValueError(f"min_p must be in [0, 1], got {options.min_p!r}")
    if not (_finite(options.repetition_penalty) and options.repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be > 0, got {options.repetition_penalty!r}")
    if not isinstance(options.num_beams, int) or options.num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {options.num_beams!r}")
    if not isinstance(options.num_return_sequences, int) or options.num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be an integer >= 1, got {options.num_return_sequences!r}")
    if options.num_beams > 1 and options.num_return_sequences > options.num_beams:
        raise ValueError(f"num_return_sequences ({options.num_return_sequences}) cannot exceed num_beams "
                         f"({options.num_beams})")
    if options.num_beams == 1 and options.num_return_sequences > 1 and not options.do_sample:
        raise ValueError("num_return_sequences > 1 needs do_sample=True or num_beams >= num_return_sequences "
                         "(greedy search would return the same sequence each time)")
    if options.early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {options.early_stopping!r}")
