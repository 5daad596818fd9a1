"""The KV cache: incremental forwards equal the full one, and the row operations a server relies on."""

from __future__ import annotations

import pytest
import torch

import stablelm
from conftest import TINY, VARIANTS, padded_batch
from stablelm import StableLmConfig, StableLmForCausalLM

TOL = 1e-4


def tiny_model(seed=0, **overrides) -> StableLmForCausalLM:
    return StableLmForCausalLM.from_config(StableLmConfig(**{**TINY, **overrides}), seed=seed)


@pytest.mark.parametrize("variant", ["base", "stablelm2_12b", "rope_dynamic", "everything"])
def test_cached_incremental_forward_equals_full(variant):
    model = tiny_model(**{k: v for k, v in VARIANTS[variant].items()})
    ids, mask = padded_batch(lengths=(12, 9, 11))
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        cache = stablelm.KVCache.for_model(model, 3, 4)  # small on purpose: it grows
        pieces = []
        for start, end in ((0, 5), (5, 6), (6, 9), (9, 10), (10, 12)):
            out = model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache)
            pieces.append(out.logits)
        stepped = torch.cat(pieces, dim=1)
    real = mask.bool()
    assert (stepped[real] - full[real]).abs().max() < TOL


@pytest.mark.parametrize("variant", ["base", "stablelm2_12b"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_aligned_decoding_attends_natively_as_sdpa_does(variant, dtype, batch, monkeypatch):
    """A decode step whose rows are aligned and have no holes attends with the native kernel, one call per
    row (`one_token`; the 12B variant's q/k norms run first, so its q and k arrive rotated); with the kernel
    declined, SDPA. Both give the full forward's logits (GQA included)."""
    from stablelm import kernels
    if kernels.native_isa() is None:
        pytest.skip("the native kernels are not built here: decoding always uses SDPA")
    model = tiny_model(**VARIANTS[variant]).to(dtype).eval()  # training mode never takes the kernel
    ids = torch.randint(0, TINY["vocab_size"], (batch, 20), generator=torch.Generator().manual_seed(0))
    native_calls = []
    attend_one = stablelm.KVCache.attend_one

    def counted(self, *args):
        native_calls.append(len(args))
        return attend_one(self, *args)

    def decode(rows, path):
        monkeypatch.setattr(stablelm.KVCache, "attend_one", counted if path == "native" else
                            lambda self, *args: None)
        cache = stablelm.KVCache.for_model(model, rows.shape[0], 33)
        steps = [model(rows[:, :12], past_key_values=cache).logits]
        for i in range(12, 20):
            steps.append(model(rows[:, i:i + 1], past_key_values=cache).logits)
            assert cache.one_token
        return torch.cat(steps, dim=1).float()

    with torch.no_grad():
        full = model(ids).logits.float()
        results = {path: decode(ids, path) for path in ("native", "sdpa")}
    layers = TINY["num_hidden_layers"]
    # 8 decode steps, every layer: with cos/sin (rotated in the kernel) or without (q/k norms first)
    assert native_calls == [6 if variant == "base" else 4] * (8 * layers)
    tolerance = TOL if dtype == torch.float32 else 0.05 * full.abs().max()
    assert (results["native"] - full).abs().max() < tolerance
    assert (results["native"] - results["sdpa"]).abs().max() < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, rotated", [(4, 4, 16), (8, 2, 64), (4, 1, 8)])
def test_decode_attention_rotates_exactly_as_torch(dtype, heads, kv_heads, rotated):
    """The fused decode op stores exactly the keys `apply_rotary` gives (the same roundings, bit for bit, in
    every dtype), the value as given, and attends as SDPA does."""
    from stablelm import kernels
    from stablelm.models.model import apply_rotary
    if kernels.native_isa() is None:
        pytest.skip("the native kernels are not built here")
    g = torch.Generator().manual_seed(0)
    d, length, capacity = 64, 21, 32
    keys = torch.randn(kv_heads, capacity, d, generator=g).to(dtype)
    values = torch.randn(kv_heads, capacity, d, generator=g).to(dtype)
    q, k, v = (torch.randn(1, 1, n * d, generator=g).to(dtype) for n in (heads, kv_heads, kv_heads))
    angle = torch.rand(1, 1, rotated, generator=g) * 6
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    want_q = apply_rotary(q.view(1, 1, heads, d).transpose(1, 2), cos, sin)
    want_k = apply_rotary(k.view(1, 1, kv_heads, d).transpose(1, 2), cos, sin)
    for isa in range(min(kernels.native_isa(), 1) + 1):
        kc, vc = keys.clone(), values.clone()
        out = torch.ops.stablelm_kernels.decode_attention(q, k, v, cos, sin, kc, vc, length - 1, d ** -0.5, isa)
        assert torch.equal(kc[:, length - 1], want_k[0, :, 0]) and torch.equal(vc[:, length - 1], v.view(kv_heads, d))
        assert torch.equal(kc[:, :length - 1], keys[:, :length - 1])
        expected = torch.nn.functional.scaled_dot_product_attention(
            want_q.float(), kc[None, :, :length].float(), vc[None, :, :length].float(), enable_gqa=True)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        assert (out.float() - expected.reshape(-1)).abs().max() <= tolerance, (isa, dtype)


def test_row_operations_keep_each_sequence_intact():
    """copy_row, narrow/absorb and reset_rows, as the engine uses them: a row moved elsewhere continues
    exactly as a solo run would."""
    model = tiny_model()
    prompts = [torch.tensor([[5, 9, 11, 4]]), torch.tensor([[7, 3]])]
    solo = []
    with torch.no_grad():
        for ids in prompts:
            cache = stablelm.KVCache.for_model(model, 1, 16)
            model(ids, past_key_values=cache)
            solo.append(model(torch.tensor([[6]]), past_key_values=cache).logits[0, -1])
        shared = stablelm.KVCache.for_model(model, 3, 16)
        for row, ids in zip((2, 0), prompts):
            scratch = stablelm.KVCache.for_model(model, 1, ids.shape[1])
            model(ids, past_key_values=scratch)
            shared.copy_row(row, scratch, 0)
        shared.copy_row(1, shared, 2)  # move the first prompt from row 2 to row 1, free row 2
        shared.reset_rows([2])
        view = shared.narrow(2)
        positions = torch.tensor([[shared.lengths[1]], [shared.lengths[0]]]).flip(0)
        logits = model(torch.tensor([[6], [6]]), position_ids=positions, past_key_values=view).logits[:, -1]
        shared.absorb(view)
    assert (logits[1] - solo[0]).abs().max() < TOL and (logits[0] - solo[1]).abs().max() < TOL
    assert shared.lengths == [3, 5, 0]


def test_a_row_longer_than_the_cache_is_refused():
    model = tiny_model()
    big = stablelm.KVCache.for_model(model, 1, 8)
    with torch.no_grad():
        model(torch.arange(3, 11)[None], past_key_values=big)
    with pytest.raises(ValueError, match="does not fit a cache of capacity 4"):
        stablelm.KVCache.for_model(model, 1, 4).copy_row(0, big, 0)
