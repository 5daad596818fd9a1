"""Our tokenizer against the reference's on the real GPT-NeoX-20B tokenizer.json, and chat templates."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import stablelm
from conftest import NEOX_TOKENIZER, transformers_or_skip

TEXTS = [
    "The weather is always wonderful",
    "",
    " leading space and trailing   ",
    "Tabs\tand\nnewlines\r\n\n\nand    runs      of spaces",
    "Unicode: café naïve 日本語 한국어 emoji 🤖🚀 e\u0301 (combining) ﬁ ligature",
    "Code: def f(x):\n    return x ** 2  # comment\n",
    "special <|endoftext|> inside <|padding|> text",
    "numbers 1234567890 3.14159 -42 1e-5",
    "Ünïcödé ŝtrïñg wïth àccënts and Ελληνικά and русский",
]
NEOX_CONFIG = {"add_bos_token": False, "add_eos_token": False, "bos_token": "<|endoftext|>",
               "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 4096,
               "tokenizer_class": "GPTNeoXTokenizer", "clean_up_tokenization_spaces": True}


@pytest.fixture(scope="module")
def neox_folder(tmp_path_factory):
    if not NEOX_TOKENIZER.exists():
        pytest.skip(f"the GPT-NeoX-20B tokenizer is not at {NEOX_TOKENIZER}")
    folder = tmp_path_factory.mktemp("neox")
    shutil.copy(NEOX_TOKENIZER, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(NEOX_CONFIG))
    return folder


@pytest.fixture(scope="module")
def pair(neox_folder):
    transformers = transformers_or_skip()
    return stablelm.AutoTokenizer.from_pretrained(neox_folder), transformers.AutoTokenizer.from_pretrained(neox_folder)


def test_known_ids(neox_folder):
    tok = stablelm.AutoTokenizer.from_pretrained(neox_folder)
    assert tok("The weather is always wonderful").input_ids == [510, 8588, 310, 1900, 9386]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 0, 1)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_decode_match_reference(pair, text):
    ours, ref = pair
    assert ours(text).input_ids == ref(text).input_ids
    ids = ref(text).input_ids
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_reference(pair, side):
    ours, ref = pair
    o = ours(TEXTS, padding=True, padding_side=side, return_tensors="pt")
    r = ref(TEXTS, padding=True, padding_side=side, return_tensors="pt")
    assert torch.equal(o.input_ids, r.input_ids) and torch.equal(o.attention_mask, r.attention_mask)
    assert ours.batch_decode(o.input_ids, skip_special_tokens=True) == ref.batch_decode(
        r.input_ids, skip_special_tokens=True)


def test_truncation_and_max_length_padding(pair):
    ours, ref = pair
    kw = dict(truncation=True, max_length=6, padding="max_length")
    assert ours(TEXTS, **kw).input_ids == ref(TEXTS, **kw).input_ids
    assert ours(TEXTS, **kw).attention_mask == ref(TEXTS, **kw).attention_mask


def test_add_bos_token(neox_folder, tmp_path):
    # transformers 5.24's GPTNeoXTokenizer ignores add_bos_token from tokenizer_config.json and honours
    # it only as a from_pretrained keyword; we honour the file, as 4.x did.
    transformers = transformers_or_skip()
    shutil.copy(neox_folder / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**NEOX_CONFIG, "add_bos_token": True}))
    ours = stablelm.AutoTokenizer.from_pretrained(tmp_path)("hi there").input_ids
    assert ours[0] == 0
    assert ours == transformers.AutoTokenizer.from_pretrained(neox_folder, add_bos_token=True)("hi there").input_ids


def test_save_round_trip_loads_in_reference(pair, tmp_path):
    ours, ref = pair
    ours.save_pretrained(tmp_path)
    again = transformers_or_skip().AutoTokenizer.from_pretrained(tmp_path)
    assert again(TEXTS).input_ids == ref(TEXTS).input_ids
    assert stablelm.AutoTokenizer.from_pretrained(tmp_path)(TEXTS).input_ids == ref(TEXTS).input_ids


TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_chat_template_matches_reference(neox_folder, tmp_path):
    transformers = transformers_or_skip()
    shutil.copy(neox_folder / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**NEOX_CONFIG, "chat_template": TEMPLATE}))
    ours = stablelm.AutoTokenizer.from_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ünïcode"}]
    for gen in (False, True):
        assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == \
            ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    o = ours.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    r = ref.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    assert torch.equal(o["input_ids"], r["input_ids"])


def test_chat_template_is_sandboxed(neox_folder, tmp_path):
    shutil.copy(neox_folder / "tokenizer.json", tmp_path / "tokenizer.json")
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**NEOX_CONFIG, "chat_template": evil}))
    tok = stablelm.AutoTokenizer.from_pretrained(tmp_path)
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):
        tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_no_chat_template_is_a_clear_error(neox_folder):
    tok = stablelm.AutoTokenizer.from_pretrained(neox_folder)
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_from_pretrained_keywords_override_the_config(neox_folder):
    tok = stablelm.AutoTokenizer.from_pretrained(neox_folder, padding_side="left", pad_token="<|endoftext|>")
    assert tok.padding_side == "left" and tok.pad_token_id == 0
    enc = tok(["a b c", "a"], padding=True)
    assert enc.input_ids[1][0] == 0 and enc.attention_mask[1][0] == 0
