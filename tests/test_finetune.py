"""Fine-tuning: each head trains like transformers (full) and PEFT (LoRA), bad data is refused before any
step, outputs load back, and an interrupted run resumes."""

from __future__ import annotations

import json

import pytest
import torch

import stablelm
from conftest import padded_batch, reference_model, tiny_tokenizer
from stablelm.training import finetune as ft
from stablelm.layers import lora

VARIANT = dict(num_key_value_heads=2, use_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
               classifier_dropout=0.0)
HEADS = {"StableLmForCausalLM": {}, "StableLmForSequenceClassification": {"num_labels": 3},
         "StableLmForTokenClassification": {"num_labels": 4}}


def _labels(cls_name, ids, mask):
    if cls_name == "StableLmForSequenceClassification":
        return torch.tensor([0, 2, 1])
    if cls_name == "StableLmForTokenClassification":
        return (ids % 4).masked_fill(mask == 0, -100)
    return ids.masked_fill(mask == 0, -100)


def _steps(model, ids, mask, labels, n=4):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(n):
        optimizer.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cls_name", list(HEADS))
def test_full_finetuning_matches_transformers(cls_name, tmp_path):
    ref = reference_model(cls_name, {**VARIANT, **HEADS[cls_name]}, seed=5)
    ref.save_pretrained(tmp_path)
    ours = getattr(stablelm, cls_name).from_pretrained(tmp_path, fast_inference=False).train()
    ref.train()
    ids, mask = padded_batch(seed=6, lengths=(9, 7, 8), side="right")
    labels = _labels(cls_name, ids, mask)
    theirs, mine = _steps(ref, ids, mask, labels), _steps(ours, ids, mask, labels)
    assert max(abs(a - b) for a, b in zip(theirs, mine)) < 1e-4, (theirs, mine)


@pytest.mark.parametrize("cls_name,task", [("StableLmForSequenceClassification", "SEQ_CLS"),
                                           ("StableLmForTokenClassification", "TOKEN_CLS")])
def test_lora_on_a_head_matches_peft(cls_name, task, tmp_path):
    peft = pytest.importorskip("peft", reason="the LoRA parity tests compare with PEFT (requirements-test.txt)")
    ref = reference_model(cls_name, {**VARIANT, **HEADS[cls_name]}, seed=7)
    ref.save_pretrained(tmp_path / "base")
    peft_model = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          task_type=task))
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = getattr(stablelm, cls_name).from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter",
                                                      merge_adapter=False).train()
    peft_model.train()
    ids, mask = padded_batch(seed=8, lengths=(9, 7, 8), side="right")
    labels = _labels(cls_name, ids, mask)
    theirs, mine = _steps(peft_model, ids, mask, labels), _steps(ours, ids, mask, labels)
    assert max(abs(a - b) for a, b in zip(theirs, mine)) < 1e-4, (theirs, mine)
    lora.save_adapter(ours, tmp_path / "ours")  # with the trained head, as PEFT's modules_to_save
    transformers = pytest.importorskip("transformers")
    again = peft.PeftModel.from_pretrained(getattr(transformers, cls_name).from_pretrained(tmp_path / "base"),
                                           tmp_path / "ours").eval()
    with torch.no_grad():
        diff = (again(input_ids=ids, attention_mask=mask).logits
                - ours.eval()(input_ids=ids, attention_mask=mask).logits).abs().max()
    assert diff < 1e-5


@pytest.fixture
def base(tmp_path):
    from conftest import tiny_checkpoint

    tiny_checkpoint(tmp_path / "base", max_position_embeddings=128)
    return tmp_path / "base"


def _opts(base, tmp_path, **kw):
    return ft.FinetuneOptions(model=str(base), out=str(tmp_path / "out"), progress=False, batch_size=4,
                              lr=5e-3, **kw)


TEXTS = ["To be, or not to be, that is the question:", "Or to take arms against a sea of troubles"]


