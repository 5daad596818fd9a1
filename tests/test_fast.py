"""The inference layout (fused, prepacked) and weight-only quantization: same answers, round trips."""

from __future__ import annotations

import json

import pytest
import torch

import stablelm
from conftest import tiny_checkpoint
from stablelm.layers import gptq, linear, rounding


@pytest.fixture()
def ckpt(tmp_path):
    tiny_checkpoint(tmp_path / "ckpt", use_qkv_bias=True, num_key_value_heads=2, hidden_size=64,
                    intermediate_size=128)
    return tmp_path / "ckpt"


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


IDS = torch.tensor([[5, 17, 33, 120, 200, 7, 9, 64]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_layout_matches_plain(ckpt, dtype):
    plain = stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=dtype, fast_inference=False)
    quick = stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=dtype)
    assert quick.inference_kind == linear.choose_format(dtype, "cpu") and plain.inference_kind is None
    reference = logits(plain, IDS)
    # 16-bit: the same products summed in another order (oneDNN's blocking, our fp32 widening), rounded per layer
    tol = 1e-5 if dtype == torch.float32 else 0.03 * reference.abs().max()
    assert (reference - logits(quick, IDS)).abs().max() < tol
    assert torch.equal(plain.generate(IDS, max_new_tokens=10, do_sample=False),
                       quick.generate(IDS, max_new_tokens=10, do_sample=False))


def test_train_restores_plain_modules_and_learns(ckpt):
    model = stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    before = logits(model, IDS)
    model.train()
    assert model.inference_kind is None and hasattr(model.model.layers[0].self_attn.qkv_proj, "q_proj")
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
    assert model.quantization == kind
    expected = logits(model, IDS)
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["bits"] == (8 if kind == "int8" else 4)
    size = sum(p.stat().st_size for p in (tmp_path / "q").glob("*.safetensors"))
    full = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    assert size < full
    again = stablelm.StableLmForCausalLM.from_pretrained(tmp_path / "q")
    assert again.quantization == kind
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
    q, scale = rounding.quantize_int8(w)
    assert (q.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6
    q4, s4, z4 = rounding.quantize_int4(w, 64)
    assert q4.max() <= 15
    deq = ((q4.view(16, 2, 64).float() - 8) * s4[..., None].float() + z4[..., None].float()).view(16, 128)
    # half a step, plus the bf16 rounding of the stored scale and zero
    assert (deq - w).abs().max() < 0.5 * s4.float().max() + 0.02


def test_unknown_quantization(ckpt):
    with pytest.raises(ValueError, match="quantization"):
        stablelm.StableLmForCausalLM.from_pretrained(ckpt, quantization="int3")


def _dequantize(q, scale, zero, group_size=64):
    n, k = q.shape
    return ((q.float().view(n, -1, group_size) - 8) * scale.float()[..., None] + zero.float()[..., None]).view(n, k)


def test_gptq_without_input_correlation_is_round_to_nearest():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    q, scale, zero = gptq.gptq_int4(w, torch.eye(128))
    q_rtn, scale_rtn, zero_rtn = rounding.quantize_int4(w)
    assert torch.equal(q, q_rtn) and torch.equal(scale, scale_rtn) and torch.equal(zero, zero_rtn)


def test_gptq_beats_rounding_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    x = torch.randn(4096, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(4096, 128, generator=g)
    hessian = x.T @ x / len(x)
    by_gptq = _dequantize(*gptq.gptq_int4(w, hessian))
    rtn = _dequantize(*rounding.quantize_int4(w))
    err_gptq = (x @ (by_gptq - w).T).pow(2).mean()
    err_rtn = (x @ (rtn - w).T).pow(2).mean()
    assert err_gptq < 0.5 * err_rtn


def test_gptq_model_saves_mixed_int4_int8_and_reloads(ckpt, tmp_path):
    model = stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    reference = logits(model, IDS)
    calibration = gptq.calibration_windows(torch.randint(2, 300, (2000,), generator=torch.Generator().manual_seed(1)),
                                               samples=8, seq_len=32)
    gptq.gptq_quantize(model, calibration, progress=False)
    assert model.quantization == "int4"
    assert model.model.layers[0].mlp.down_proj.quantization == "int8"
    assert model.model.layers[0].self_attn.qkv_proj.quantization == "int4"
    got = logits(model, IDS)
    assert (got - reference).abs().max() < 0.3 * reference.abs().max()
    model.save_pretrained(tmp_path / "q")
    qconfig = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qconfig["bits"] == 4 and qconfig["int8_modules"] == ["down_proj"]
    again = stablelm.StableLmForCausalLM.from_pretrained(tmp_path / "q")
    assert again.model.layers[1].mlp.down_proj.quantization == "int8"
    assert torch.equal(logits(again, IDS), got)


def test_gptq_rejects_part_of_a_fused_projection(ckpt):
    model = stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    calibration = torch.randint(2, 300, (2, 16))
    with pytest.raises(ValueError, match="fused"):
        gptq.gptq_quantize(model, calibration, int8_modules=("v_proj",), progress=False)
    with pytest.raises(ValueError, match="unknown projection"):
        gptq.gptq_quantize(model, calibration, int8_modules=("mlp",), progress=False)


def test_bad_int8_modules_in_config(ckpt, tmp_path):
    model = stablelm.StableLmForCausalLM.from_pretrained(ckpt, quantization="int4")
    model.save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["int8_modules"] = ["attention"]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="int8_modules"):
        stablelm.StableLmForCausalLM.from_pretrained(tmp_path / "q")
    config["quantization_config"]["int8_modules"] = ["down_proj"]  # the file holds int4 down_proj tensors
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="stored as int4"):
        stablelm.StableLmForCausalLM.from_pretrained(tmp_path / "q")
