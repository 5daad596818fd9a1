"""A preallocated KV cache owned by the caller, whose rows may sit at different positions.

Each row b has written `lengths[b]` slots; slot j holds a real token iff `valid[b, j]` (left padding
and holes are written but masked). Rows can be reset and refilled independently, which is what a
continuously batched server needs: a finished sequence leaves its row, a new one takes it.
"""

from __future__ import annotations

import math

import torch

from .. import kernels


class KVCache:
    """Keys (after RoPE) and values for every layer: `keys[layer]` is (B, H_kv, capacity, D)."""

    paged = False  # the serving engine's block pool (stablelm.serving.paged) is the paged kind
    one_token = False  # this forward is one token per row, rows aligned, no holes: `attend_one` serves it

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.lengths = [0] * batch_size
        # True once any written slot is masked: attention then needs an explicit mask.
        self.has_holes = False
        self._write_start: list[int] = []
        self._write_len = 0

    @classmethod
    def for_model(cls, model, batch_size: int, capacity: int) -> KVCache:
        """A cache shaped for `model` (a StableLm* module), on its device and in its dtype."""
        config = model.config
        param = next(model.parameters())  # the embedding: the activations' dtype and device
        return cls(config.num_hidden_layers, batch_size, kv_heads(model), config.head_dim,
                   capacity, dtype=param.dtype, device=param.device)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def get_seq_length(self) -> int:
        """Slots used by the longest row (the reference's past length when rows are aligned)."""
        return max(self.lengths, default=0)

    @property
    def aligned(self) -> bool:
        return len(set(self.lengths)) <= 1

    # -- the forward pass's protocol: reserve once, write per layer ----------------------------
    def reserve(self, num_tokens: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Claim `num_tokens` slots per row for the tokens of this forward; returns their slots (B, S).

        attention_mask (B, past + S) or (B, S): 0 marks a padding token (written, never attended to).
        """
        start = list(self.lengths)
        needed = max(start) + num_tokens
        if needed > self.capacity:
            self._grow(max(needed, 2 * self.capacity))
        device = self.valid.device
        new_mask = None if attention_mask is None else attention_mask[:, -num_tokens:].to(device=device, dtype=torch.bool)
        if new_mask is not None and not bool(new_mask.all()):
            self.has_holes = True
        if len(set(start)) == 1:  # aligned rows: plain slices, no index tensors
            slots = torch.arange(start[0], start[0] + num_tokens, device=device).expand(self.batch_size, num_tokens)
            self.valid[:, start[0]:start[0] + num_tokens] = True if new_mask is None else new_mask
        else:
            slots = torch.tensor(start, device=device)[:, None] + torch.arange(num_tokens, device=device)
            rows = torch.arange(self.batch_size, device=device)[:, None]
            self.valid[rows, slots] = True if new_mask is None else new_mask
        self._write_start, self._write_len = start, num_tokens
        self._write_index = None if len(set(start)) == 1 or num_tokens != 1 else torch.tensor(start, device=device)
        self.lengths = [s + num_tokens for s in start]
        isa = kernels.native_isa() if (num_tokens == 1 and len(set(start)) == 1 and not self.has_holes
                                       and device.type == "cpu") else None
        self.one_token, self._isa = isa is not None, min(isa or 0, 1)  # the attention kernel's top level is AVX2
        return slots

    def attend_one(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor | None:
        """Decoding (`one_token`: one token per row, rows aligned, no holes) in one native call per row:
        store each row's key/value in its slot of `layer` and attend to every written slot of that row. With
        cos/sin (B, 1, r), query and key are the projections' output before RoPE and are rotated first, exactly
        as `apply_rotary` rounds; without, they are rotated already. Takes any shape whose first dim is the
        batch and that holds, per row, one token's H (query) or H_kv (key, value) heads of D; returns (B, 1, H * D).
        None when a row's tensor is not contiguous in the cache's dtype: the caller then takes the general
        path. (SDPA's one-query path costs ~120 us a layer at batch 1 and ~1 ms at batch 8 on a short
        context, mostly overhead.)"""
        k_buf, v_buf = self.keys[layer], self.values[layer]
        unrotated = (k_buf.new_empty(0),) * 2 if cos is None else None  # nothing left to rotate
        rows = [(query[b], key[b], value[b]) + (unrotated or (cos[b], sin[b])) for b in range(self.batch_size)]
        if any(t.dtype != k_buf.dtype or not t.is_contiguous() for row in rows for t in row):
            return None
        slot, scale = self.lengths[0] - 1, 1.0 / math.sqrt(k_buf.shape[-1])
        out = [torch.ops.stablelm_kernels.decode_attention(q, k, v, c, s, k_buf[b], v_buf[b], slot, scale, self._isa)
               for b, (q, k, v, c, s) in enumerate(rows)]
        return out[0].view(1, 1, -1) if len(out) == 1 else torch.stack(out).view(len(out), 1, -1)

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's key/value (B, H_kv, S, D) for `layer`; return all keys/values so far."""
        k_buf, v_buf = self.keys[layer], self.values[layer]
        start, s = self._write_start, self._write_len
        if len(set(start)) == 1:
            k_buf[:, :, start[0]:start[0] + s] = key
            v_buf[:, :, start[0]:start[0] + s] = value
        elif self._write_index is not None:  # one token per row, rows at different slots
            rows = torch.arange(len(start), device=key.device)
            k_buf[rows, :, self._write_index] = key[:, :, 0]
            v_buf[rows, :, self._write_index] = value[:, :, 0]
        else:
            for b, pos in enumerate(start):
                k_buf[b, :, pos:pos + s] = key[b]
                v_buf[b, :, pos:pos + s] = value[b]
        end = max(self.lengths)
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def key_mask(self) -> torch.Tensor:
        """(B, T) bool: which of the used slots hold real tokens."""
        return self.valid[:, :max(self.lengths)]

    # -- row management ----------------------------------------------------------------------
    def reset_rows(self, rows: list[int] | None = None) -> None:
        """Forget rows (all by default), so new sequences can take them."""
        rows = range(self.batch_size) if rows is None else rows
        for b in rows:
            self.lengths[b] = 0
            self.valid[b] = False
        if all(n == 0 for n in self.lengths):
            self.has_holes = False

    def narrow(self, rows: int) -> KVCache:
        """A cache over the first `rows` rows that shares this one's storage (see `absorb`)."""
        view = KVCache.__new__(KVCache)
        view.keys = [k[:rows] for k in self.keys]
        view.values = [v[:rows] for v in self.values]
        view.valid = self.valid[:rows]
        view.lengths = self.lengths[:rows]
        view.has_holes = self.has_holes
        view._write_start, view._write_len, view._write_index = [], 0, None
        return view

    def absorb(self, view: KVCache) -> None:
        """Take back the row lengths of a `narrow` view after a forward through it."""
        self.lengths[:len(view.lengths)] = view.lengths
        self.has_holes |= view.has_holes

    def copy_row(self, dst: int, source: KVCache, src: int) -> None:
        """Put row `src` of `source` (same layers and heads) into row `dst` of this cache."""
        n = source.lengths[src]
        if n > self.capacity:
            raise ValueError(f"a row of {n} tokens does not fit a cache of capacity {self.capacity}")
        for layer in range(len(self.keys)):
            self.keys[layer][dst, :, :n] = source.keys[layer][src, :, :n]
            self.values[layer][dst, :, :n] = source.values[layer][src, :, :n]
        self.valid[dst] = False
        self.valid[dst, :n] = source.valid[src, :n]
        self.lengths[dst] = n
        self.has_holes |= source.has_holes

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder rows (beam search): row b becomes old row index[b]."""
        index = index.to(self.valid.device)
        for layer in range(len(self.keys)):
            self.keys[layer] = self.keys[layer].index_select(0, index)
            self.values[layer] = self.values[layer].index_select(0, index)
        self.valid = self.valid.index_select(0, index)
        self.lengths = [self.lengths[i] for i in index.tolist()]

    def _grow(self, capacity: int) -> None:
        for layer in range(len(self.keys)):
            for bufs in (self.keys, self.values):
                old = bufs[layer]
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, :old.shape[2]] = old
                bufs[layer] = new
        valid = self.valid.new_zeros(self.valid.shape[0], capacity)
        valid[:, :self.valid.shape[1]] = self.valid
        self.valid = valid


def kv_heads(model) -> int:
    """The kv heads this process caches: all of them, or its own under tensor parallelism."""
    backbone = model.model if hasattr(model, "model") else model
    return backbone.layers[0].self_attn.num_kv_heads if len(backbone.layers) else model.config.num_key_value_heads
