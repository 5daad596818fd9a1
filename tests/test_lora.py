"""LoRA against transformers + PEFT (pinned in requirements-test.txt): adapters load both ways with the same
logits, a few training steps give the same losses, merging changes nothing, bad input is refused first."""

from __future__ import annotations

import pytest
import torch

import stablelm
from conftest import padded_batch, reference_model
from stablelm.layers import lora

peft = pytest.importorskip("peft", reason="the LoRA parity tests compare with PEFT (requirements-test.txt)")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANT = dict(num_key_value_heads=2, use_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0)


def _randomize_lora(model, seed):
    """Give every LoRA B a non-zero value (PEFT and we start B at zero, which would hide a wrong mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture
def pair(tmp_path):
    """A reference model with a PEFT adapter (saved), and the base checkpoint saved for us."""
    ref = reference_model("StableLmForCausalLM", VARIANT, seed=3)
    ref.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(ref, config)
    _randomize_lora(peft_model, 0)
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    return peft_model, tmp_path


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_peft_adapter_loads_here_and_ours_loads_in_peft(pair):
    peft_model, tmp = pair
    ids, mask = padded_batch(seed=1)
    expected = _logits(peft_model, ids, mask)
    ours = stablelm.StableLmForCausalLM.from_pretrained(tmp / "base", adapter=tmp / "peft_adapter",
                                                       merge_adapter=False)
    assert (_logits(ours, ids, mask) - expected).abs().max() < 1e-5
    lora.save_adapter(ours, tmp / "ours")
    transformers = pytest.importorskip("transformers")
    fresh = transformers.StableLmForCausalLM.from_pretrained(tmp / "base")
    theirs = peft.PeftModel.from_pretrained(fresh, tmp / "ours")
    assert (_logits(theirs, ids, mask) - expected).abs().max() < 1e-5


def test_merged_equals_unmerged_and_saves_a_plain_checkpoint(pair):
    peft_model, tmp = pair
    ids, mask = padded_batch(seed=2)
    unmerged = stablelm.StableLmForCausalLM.from_pretrained(tmp / "base", adapter=tmp / "peft_adapter",
                                                           merge_adapter=False)
    merged = stablelm.StableLmForCausalLM.from_pretrained(tmp / "base", adapter=tmp / "peft_adapter")
    assert merged.inference_kind is not None  # merged, then the inference layout as usual
    assert (_logits(merged, ids, mask) - _logits(unmerged, ids, mask)).abs().max() < 1e-5
    lora.merge_lora(unmerged).save_pretrained(tmp / "merged")
    transformers = pytest.importorskip("transformers")
    reference = transformers.StableLmForCausalLM.from_pretrained(tmp / "merged")
    assert (_logits(reference, ids, mask) - _logits(peft_model, ids, mask)).abs().max() < 1e-5


def test_training_steps_match_peft(pair):
    """Same start, data, optimizer and hyper-parameters: the same losses, step by step (fp32)."""
    peft_model, tmp = pair
    ours = stablelm.StableLmForCausalLM.from_pretrained(tmp / "base", adapter=tmp / "peft_adapter",
                                                       merge_adapter=False).train()
    peft_model.train()
    ids, mask = padded_batch(seed=4, lengths=(9, 9, 9))
    losses = []
    for model in (peft_model, ours):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        run = []
        for _ in range(4):
            optimizer.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            optimizer.step()
            run.append(loss.item())
        losses.append(run)
    assert len([p for p in ours.parameters() if p.requires_grad]) == 2 * len(TARGETS) * 2  # A, B x 7 x 2 layers
    assert max(abs(a - b) for a, b in zip(*losses)) < 1e-4, losses
    ids2, mask2 = padded_batch(seed=5)
    assert (_logits(ours.eval(), ids2, mask2) - _logits(peft_model.eval(), ids2, mask2)).abs().max() < 1e-4


@pytest.mark.parametrize("kwargs,message", [
    ({"r": 0}, r"rank r must be an integer in \[1, 65536\]"),
    ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"target_modules": ["query"]}, "unknown: \\['query'\\]"),
])
def test_bad_lora_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora.LoraConfig(**kwargs)


def test_adapter_for_another_shape_is_refused(pair, tmp_path):
    _, tmp = pair
    other = reference_model("StableLmForCausalLM", dict(VARIANT, hidden_size=64), seed=0)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="has shape"):
        stablelm.StableLmForCausalLM.from_pretrained(tmp_path / "other", adapter=tmp / "peft_adapter")


def test_save_pretrained_with_unmerged_adapters_names_the_fix(pair):
    _, tmp = pair
    model = stablelm.StableLmForCausalLM.from_pretrained(tmp / "base", adapter=tmp / "peft_adapter",
                                                        merge_adapter=False)
    with pytest.raises(ValueError, match="merge_lora"):
        model.save_pretrained(tmp / "x")
    assert not (tmp / "x" / "model.safetensors").exists()