@pytest.mark.parametrize("task,records,message", [
    ("sequence-classification", [{"text": "x"}], "need a non-empty 'text' and a 'label'"),
    ("sequence-classification", [{"text": "x", "label": 5}, {"text": "y", "label": 0}], "label 5 is out of range"),
    ("sequence-classification", [], "no records"),
    ("token-classification", [{"tokens": ["a", "b"], "labels": ["X"]}], "lists of equal"),
    ("causal-lm", [{"messages": [{"role": "user", "content": "hi"}]}], "at least one assistant message"),
    ("causal-lm", [{"prompt": "x"}], "need a non-empty 'text', or 'messages'"),
])
def test_bad_data_is_refused_before_any_step(base, tmp_path, task, records, message):
    opts = _opts(base, tmp_path, task=task, labels=["a", "b"] if "label 5" in message else None)
    with pytest.raises(ValueError, match=message):
        ft.finetune(opts, records)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_unknown_target_modules_are_refused(base, tmp_path):
    with pytest.raises(ValueError, match="unknown: \\['attn'\\]"):
        ft.finetune(_opts(base, tmp_path, lora_targets=("attn",)), [{"text": t} for t in TEXTS])


def test_chat_records_learn_only_the_assistant_turns():
    tok = tiny_tokenizer()
    messages = [{"role": "user", "content": "To be"}, {"role": "assistant", "content": "or not to be"},
                {"role": "user", "content": "that is"}, {"role": "assistant", "content": "the question"}]
    example = ft._causal({"messages": messages}, tok, 512, "test")
    learned = tok.decode([i for i, label in zip(example["input_ids"], example["labels"]) if label != -100])
    assert "or not to be" in learned and "the question" in learned
    assert "To be" not in learned.replace("not to be", "") and "that is" not in learned


@pytest.mark.parametrize("task,records", [
    ("causal-lm", [{"text": t} for t in TEXTS] * 8),
    ("sequence-classification", [{"text": t, "label": ["hamlet", "sea"][i % 2]} for i, t in enumerate(TEXTS * 8)]),
    ("token-classification", [{"tokens": t.split(), "labels": ["W" if w.isalpha() else "P" for w in t.split()]}
                              for t in TEXTS * 8]),
])
def test_each_task_learns_and_its_adapter_loads_back(base, tmp_path, task, records):
    result = ft.finetune(_opts(base, tmp_path, task=task, max_steps=12, eval_fraction=0.25), records)
    assert result.history["train"][-1][1] < result.history["train"][0][1]
    out = tmp_path / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "tokenizer.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 12 and "loss" in metrics
    cls = {"causal-lm": stablelm.AutoModelForCausalLM, "sequence-classification":
           stablelm.AutoModelForSequenceClassification,
           "token-classification": stablelm.AutoModelForTokenClassification}[task]
    model = cls.from_pretrained(base, adapter=out)  # merged, head size read from the adapter
    examples = ft.prepare(task, records[:4], stablelm.AutoTokenizer.from_pretrained(base),
                          result.metrics["options"]["labels"] or ft._label_names(task, records, "test"), 64, "test")
    again = ft.evaluate(model, examples, ft.FinetuneOptions(task=task, batch_size=4), model.config.pad_token_id)
    assert again["loss"] < result.history["train"][0][1]


def test_full_finetuning_writes_a_checkpoint(base, tmp_path):
    ft.finetune(_opts(base, tmp_path, method="full", max_steps=3), [{"text": t} for t in TEXTS] * 4)
    model = stablelm.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.generate(torch.tensor([[5, 6]]), max_new_tokens=3).shape == (1, 5)


def test_an_interrupted_run_resumes(base, tmp_path, monkeypatch):
    records = [{"text": t} for t in TEXTS] * 8

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora, "save_adapter", crash)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(_opts(base, tmp_path, max_steps=4, eval_every=2), records)
    assert (tmp_path / "out" / "finetune_state.pt").exists()
    monkeypatch.undo()
    result = ft.finetune(_opts(base, tmp_path, max_steps=6, eval_every=2), records)
    assert [s for s, _ in result.history["train"]] == [1, 2, 3, 4, 5, 6]  # steps 5-6 continued from 4
    assert not (tmp_path / "out" / "finetune_state.pt").exists()


