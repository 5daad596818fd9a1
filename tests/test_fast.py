"""The inference layout (fused, prepacked) and weight-only quantization: same answers, round trips."""

from __future__ import annotations

import json

import pytest
import torch

import stablelm
from conftest import tiny_checkpoint
from stablelm import fast


@pytest.fixture()
def ckpt(tmp_path):
    tiny_checkpoint(tmp_path / "ckpt", use_qkv_bias=True, num_key_value_heads=2, hidden_size=64,
                    intermediate_size=128)
    return tmp_path / "ckpt"


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


IDS = torch.tensor([[5, 17, 33, 120, 200, 7, 9, 64]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_layout_matches_plain(ckpt, dtype):
    plain = stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=dtype, fast_inference=False)
    quick = stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=dtype)
    assert quick.inference_kind == "mkldnn" and plain.inference_kind is None
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (logits(plain, IDS) - logits(quick, IDS)).abs().max() < tol
    assert torch.equal(plain.generate(IDS, max_new_tokens=10, do_sample=False),
                       quick.generate(IDS, max_new_tokens=10, do_sample=False))


def test_train_restores_plain_modules_and_learns(ckpt):
    model = stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    before = logits(model, IDS)
    model.train()
    assert model.inference_kind is None and hasattr(model.model.layers[0].self_attn, "q_proj")
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    assert not torch.equal(logits(model, IDS), before)


def test_state_dict_keeps_reference_names(ckpt):
    quick = stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    plain = stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=torch.float32, fast_inference=False)
    a, b = quick.state_dict(), plain.state_dict()
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_save_and_load_without_requantizing(ckpt, tmp_path, kind):
    model = stablelm.StableLmForCausalLM.from_pretrained(ckpt, quantization=kind)
    assert model.inference_kind == kind
    expected = logits(model, IDS)
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["bits"] == (8 if kind == "int8" else 4)
    size = sum(p.stat().st_size for p in (tmp_path / "q").glob("*.safetensors"))
    full = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    assert size < full
    again = stablelm.StableLmForCausalLM.from_pretrained(tmp_path / "q")
    assert again.inference_kind == kind
    assert torch.equal(logits(again, IDS), expected)
    with pytest.raises(ValueError, match="quantized"):
        stablelm.StableLmForCausalLM.from_pretrained(tmp_path / "q", quantization="int4" if kind == "int8" else "int8")


@pytest.mark.parametrize("kind,tol", [("int8", 0.05), ("int4", 0.3)])
def test_quantized_logits_are_close(ckpt, kind, tol):
    ref = logits(stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=torch.float32), IDS)
    q = logits(stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=torch.float32, quantization=kind), IDS)
    assert (q - ref).abs().max() < tol * ref.abs().max()


def test_quantizers_round_trip():
    w = torch.randn(16, 128)
    q, scale = fast.quantize_int8(w)
    assert (q.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6
    q4, s4, z4 = fast.quantize_int4(w, 64)
    assert q4.max() <= 15
    deq = ((q4.view(16, 2, 64).float() - 8) * s4[..., None].float() + z4[..., None].float()).view(16, 128)
    # half a step, plus the bf16 rounding of the stored scale and zero
    assert (deq - w).abs().max() < 0.5 * s4.float().max() + 0.02


def test_unknown_quantization(ckpt):
    with pytest.raises(ValueError, match="quantization"):
        stablelm.StableLmForCausalLM.from_pretrained(ckpt, quantization="int3")
