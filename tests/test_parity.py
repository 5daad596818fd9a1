"""Our four classes against the reference's, for every architecture option, in fp32."""

from __future__ import annotations

import pytest
import torch

import stablelm
from conftest import VARIANTS, padded_batch, reference_model

TOL = 1e-4


def _load_ours(cls_name: str, ref, path):
    ref.save_pretrained(path)
    return getattr(stablelm, cls_name).from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_lm_logits_and_loss(variant, side, tmp_ckpt):
    ref = reference_model("StableLmForCausalLM", VARIANTS[variant])
    ours = _load_ours("StableLmForCausalLM", ref, tmp_ckpt)
    ids, mask = padded_batch(side=side, lengths=(12, 5, 9) if variant == "rope_dynamic" else (7, 4, 6))
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        o = ours(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    real = mask.bool()
    assert (o.logits[real] - r.logits[real]).abs().max() < TOL
    assert abs(o.loss.item() - r.loss.item()) < TOL
    assert len(o.hidden_states) == len(r.hidden_states)
    for a, b in zip(o.hidden_states, r.hidden_states):
        assert (a[real] - b[real]).abs().max() < TOL


@pytest.mark.parametrize("variant", ["base", "stablelm2_12b", "everything"])
def test_backbone_and_logits_to_keep(variant, tmp_ckpt):
    ref = reference_model("StableLmForCausalLM", VARIANTS[variant])
    ref.save_pretrained(tmp_ckpt)
    ids, mask = padded_batch(lengths=(6, 6))
    backbone = stablelm.StableLmModel.from_pretrained(tmp_ckpt, dtype=torch.float32)
    full = stablelm.StableLmForCausalLM.from_pretrained(tmp_ckpt, dtype=torch.float32)
    with torch.no_grad():
        r = ref.model(input_ids=ids).last_hidden_state
        assert (backbone(ids).last_hidden_state - r).abs().max() < TOL
        r_last = ref(ids, logits_to_keep=2).logits
        o_last = full(ids, logits_to_keep=2).logits
    assert o_last.shape == r_last.shape == (2, 2, 97)
    assert (o_last - r_last).abs().max() < TOL


@pytest.mark.parametrize("variant", ["base", "gqa", "stablelm2_12b"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("problem", ["single_label", "multi_label", "regression"])
def test_sequence_classification(variant, side, problem, tmp_ckpt):
    num_labels = 1 if problem == "regression" else 3
    ref = reference_model("StableLmForSequenceClassification", VARIANTS[variant], num_labels=num_labels)
    ours = _load_ours("StableLmForSequenceClassification", ref, tmp_ckpt)
    ids, mask = padded_batch(side=side)
    g = torch.Generator().manual_seed(1)
    labels = {"single_label": torch.randint(0, 3, (3,), generator=g),
              "multi_label": torch.randint(0, 2, (3, 3), generator=g).float(),
              "regression": torch.randn(3, generator=g)}[problem]
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, labels=labels)
        o = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert o.logits.shape == r.logits.shape
    assert (o.logits - r.logits).abs().max() < TOL
    assert abs(o.loss.item() - r.loss.item()) < TOL


def test_sequence_classification_without_pad_token(tmp_ckpt):
    ref = reference_model("StableLmForSequenceClassification", {}, pad_token_id=None, num_labels=2)
    ours = _load_ours("StableLmForSequenceClassification", ref, tmp_ckpt)
    ids, _ = padded_batch(lengths=(5,))
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max() < TOL
    with pytest.raises(ValueError, match="pad_token_id"):
        ours(torch.cat([ids, ids]))


@pytest.mark.parametrize("variant", ["base", "qkv_bias", "stablelm2_12b"])
def test_token_classification(variant, tmp_ckpt):
    ref = reference_model("StableLmForTokenClassification", VARIANTS[variant], num_labels=5)
    ours = _load_ours("StableLmForTokenClassification", ref, tmp_ckpt)
    ids, mask = padded_batch(side="right")
    labels = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(2)).masked_fill(mask == 0, -100)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, labels=labels)
        o = ours(input_ids=ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert (o.logits[real] - r.logits[real]).abs().max() < TOL
    assert abs(o.loss.item() - r.loss.item()) < TOL


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementations_agree(implementation, tmp_ckpt):
    ref = reference_model("StableLmForCausalLM", VARIANTS["stablelm2_12b"])
    ref.save_pretrained(tmp_ckpt)
    ours = stablelm.StableLmForCausalLM.from_pretrained(tmp_ckpt, dtype=torch.float32,
                                                        attn_implementation=implementation)
    ids, mask = padded_batch()
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask).logits
        o = ours(input_ids=ids, attention_mask=mask).logits
    assert (o[mask.bool()] - r[mask.bool()]).abs().max() < TOL


def test_position_ids_are_honoured(tmp_ckpt):
    ref = reference_model("StableLmForCausalLM", {})
    ours = _load_ours("StableLmForCausalLM", ref, tmp_ckpt)
    ids, _ = padded_batch(lengths=(5, 5))
    pos = torch.tensor([[3, 4, 5, 6, 7], [0, 2, 4, 6, 8]])
    with torch.no_grad():
        assert (ours(ids, position_ids=pos).logits - ref(ids, position_ids=pos).logits).abs().max() < TOL
