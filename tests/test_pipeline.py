"""pipeline() against the reference's pipelines on a tiny checkpoint with a real BPE tokenizer."""

from __future__ import annotations

import pytest
import torch

import stablelm
from conftest import tiny_checkpoint, transformers_or_skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe")
    tiny_checkpoint(path)
    return path


def test_text_generation_matches_reference(ckpt):
    transformers = transformers_or_skip()
    ref = transformers.pipeline("text-generation", model=str(ckpt), dtype=torch.float32)
    ours = stablelm.pipeline("text-generation", model=str(ckpt), dtype=torch.float32)
    for kw in (dict(max_new_tokens=8, do_sample=False), dict(max_new_tokens=5, do_sample=False,
                                                             return_full_text=False)):
        assert ours("To be, or", **kw) == ref("To be, or", **kw)
        assert ours(["To be", "Whether 'tis"], **kw) == ref(["To be", "Whether 'tis"], **kw)


def test_text_generation_chat_matches_reference(ckpt):
    transformers = transformers_or_skip()
    ref = transformers.pipeline("text-generation", model=str(ckpt), dtype=torch.float32)
    ours = stablelm.pipeline("text-generation", model=str(ckpt), dtype=torch.float32)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"}]
    r = ref(chat, max_new_tokens=6, do_sample=False)
    o = ours(chat, max_new_tokens=6, do_sample=False)
    assert o == r
    assert o[0]["generated_text"][-1]["role"] == "assistant"


def test_text_generation_defaults_sample(ckpt):
    ours = stablelm.pipeline("text-generation", model=str(ckpt))
    assert ours.generate_defaults["do_sample"] is True and ours.generate_defaults["max_new_tokens"] == 256
    torch.manual_seed(0)
    a = ours("To be", max_new_tokens=6)
    torch.manual_seed(0)
    assert ours("To be", max_new_tokens=6) == a


@pytest.mark.parametrize("num_labels", [1, 3])
def test_text_classification_matches_reference(tmp_path, num_labels):
    transformers = transformers_or_skip()
    tiny_checkpoint(tmp_path, "StableLmForSequenceClassification", id2label={i: f"L{i}" for i in range(num_labels)})
    ref = transformers.pipeline("text-classification", model=str(tmp_path), dtype=torch.float32)
    ours = stablelm.pipeline("text-classification", model=str(tmp_path), dtype=torch.float32)
    texts = ["To be, or not to be", "the slings and arrows"]
    for kw in ({}, {"top_k": None}):
        r, o = ref(texts, **kw), ours(texts, **kw)
        assert _rounded(o) == _rounded(r)
        assert _rounded(ours(texts[0], **kw)) == _rounded(ref(texts[0], **kw))


def test_token_classification_matches_reference(tmp_path):
    transformers = transformers_or_skip()
    tiny_checkpoint(tmp_path, "StableLmForTokenClassification", id2label={0: "O", 1: "B-X", 2: "I-X"})
    ref = transformers.pipeline("token-classification", model=str(tmp_path), dtype=torch.float32)
    ours = stablelm.pipeline("token-classification", model=str(tmp_path), dtype=torch.float32)
    text = "To be, or not to be, that is the question"
    r, o = ref(text), ours(text)
    assert len(o) > 0
    assert _rounded(o) == _rounded(r)


def test_unknown_task():
    with pytest.raises(ValueError, match="summarization"):
        stablelm.pipeline("summarization", model="x")


def _rounded(x):
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: (round(float(v), 4) if k == "score" else _rounded(v) if isinstance(v, (list, dict)) else
                    (int(v) if hasattr(v, "item") else v)) for k, v in x.items()}
    return x
