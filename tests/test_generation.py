"""generate() against the reference's, token for token, and the sampling filters on hand-made logits."""

from __future__ import annotations

import pytest
import torch

import stablelm
from conftest import VARIANTS, padded_batch, reference_model
from stablelm.generation import sampling
from stablelm.models.generation_config import GenerationConfig


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen")
    ref = reference_model("StableLmForCausalLM", VARIANTS["stablelm2_12b"], seed=3)
    ref.generation_config.pad_token_id = 0
    ref.save_pretrained(path)
    ours = stablelm.StableLmForCausalLM.from_pretrained(path, dtype=torch.float32)
    return ref, ours


def both(models, ids, mask, **kw):
    ref, ours = models
    with torch.no_grad():
        r = ref.generate(ids, attention_mask=mask, **kw)
    o = ours.generate(ids, attention_mask=mask, **kw)
    return r, o


def test_greedy_left_padded_batch(models):
    ids, mask = padded_batch(lengths=(7, 3, 5))
    r, o = both(models, ids, mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(r, o)


def test_batch_rows_equal_solo_rows(models):
    _, ours = models
    ids, mask = padded_batch(lengths=(7, 3, 5))
    batched = ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    for i in range(3):
        row = ids[i][mask[i].bool()][None]
        solo = ours.generate(row, max_new_tokens=8, do_sample=False)
        assert torch.equal(solo[0, -8:], batched[i, -8:])


def test_max_length_vs_max_new_tokens(models):
    ids, mask = padded_batch(lengths=(6, 4))
    r, o = both(models, ids, mask, max_length=10, do_sample=False)
    assert torch.equal(r, o) and o.shape[1] == 10
    r, o = both(models, ids, mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(r, o) and o.shape[1] == 9


def _eos_from_greedy(models, ids, mask, row, step):
    _, ours = models
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    return int(out[row, ids.shape[1] + step])


def test_eos_mid_batch_single_and_list(models):
    ids, mask = padded_batch(lengths=(6, 4, 5))
    eos = _eos_from_greedy(models, ids, mask, row=1, step=3)
    r, o = both(models, ids, mask, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(r, o)
    other = _eos_from_greedy(models, ids, mask, row=0, step=5)
    r, o = both(models, ids, mask, max_new_tokens=10, do_sample=False, eos_token_id=[other, eos], pad_token_id=0)
    assert torch.equal(r, o)


def test_min_new_tokens(models):
    ids, mask = padded_batch(lengths=(6, 4, 5))
    eos = _eos_from_greedy(models, ids, mask, row=1, step=1)
    r, o = both(models, ids, mask, max_new_tokens=8, min_new_tokens=4, do_sample=False, eos_token_id=eos,
                pad_token_id=0)
    assert torch.equal(r, o)


def test_repetition_penalty(models):
    ids, mask = padded_batch(lengths=(6, 4, 5))
    r, o = both(models, ids, mask, max_new_tokens=12, do_sample=False, repetition_penalty=1.8)
    assert torch.equal(r, o)


@pytest.mark.parametrize("kw", [
    dict(num_beams=3, length_penalty=1.0, early_stopping=False),
    dict(num_beams=4, num_return_sequences=2, length_penalty=0.5, early_stopping=True),
    dict(num_beams=2, early_stopping="never", length_penalty=2.0),
])
def test_beam_search(models, kw):
    ids, mask = padded_batch(lengths=(6, 4))
    eos = _eos_from_greedy(models, ids, mask, row=1, step=2)
    r, o = both(models, ids, mask, max_new_tokens=9, do_sample=False, eos_token_id=eos, pad_token_id=0, **kw)
    assert torch.equal(r, o)


def test_sampling_matches_reference_under_seed(models):
    ids, mask = padded_batch(lengths=(6, 4))
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, num_return_sequences=2)
    ref, ours = models
    torch.manual_seed(7)
    r = ref.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(7)
    o = ours.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(7)
    again = ours.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(o, again)
    assert torch.equal(r, o)


def test_top_k_1_is_greedy(models):
    _, ours = models
    ids, mask = padded_batch(lengths=(6, 4))
    greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    sampled = ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=1)
    assert torch.equal(greedy, sampled)


def test_generation_config_defaults_apply_unless_overridden(models):
    _, ours = models
    ids = torch.tensor([[5, 6, 7]])
    ours.generation_config = GenerationConfig(max_new_tokens=4, pad_token_id=0, eos_token_id=None)
    assert ours.generate(ids).shape == (1, 7)
    assert ours.generate(ids, max_new_tokens=2).shape == (1, 5)


@pytest.mark.parametrize("kw,message", [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(top_k=-3), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(stop_strings=["x"]), "tokenizer"),
])
def test_invalid_options(models, kw, message):
    _, ours = models
    with pytest.raises(ValueError, match=message):
        ours.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=kw.pop("max_new_tokens", 3), **kw)


def test_unknown_option_is_an_error(models):
    with pytest.raises(TypeError, match="do_smaple"):
        models[1].generate(torch.tensor([[5, 6]]), do_smaple=True)


def test_prompt_past_the_context(models):
    _, ours = models
    too_long = torch.randint(3, 90, (1, ours.config.max_position_embeddings + 1))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.generate(too_long, max_new_tokens=1)


# -- the filters, on hand-made logits ------------------------------------------------------------
LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])


def test_top_k_filter():
    out = sampling.top_k(LOGITS, 2)
    assert torch.isfinite(out).tolist() == [[True, False, False, False, True]]
    assert torch.equal(sampling.top_k(LOGITS, 0), LOGITS)


def test_top_p_filter():
    probs = LOGITS.softmax(-1)[0]  # 3.0 -> .636, 2.0 -> .234, 1.0 -> .086, ...
    assert probs[4] < 0.7 < probs[4] + probs[0]
    out = sampling.top_p(LOGITS, 0.7)
    assert torch.isfinite(out).tolist() == [[True, False, False, False, True]]
    assert torch.isfinite(sampling.top_p(LOGITS, 0.5)).sum() == 1


def test_min_p_filter():
    probs = LOGITS.softmax(-1)[0]
    threshold = 0.3 * probs.max()
    out = sampling.min_p(LOGITS, 0.3)
    assert torch.isfinite(out)[0].tolist() == (probs >= threshold).tolist()


def test_temperature_and_repetition_penalty():
    assert torch.allclose(sampling.temperature(LOGITS, 2.0), LOGITS / 2)
    out = sampling.repetition_penalty(LOGITS, torch.tensor([[0, 3]]), 2.0)
    assert out.tolist() == [[1.0, 1.0, 0.0, -2.0, 3.0]]


def test_suppress_forbids_only_ids_inside_the_vocabulary():
    from stablelm.generation.sampling import suppress

    scores = torch.randn(2, 10)
    out = suppress(scores, torch.tensor([3, 9, 10, 42, -1]))  # a config's eos may lie past a trimmed vocabulary
    want = scores.clone()
    want[:, [3, 9]] = -float("inf")
    assert torch.equal(out, want) and not torch.equal(scores, want)  # scores untouched
