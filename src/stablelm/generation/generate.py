"""Text generation: greedy, sampling and beam search over a preallocated KV cache.

`prefill` and `decode_step` are small free functions that a server can drive directly; `generate`
composes them into the reference's `model.generate` (same options, same tokens).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..models.cache import KVCache
from . import sampling
from ..models.generation_config import GenerationConfig
from .streaming import StopScanner


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token = count of real tokens before it (padding gets 0), (B, S)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompt through the model into `cache`; returns next-token logits (B, V) in float32."""
    out = model(input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask),
                past_key_values=cache, logits_to_keep=1)
    return out.logits[:, -1].float()


@torch.inference_mode()
def decode_step(model, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Feed one token per row (B,) at `positions` (B,); returns next-token logits (B, V) in float32."""
    out = model(tokens[:, None], attention_mask=attention_mask, position_ids=positions[:, None],
                past_key_values=cache)
    return out.logits[:, -1].float()


def resolve_options(model, generation_config: GenerationConfig | None, options: dict) -> GenerationConfig:
    """The model's generation_config (or the one given), overridden by the call's options, validated."""
    base = generation_config or getattr(model, "generation_config", None) or GenerationConfig()
    gc = base.updated(**options)
    sampling.validate(gc)
    if gc.pad_token_id is None and gc.eos_token_id is not None:
        eos = gc.eos_token_id
        gc = gc.updated(pad_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos)
    return gc


def generate(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
             generation_config: GenerationConfig | None = None, streamer=None, tokenizer=None,
             **options) -> torch.LongTensor:
    """Continue each prompt row; returns (B * num_return_sequences, prompt + new) token ids.

    Rows that finish early are filled with pad_token_id, as in the reference. Options are the
    GenerationConfig fields (max_new_tokens, do_sample, temperature, top_k, top_p, min_p,
    repetition_penalty, num_beams, length_penalty, early_stopping, num_return_sequences,
    eos_token_id, pad_token_id, stop_strings, min_new_tokens, ...).
    """
    if isinstance(input_ids, dict):  # a BatchEncoding, e.g. from apply_chat_template
        attention_mask = input_ids.get("attention_mask", attention_mask)
        input_ids = input_ids["input_ids"]
    if input_ids is None:
        raise ValueError("generate needs input_ids (B, S)")
    # Our cache is always static and preallocated: these reference switches have nothing to change.
    for ignored in ("use_cache", "cache_implementation", "return_dict_in_generate"):
        if ignored == "return_dict_in_generate" and options.get(ignored):
            raise ValueError("return_dict_in_generate=True is not supported: generate returns the token ids")
        options.pop(ignored, None)
    gc = resolve_options(model, generation_config, options)
    if options.get("max_length") is not None and gc.max_new_tokens is not None:
        warnings.warn(f"Both `max_new_tokens` (={gc.max_new_tokens}) and `max_length`(={gc.max_length}) seem to have "
                      "been set. `max_new_tokens` will take precedence.", stacklevel=3)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    device = model.device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                         f"{tuple(input_ids.shape)}")
    prompt_len = input_ids.shape[1]
    config = model.config
    if prompt_len > config.max_position_embeddings and config.rope_scaling is None:
        raise ValueError(f"the prompt has {prompt_len} tokens, past the model's context of "
                         f"{config.max_position_embeddings} (max_position_embeddings) and the model has no rope scaling")
    max_length = prompt_len + gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length
    if max_length > config.max_position_embeddings and config.rope_scaling is None:
        warnings.warn(f"generating up to {max_length} tokens, past the model's context of "
                      f"{config.max_position_embeddings} (max_position_embeddings): the text after it may degrade",
                      stacklevel=3)
    if max_length <= prompt_len:
        if gc.max_new_tokens == 0:
            return input_ids
        # The reference warns and still generates one token (its length check runs after each token).
        warnings.warn(f"Input length of input_ids is {prompt_len}, but `max_length` is set to {max_length}. "
                      "This can lead to unexpected behavior. You should consider increasing `max_length` or, "
                      "better yet, setting `max_new_tokens`.", stacklevel=3)
        max_length = prompt_len + 1
    if attention_mask.shape[0] > 1 and not bool(attention_mask[:, -1].all()):
        warnings.warn("A decoder-only architecture is being used, but right-padding was detected! For correct "
                      "generation results, please set `padding_side='left'` when initializing the tokenizer.",
                      stacklevel=3)
    if gc.stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer: generate(..., stop_strings=..., tokenizer=tok)")
    eos = torch.tensor(gc.eos_token_id if isinstance(gc.eos_token_id, (list, tuple)) else
                       ([] if gc.eos_token_id is None else [gc.eos_token_id]), dtype=torch.long, device=device)
    stops = StopStrings(gc.stop_strings, tokenizer, prompt_len) if gc.stop_strings else None
    if gc.num_beams > 1:
        if streamer is not None:
            raise ValueError("streaming is not supported with beam search (num_beams > 1)")
        return _beam_search(model, input_ids, attention_mask, gc, max_length, eos, stops)
    if gc.num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(gc.num_return_sequences, dim=0)
        attention_mask = attention_mask.repeat_interleave(gc.num_return_sequences, dim=0)
    return _sample(model, input_ids, attention_mask, gc, max_length, eos, stops, streamer)


class StopStrings:
    """Stops a row once its generated text contains one of the stop strings."""

    def __init__(self, stop_strings: str | list[str], tokenizer, prompt_len: int):
        self.scanner = StopScanner(stop_strings)
        self.tokenizer, self.prompt_len = tokenizer, prompt_len
        # A stop string spans at most this many tokens (every token decodes to at least one byte).
        self.window = max(len(s.encode("utf-8")) for s in self.scanner.strings) + 1

    def __call__(self, sequences: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B,) bool: the newest token completed a stop string."""
        done = []
        for row in sequences[:, self.prompt_len:].tolist():
            text = self.tokenizer.decode(row[-self.window:])
            prev = self.tokenizer.decode(row[-self.window:-1])
            done.append(self.scanner.find(text) != -1 and self.scanner.find(prev) == -1)
        return torch.tensor(done, device=sequences.device)


def _stopped(sequences: torch.Tensor, eos: torch.Tensor, max_length: int, stops: StopStrings | None) -> torch.Tensor:
    """(B,) bool: rows whose last token ends them (EOS, stop string) or that reached max_length."""
    hit = torch.isin(sequences[:, -1], eos) if len(eos) else torch.zeros(len(sequences), dtype=torch.bool,
                                                                           device=sequences.device)
    if sequences.shape[1] >= max_length:
        hit = torch.ones_like(hit)
    if stops is not None:
        hit |= stops(sequences)
    return hit


@torch.inference_mode()
def _sample(model, input_ids, attention_mask, gc: GenerationConfig, max_length: int, eos, stops, streamer):
    batch, prompt_len = input_ids.shape
    cache = KVCache.for_model(model, batch, max_length)
    # Preallocated once: the decode loop only writes into these, whatever the length.
    sequences = input_ids.new_empty(batch, max_length)
    sequences[:, :prompt_len] = input_ids
    mask = attention_mask.new_ones(batch, max_length)
    mask[:, :prompt_len] = attention_mask
    if streamer is not None:
        streamer.put(input_ids.cpu())
    logits = prefill(model, input_ids, attention_mask, cache)
    positions = positions_from_mask(attention_mask)[:, -1]
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    length = prompt_len
    while True:
        scores = sampling.process(logits, sequences[:, :length], length - prompt_len, gc, eos)
        tokens = sampling.choose(scores, gc.do_sample)
        if gc.do_sample and getattr(model, "tp", None) is not None:  # the ranks' random numbers differ
            tokens = model.tp.agree(tokens)
        if len(eos):
            tokens = torch.where(unfinished, tokens, gc.pad_token_id)
        sequences[:, length] = tokens
        length += 1
        if streamer is not None:
            streamer.put(tokens.cpu())
        unfinished &= ~_stopped(sequences[:, :length], eos, max_length, stops)
        if not unfinished.any():
            break
        positions = positions + 1
        logits = decode_step(model, tokens, positions, cache, mask[:, :length] if cache.has_holes else None)
    if streamer is not None:
        streamer.end()
    return sequences[:, :length]


@torch.inference_mode()
def _beam_search(model, input_ids, attention_mask, gc: GenerationConfig, max_length: int, eos, stops):
    """Vectorised beam search with the reference's scoring, early stopping and length penalty."""
    batch, prompt_len = input_ids.shape
    beams = gc.num_beams
    keep = max(2, 1 + len(eos)) * beams  # candidates per step, so `beams` survive any EOS hits
    device = input_ids.device
    # The reference fills with `pad or eos[0]`: a pad id of 0 counts as unset there, and so here.
    fill = (gc.pad_token_id or int(eos[0])) if len(eos) else -1
    running = torch.full((batch, beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = input_ids[:, None]
    finished = running.clone()
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = -1e9
    finished_scores = torch.full((batch, beams), -1e9, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    hits = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    running_parents = torch.full((batch, beams, max_length - prompt_len), -1, dtype=torch.long, device=device)
    finished_parents = running_parents.clone()
    top_beam_mask = torch.arange(keep, device=device) < beams

    flat_mask = attention_mask.repeat_interleave(beams, dim=0)
    cache = KVCache.for_model(model, batch * beams, max_length)
    logits = prefill(model, input_ids.repeat_interleave(beams, dim=0), flat_mask, cache)
    positions = positions_from_mask(flat_mask)[:, -1]
    cur_len = prompt_len
    lp, early = gc.length_penalty, gc.early_stopping
    batch_offset = torch.arange(batch, device=device)[:, None] * beams
    while True:
        flat_seqs = running[:, :, :cur_len].reshape(batch * beams, cur_len)
        log_probs = F.log_softmax(logits, dim=-1)
        log_probs = sampling.process(log_probs, flat_seqs, cur_len - prompt_len, gc, eos, min_keep=len(eos) + 1)
        vocab = log_probs.shape[-1]
        log_probs = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, beams * vocab)
        if gc.do_sample:
            idx = torch.multinomial(F.softmax(log_probs, dim=-1), num_samples=keep)
            top_lp = log_probs.gather(1, idx)
            top_lp, order = top_lp.sort(dim=-1, descending=True)
            idx = idx.gather(1, order)
        else:
            top_lp, idx = torch.topk(log_probs, keep)
        parent = idx // vocab  # (B, keep)
        cand = _gather(running, parent)
        cand[:, :, cur_len] = idx % vocab
        cand_parents = _gather(running_parents, parent)
        cand_parents[:, :, cur_len - prompt_len] = parent + batch_offset
        hits = _stopped(cand[:, :, :cur_len + 1].reshape(batch * keep, -1), eos, max_length, stops).view(batch, keep)

        # The best `beams` candidates that did not stop keep running.
        alive_lp = top_lp + hits.float() * -1e9
        nxt = torch.topk(alive_lp, beams).indices
        running, running_scores = _gather(cand, nxt), _gather(alive_lp, nxt)
        running_parents = _gather(cand_parents, nxt)

        # Candidates among the top `beams` that stopped compete for the finished slots.
        just_done = hits & top_beam_mask[None]
        done_lp = top_lp / ((cur_len + 1 - prompt_len) ** lp)
        full = is_finished.all(dim=-1, keepdim=True) & (early is True)
        done_lp = done_lp + full.float() * -1e9 + (~improvable).float() * -1e9 + (~just_done).float() * -1e9
        merged_scores = torch.cat([finished_scores, done_lp], dim=1)
        best = torch.topk(merged_scores, beams).indices
        finished = _gather(torch.cat([finished, cand], dim=1), best)
        finished_scores = _gather(merged_scores, best)
        finished_parents = _gather(torch.cat([finished_parents, cand_parents], dim=1), best)
        is_finished = _gather(torch.cat([is_finished, just_done], dim=1), best)

        cache.reorder(running_parents[:, :, cur_len - prompt_len].reshape(-1))
        cur_len += 1
        # Could a running beam still beat the worst finished one?
        length = (max_length if early == "never" and lp > 0 else cur_len) - prompt_len
        best_possible = running_scores[:, :1] / (length ** lp)
        worst_done = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, -1e9)
        improvable = improvable & (best_possible > worst_done).any(dim=-1, keepdim=True)
        open_beams = not (bool(is_finished.all()) and early is True)
        if not (bool(improvable.any()) and open_beams and not bool(hits.all())):
            break
        positions = positions + 1
        step_mask = torch.cat([flat_mask, flat_mask.new_ones(len(flat_mask), cur_len - prompt_len)], dim=-1)
        logits = decode_step(model, running[:, :, cur_len - 1].reshape(-1), positions, cache,
                             step_mask if cache.has_holes else None)

    n = gc.num_return_sequences
    out = finished[:, :n].reshape(batch * n, max_length)
    parents = finished_parents[:, :n].reshape(batch * n, -1)
    generated = int((parents >= 0).sum(dim=1).max())
    return out[:, :prompt_len + generated]


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, N, ...) gathered along dim 1 by index (B, K) -> (B, K, ...)."""
    expand = index.view(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:])
    return t.gather(1, expand)

