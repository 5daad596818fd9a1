"""The serving engine's block pool (stablelm.serving.paged) and the native decode attention over it."""

from __future__ import annotations

import math

import pytest
import torch

from stablelm import kernels
from stablelm.serving.paged import BlockPool, BlockTable


def native_levels():
    return [0, 1] if "avx2" in kernels.native_isa_levels() else [0] if kernels.native_isa_levels() else []


def reference(q, keys, values, blocks, starts, lengths, block_size):
    """float64 attention of each token's query over the first `length` slots its segment's blocks name."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // keys.shape[0]
    for segment in range(blocks.shape[0]):
        for token in range(int(starts[segment]), int(starts[segment + 1])):
            positions = torch.arange(int(lengths[token]))
            slots = blocks[segment][positions // block_size] * block_size + positions % block_size
            k = keys[:, slots].double().repeat_interleave(group, 0)  # (H, L, D)
            v = values[:, slots].double().repeat_interleave(group, 0)
            scores = (k @ q[token].double()[:, :, None])[..., 0] / math.sqrt(q.shape[-1])  # (H, L)
            out[token] = (scores.softmax(-1)[:, None] @ v)[:, 0]
    return out


@pytest.mark.parametrize("isa", native_levels())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_paged_attention_kernel_equals_torch(isa, dtype):
    """Every ISA level this CPU runs; GQA and not; head sizes that are and are not a multiple of 8; decode
    tokens and prompt chunks (causal) whose lengths end anywhere in a block; blocks in any order: float64
    attention within fp32 rounding."""
    g = torch.Generator().manual_seed(isa)
    for heads, kv_heads, dim, block_size in [(4, 4, 64, 16), (8, 2, 80, 4), (6, 3, 12, 5)]:
        pool_blocks = 60
        keys = torch.randn(kv_heads, pool_blocks * block_size, dim, generator=g).to(dtype)
        values = torch.randn(kv_heads, pool_blocks * block_size, dim, generator=g).to(dtype)
        # segments: decode tokens at 1, block_size, block_size + 1 positions; a chunk of 5 after 3 * bs - 1
        counts, first = [1, 1, 1, 5, 1], [1, block_size, block_size + 1, 3 * block_size - 1, 7 * block_size]
        lengths = torch.cat([torch.arange(f, f + c) for f, c in zip(first, counts)])
        starts = torch.tensor([0] + counts).cumsum(0)
        blocks = torch.randperm(pool_blocks, generator=g)[:5 * 8].view(5, 8).contiguous()
        q = torch.randn(int(starts[-1]), heads, dim, generator=g)
        got = kernels.paged_attention(q, keys, values, blocks, starts, lengths, block_size, 1 / math.sqrt(dim), isa)
        expected = reference(q, keys, values, blocks, starts, lengths, block_size)
        assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max(), (heads, kv_heads, dim, dtype)


def test_paged_attention_refuses_bad_tables():
    if not native_levels():
        pytest.skip("the native kernels are not built here")
    q, keys, one = torch.randn(1, 2, 8), torch.randn(2, 32, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="outside the pool"):
        kernels.paged_attention(q, keys, keys, torch.tensor([[0, 9]]), one, torch.tensor([20]), 16, 1.0)
    with pytest.raises(ValueError, match="lengths"):
        kernels.paged_attention(q, keys, keys, torch.tensor([[0]]), one, torch.tensor([17]), 16, 1.0)
    with pytest.raises(ValueError, match="divide"):
        kernels.paged_attention(q, keys, keys, torch.tensor([[0]]), one, torch.tensor([3]), 5, 1.0)
    with pytest.raises(ValueError, match="starts"):
        kernels.paged_attention(q, keys, keys, torch.tensor([[0]]), torch.tensor([0, 2]), torch.tensor([3]), 16, 1.0)


def test_pool_evicts_the_least_recently_used_cached_blocks():
    pool = BlockPool(1, 4, 4, 1, 2)
    tables = []
    for first in (1, 2, 3):  # three sequences of one full block each
        table = BlockTable(pool)
        table.grow(4)
        table.written([first, 7, 7, 7])
        tables.append(table)
    assert pool.available == 1 and pool.cached_blocks == 3
    blocks = [table.blocks[0] for table in tables]
    for table in tables:  # they finish in order: the first is the least recently used
        table.free()
    assert pool.available == 4 and pool.cached_blocks == 3
    taken = [pool.allocate() for _ in range(2)]  # the free block, then the oldest cached one
    assert blocks[0] in taken and pool.evictions == 1 and pool.cached_blocks == 2
    assert pool.match([1, 7, 7, 7, 0]) == []
    held = pool.match([3, 7, 7, 7, 0])
    assert held == [blocks[2]] and pool.refs[blocks[2]] == 1 and pool.available == 1
    assert pool.match([2, 7, 7, 7]) == []  # a prompt's last token is always prefilled
    pool.release(held + taken)
    pool.check_empty()
