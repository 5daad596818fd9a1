"""The serving engine's KV cache: fixed-size blocks from one pool, shared by prefix, evicted LRU.

Every sequence holds a list of blocks (its block table); token position p lives in slot
`blocks[p // block_size] * block_size + p % block_size` of every layer's pool tensor. A block whose
`block_size` tokens are all written is registered under a digest of every token up to its end (a hash
chain), so a later request that starts with the same tokens takes the block instead of prefilling it
again, whether the sequence that wrote it is still running or has finished. Blocks nobody holds stay
cached until the pool needs them, least recently used first.

One forward runs every scheduled sequence at once, their tokens side by side in one row
(`PagedBatch`): one decode token per running sequence and a chunk of each prompt in prefill. The model
hands each layer's keys/values to `PagedBatch.attend`, which writes them into the pool and attends,
each query to its own sequence's slots.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from .. import kernels
from ..models.cache import kv_heads
from ..models.model import attend

BLOCK_SIZE = 16


class BlockPool:
    """`num_blocks` blocks of `block_size` tokens for every layer: `keys[layer]` is (H_kv, slots, D)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a pool needs at least one block of one token, got {num_blocks} x {block_size}")
        shape = (num_kv_heads, num_blocks * block_size, head_dim)
        # Never filled: only written slots are ever read, and untouched pages of a large budget cost no memory.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        self.refs = [0] * num_blocks
        self.digest_of: list[bytes | None] = [None] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))  # blocks holding nothing worth keeping
        self.cached: dict[bytes, int] = {}  # full blocks by the digest of the tokens up to their end
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, LRU first
        self.lookups = self.hits = self.tokens_reused = self.evictions = 0

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int = BLOCK_SIZE, caching: bool = True) -> BlockPool:
        """A pool shaped for `model` (its kv heads, or this rank's under tensor parallelism), in its dtype."""
        param = next(model.parameters())
        return cls(model.config.num_hidden_layers, num_blocks, block_size, kv_heads(model), model.config.head_dim,
                   param.dtype, param.device, caching)

    @property
    def available(self) -> int:
        """Blocks a sequence can take now (free, or cached and held by nobody)."""
        return len(self.free) + len(self.evictable)

    @property
    def used(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.available

    @property
    def cached_blocks(self) -> int:
        return len(self.cached)

    def allocate(self) -> int:
        """A block for one sequence to write; the least recently used cached block when none is free."""
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.digest_of[block]]
            self.digest_of[block] = None
            self.evictions += 1
        else:
            raise MemoryError("the KV cache pool has no block left")
        self.refs[block] = 1
        return block

    def hold(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.evictable[block]
        self.refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one holder of each block; a cached block nobody holds becomes the most recent to evict."""
        for block in reversed(blocks):  # a sequence's last blocks are the least likely to be shared: go first
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if self.digest_of[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free.append(block)

    def register(self, block: int, digest: bytes) -> None:
        """`block` is full and holds the tokens whose chain digest is `digest`."""
        if self.caching and digest not in self.cached and self.digest_of[block] is None:
            self.cached[digest] = block
            self.digest_of[block] = digest

    def match(self, ids: list[int], namespace: bytes = b"") -> list[int]:
        """The cached blocks holding the longest run of whole blocks that `ids` starts with, written under the
        same `namespace` (see `root`), held for the caller; at least one token of `ids` is left out, so its
        prefill still gives next-token logits."""
        if not self.caching:
            return []
        self.lookups += 1
        blocks, digest = [], root(namespace)
        for start in range(0, len(ids) - 1 - self.block_size + 1, self.block_size):
            digest = chain(digest, ids[start:start + self.block_size])
            block = self.cached.get(digest)
            if block is None:
                break
            self.hold(block)
            blocks.append(block)
        if blocks:
            self.hits += 1
            self.tokens_reused += len(blocks) * self.block_size
        return blocks

    def check_empty(self) -> None:
        """Raise AssertionError unless every block is free or cached and unheld (after a soak)."""
        held = sum(r > 0 for r in self.refs)
        if held or len(self.free) + len(self.evictable) != self.num_blocks or len(self.cached) != len(self.evictable):
            raise AssertionError(f"pool accounting: {held} blocks held, {len(self.free)} free, {len(self.evictable)} "
                                 f"evictable, {len(self.cached)} cached, of {self.num_blocks}")


def root(namespace: bytes) -> bytes:
    """Where a namespace's hash chains start. Blocks are shared only between requests of one namespace
    (the server's: one per API key and cache_salt), so a client cannot learn from its own timings or the
    metrics whether another party's prompt is cached. b"": the one namespace of a single-party server."""
    return hashlib.blake2b(namespace, digest_size=16, person=b"stablelm-prefix").digest() if namespace else b""


def chain(parent: bytes, tokens: list[int]) -> bytes:
    """The digest of a block: its parent's digest and its own token ids."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return h.digest()


class BlockTable:
    """One sequence's blocks and the token ids whose keys/values they hold."""

    def __init__(self, pool: BlockPool, blocks: list[int] | None = None, tokens: list[int] | None = None,
                 namespace: bytes = b""):
        self.pool = pool
        self.blocks = blocks or []
        self.tokens = tokens or []
        self.namespace = namespace
        self.digest = root(namespace)  # chain digest of the last registered (full) block
        self.registered = 0  # full blocks registered so far
        self._register()

    def __len__(self) -> int:
        return len(self.tokens)

    def blocks_needed(self, n: int) -> int:
        """New blocks for `n` more tokens."""
        size = self.pool.block_size
        return max(0, -(-(len(self.tokens) + n) // size) - len(self.blocks))

    def grow(self, n: int) -> None:
        """Take the blocks for `n` more tokens (the caller checked `pool.available`)."""
        for _ in range(self.blocks_needed(n)):
            self.blocks.append(self.pool.allocate())

    def slots(self, start: int, end: int) -> torch.Tensor:
        """(end - start,) pool slots of positions start..end-1."""
        size = self.pool.block_size
        blocks = torch.tensor(self.blocks, dtype=torch.long)
        positions = torch.arange(start, end)
        return blocks[positions // size] * size + positions % size

    def written(self, tokens: list[int]) -> None:
        """The keys/values of `tokens` are now in the next slots: register the blocks they filled."""
        self.tokens.extend(tokens)
        self._register()

    def _register(self) -> None:
        size = self.pool.block_size
        while (self.registered + 1) * size <= len(self.tokens):
            start = self.registered * size
            self.digest = chain(self.digest, self.tokens[start:start + size])
            self.pool.register(self.blocks[self.registered], self.digest)
            self.registered += 1

    def fork(self) -> BlockTable:
        """A copy for another sequence of the same prompt: full blocks shared, the last partial one copied."""
        size = self.pool.block_size
        full = len(self.tokens) // size
        shared = self.blocks[:full]
        for block in shared:
            self.pool.hold(block)
        other = BlockTable(self.pool, list(shared), list(self.tokens[:full * size]), self.namespace)
        rest = len(self.tokens) - full * size
        if rest:
            block = self.pool.allocate()
            src = self.blocks[full] * size
            for bufs in (self.pool.keys, self.pool.values):
                for buf in bufs:
                    buf[:, block * size:block * size + rest] = buf[:, src:src + rest]
            other.blocks.append(block)
            other.tokens.extend(self.tokens[full * size:])
        return other

    def free(self) -> None:
        self.pool.release(self.blocks)
        self.blocks, self.tokens, self.registered, self.digest = [], [], 0, b""


@dataclass
class Segment:
    """One sequence's tokens in a PagedBatch: positions start..start+count-1 of `table`."""

    table: BlockTable
    start: int
    count: int


class PagedBatch:
    """The cache one forward sees: the scheduled sequences' tokens, side by side in one row (1, T).

    With the native kernels, decode tokens and short prompt chunks attend in one call that reads each
    sequence's blocks where they lie. Otherwise (and for chunks past NATIVE_MAX_QUERIES tokens, where
    torch's blocked attention is faster) the keys/values are gathered first: decode tokens in one padded,
    masked call, each chunk on its own, causally after the positions its sequence already holds.
    """

    paged = True
    NATIVE_MAX_QUERIES = 32  # torch is as fast from here (2,000-token prefix, 32 heads of 64, AVX2 EPYC)

    def __init__(self, pool: BlockPool, segments: list[Segment]):
        self.pool = pool
        self.segments = segments
        device = pool.keys[0].device if pool.keys else "cpu"
        self.positions = torch.cat([torch.arange(s.start, s.start + s.count) for s in segments])[None].to(device)
        self.write_slots = torch.cat([s.table.slots(s.start, s.start + s.count) for s in segments]).to(device)
        ends = [s.start + s.count for s in segments]
        offsets = torch.tensor([0] + [s.count for s in segments]).cumsum(0).tolist()
        self.isa = kernels.native_isa() if torch.device(device).type == "cpu" else None
        native = [i for i, s in enumerate(segments) if self.isa is not None and s.count <= self.NATIVE_MAX_QUERIES]
        self.native_all = len(native) == len(segments)
        self.native = None
        if native:
            width = max(len(segments[i].table.blocks) for i in native)
            self.native = dict(
                tokens=torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in native]),
                blocks=torch.tensor([segments[i].table.blocks + [0] * (width - len(segments[i].table.blocks))
                                     for i in native], dtype=torch.long),
                starts=torch.tensor([0] + [segments[i].count for i in native]).cumsum(0),
                lengths=torch.cat([torch.arange(segments[i].start + 1, ends[i] + 1) for i in native]))
        rest = [i for i in range(len(segments)) if i not in set(native)]
        decode = [i for i in rest if segments[i].count == 1]
        self.decode_tokens = torch.tensor([offsets[i] for i in decode], dtype=torch.long, device=device)
        self.decode_slots = self.decode_mask = None
        if decode:
            longest = max(ends[i] for i in decode)
            table = torch.empty(len(decode), longest, dtype=torch.long)
            mask = torch.zeros(len(decode), longest, dtype=torch.bool)
            for row, i in enumerate(decode):
                slots = segments[i].table.slots(0, ends[i])
                table[row, :ends[i]] = slots
                table[row, ends[i]:] = slots[0]  # masked, but a written slot: unwritten memory may hold NaN
                mask[row, :ends[i]] = True
            self.decode_slots, self.decode_mask = table.to(device), mask[:, None, None, :].to(device)
        self.chunks = [(offsets[i], offsets[i + 1], segments[i].table.slots(0, ends[i]).to(device))
                       for i in rest if segments[i].count > 1]
        self.chunk_masks = {}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               implementation: str = "sdpa") -> torch.Tensor:
        """Write this forward's keys/values (1, H_kv, T, D) into the pool; attention output (1, H, T, D)."""
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        keys.index_copy_(1, self.write_slots, k[0])
        values.index_copy_(1, self.write_slots, v[0])
        if self.native is not None:
            n = self.native
            qn = q[0].transpose(0, 1)  # (T, H, D)
            if not self.native_all:
                qn = qn.index_select(0, n["tokens"])
            on = torch.ops.stablelm_kernels.paged_attention(
                qn.float().contiguous(), keys, values, n["blocks"], n["starts"], n["lengths"], self.pool.block_size,
                1 / math.sqrt(q.shape[-1]), self.isa).to(q.dtype).transpose(0, 1)  # (H, T, D)
            if self.native_all:
                return on[None]
        out = torch.empty_like(q)
        if self.native is not None:
            out[0][:, self.native["tokens"]] = on
        if self.decode_slots is not None:
            qd = q[0][:, self.decode_tokens].transpose(0, 1)[:, :, None]  # (B, H, 1, D)
            kd = keys[:, self.decode_slots].transpose(0, 1)  # (B, H_kv, L, D)
            vd = values[:, self.decode_slots].transpose(0, 1)
            od = attend(qd, kd, vd, self.decode_mask, False, implementation)
            out[0][:, self.decode_tokens] = od[:, :, 0].transpose(0, 1)
        for begin, end, slots in self.chunks:
            s, t = end - begin, len(slots)
            mask = self.chunk_masks.get((s, t))
            if mask is None:  # causal, after the t - s positions already held
                mask = self.chunk_masks[(s, t)] = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
            out[:, :, begin:end] = attend(q[:, :, begin:end], keys[None, :, slots], values[None, :, slots], mask,
                                          False, implementation)
        return out