def test_resume_state_is_written_whole_and_checked(base, tmp_path, monkeypatch):
    """Issue 27 item 4: a kill during the periodic save left finetune_state.pt at 0 bytes (33 steps lost, then
    "internal error: EOFError"); resuming with other LoRA targets loaded q_proj's weights into o_proj."""
    records = [{"text": t} for t in TEXTS] * 8
    state = tmp_path / "out" / "finetune_state.pt"
    real_save = torch.save
    saves = {"n": 0}

    def killed_during_the_second_save(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # as kill -9 would: part of the bytes written, then nothing more
            f.write(b"PK\x03\x04 partial")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", killed_during_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(_opts(base, tmp_path, max_steps=6, eval_every=2), records)
    monkeypatch.undo()
    assert torch.load(state, weights_only=True)["step"] == 2  # the first save, whole
    assert [p.name for p in state.parent.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(ValueError, match=r"lora_targets \(\['o_proj'\]\) differs .* \(\['k_proj', 'o_proj', "
                                         r"'q_proj', 'v_proj'\]\)"):
        ft.finetune(_opts(base, tmp_path, max_steps=6, eval_every=2, lora_targets=("o_proj",)), records)
    with pytest.raises(ValueError, match=r"lora_r \(4\) differs"):
        ft.finetune(_opts(base, tmp_path, max_steps=6, eval_every=2, lora_r=4), records)
    with pytest.raises(ValueError, match=r"method \('full'\) differs"):
        ft.finetune(_opts(base, tmp_path, max_steps=6, eval_every=2, method="full"), records)
    result = ft.finetune(_opts(base, tmp_path, max_steps=6, eval_every=2), records)
    assert [s for s, _ in result.history["train"]] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("damage", [b"", b"not a torch file", "truncated"])
def test_a_damaged_resume_state_is_named(base, tmp_path, monkeypatch, damage):
    records = [{"text": t} for t in TEXTS] * 8
    monkeypatch.setattr(lora, "save_adapter", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(_opts(base, tmp_path, max_steps=2, eval_every=2), records)
    monkeypatch.undo()
    state = tmp_path / "out" / "finetune_state.pt"
    state.write_bytes(state.read_bytes()[:len(state.read_bytes()) // 2] if damage == "truncated" else damage)
    with pytest.raises(ValueError, match=f"{state}: the saved fine-tuning state is damaged .* delete"):
        ft.finetune(_opts(base, tmp_path, max_steps=4, eval_every=2), records)


def test_lora_over_an_int8_base(base, tmp_path):
    """The frozen projections are int8 buffers; the adapters' gradients equal those of a model whose base
    holds the same (dequantized) weights in fp32; training runs through the CLI's option too."""
    model = stablelm.AutoModelForCausalLM.from_pretrained(base, fast_inference=False)
    reference = stablelm.AutoModelForCausalLM.from_pretrained(base, fast_inference=False)
    config = lora.LoraConfig(r=4, lora_alpha=8)
    lora.add_lora(model, config, int8_base=True)
    int8 = [m for m in model.modules() if isinstance(m, lora.FrozenInt8Linear)]
    assert len(int8) == 7 * model.config.num_hidden_layers and all(m.q.dtype == torch.int8 for m in int8)
    with torch.no_grad():  # the reference's projections hold exactly the int8 values
        for name, module in model.named_modules():
            if isinstance(module, lora.FrozenInt8Linear):
                reference.get_submodule(name.removesuffix(".base_layer")).weight.copy_(module.dequantized())
    lora.add_lora(reference, config)
    with torch.no_grad():
        ref_params = dict(reference.named_parameters())
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.01)  # B starts at zero: nudge it so the gradients reach A too
                ref_params[n].copy_(p)
    ids = torch.tensor([[5, 9, 11, 4, 7, 8]])
    model(ids, labels=ids).loss.backward()
    reference(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad and "lora_" in n}
    assert grads.keys() == ref_grads.keys() and all(torch.allclose(grads[n], ref_grads[n], atol=1e-6) for n in grads)
    result = ft.finetune(_opts(base, tmp_path, int8_base=True, max_steps=6), [{"text": t} for t in TEXTS] * 8)
    assert result.history["train"][-1][1] < result.history["train"][0][1]


def test_csv_data_gradient_accumulation_and_the_merge_command(base, tmp_path):
    import subprocess
    import sys

    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f'"{t}",{["hamlet", "sea"][i % 2]}\n' for i, t in enumerate(TEXTS * 6)))
    result = ft.finetune(_opts(base, tmp_path, task="sequence-classification", max_steps=4, grad_accum=2), data)
    assert result.metrics["steps"] == 4 and result.metrics["train_examples"] == 11
    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "stablelm.cli", "merge", str(tmp_path / "out"), str(merged),
                           "--model", str(base), "--task", "sequence-classification"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    transformers = pytest.importorskip("transformers")
    reference = transformers.StableLmForSequenceClassification.from_pretrained(merged).eval()
    ours = stablelm.AutoModelForSequenceClassification.from_pretrained(base, adapter=tmp_path / "out")
    ids = torch.tensor([[5, 9, 11, 4]])
    with torch.no_grad():
        assert (reference(ids).logits - ours(ids).logits).abs().max() < 1e-5
