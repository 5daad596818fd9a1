"""Checkpoints both ways with the reference, sharding, dtypes, the cache, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import stablelm
from conftest import TINY, VARIANTS, padded_batch, transformers_or_skip
from stablelm import StableLmConfig, StableLmForCausalLM

TOL = 1e-4


def tiny_model(seed=0, **overrides) -> StableLmForCausalLM:
    return StableLmForCausalLM.from_config(StableLmConfig(**{**TINY, **overrides}), seed=seed)


@pytest.mark.parametrize("variant", ["base", "tied", "stablelm2_12b", "everything", "rope_dynamic"])
def test_ours_loads_in_reference(variant, tmp_ckpt):
    transformers = transformers_or_skip()
    overrides = dict(VARIANTS[variant])
    if "rope_scaling" in overrides:
        overrides["rope_scaling"] = {"rope_type": overrides["rope_scaling"]["type"],
                                     "factor": overrides["rope_scaling"]["factor"]}
    ours = tiny_model(**overrides)
    ours.save_pretrained(tmp_ckpt, max_shard_size="20KB")
    assert (tmp_ckpt / "model.safetensors.index.json").exists()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_ckpt, dtype=torch.float32).eval()
    assert ref.config.qk_layernorm == ours.config.qk_layernorm
    assert ref.config.rope_parameters["rope_type"] == ours.config.rope_type
    ids, mask = padded_batch(lengths=(12, 9) if variant == "rope_dynamic" else (7, 5))
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask).logits
        o = ours(input_ids=ids, attention_mask=mask).logits
    assert (o[mask.bool()] - r[mask.bool()]).abs().max() < TOL


def test_reference_reads_our_config_keys(tmp_ckpt):
    transformers = transformers_or_skip()
    cfg = StableLmConfig(**{**TINY, "num_key_value_heads": 2, "use_qkv_bias": True, "partial_rotary_factor": 0.5,
                            "rope_theta": 500.0, "rope_scaling": {"type": "linear", "factor": 4.0}})
    StableLmForCausalLM.from_config(cfg).save_pretrained(tmp_ckpt)
    ref_cfg = transformers.AutoConfig.from_pretrained(tmp_ckpt)
    assert ref_cfg.rope_parameters["rope_theta"] == 500.0
    assert ref_cfg.rope_parameters["partial_rotary_factor"] == 0.5
    assert ref_cfg.rope_parameters["factor"] == 4.0
    assert ref_cfg.num_key_value_heads == 2 and ref_cfg.use_qkv_bias


def test_config_reads_4x_5x_and_legacy_layouts():
    v4 = {"model_type": "stablelm", "rope_theta": 1000, "partial_rotary_factor": 0.5,
          "rope_scaling": {"type": "dynamic", "factor": 2.0}, "torch_dtype": "bfloat16"}
    v5 = {"model_type": "stablelm", "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000,
                                                        "partial_rotary_factor": 0.5}, "dtype": "bfloat16"}
    legacy = {"model_type": "stablelm", "rope_pct": 0.5, "norm_eps": 1e-6, "rope_theta": 1000,
              "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    for data in (v4, v5, legacy):
        cfg = StableLmConfig.from_dict(data)
        assert (cfg.rope_theta, cfg.partial_rotary_factor, cfg.rope_type) == (1000.0, 0.5, "dynamic")
        assert cfg.rope_scaling["factor"] == 2.0
        assert StableLmConfig.from_dict(cfg.to_dict()) == cfg
    assert StableLmConfig.from_dict(legacy).layer_norm_eps == 1e-6
    assert StableLmConfig.from_dict(v4).dtype == "bfloat16"
    assert StableLmConfig.from_dict({"eos_token_id": [0, 7]}).eos_token_ids == [0, 7]
    cfg = StableLmConfig.from_dict({"custom_key": 3, "quantization_config": {"bits": 8}})
    assert cfg.to_dict()["custom_key"] == 3


@pytest.mark.parametrize("key,value,message", [
    ("hidden_size", 30, "hidden_size"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("num_hidden_layers", -1, "num_hidden_layers"),
    ("vocab_size", 0, "vocab_size"),
    ("intermediate_size", "big", "intermediate_size"),
    ("partial_rotary_factor", 0.0, "partial_rotary_factor"),
    ("rope_scaling", {"type": "yarnish", "factor": 2.0}, "rope_type"),
    ("rope_scaling", {"type": "linear", "factor": 0}, "factor"),
    ("rope_scaling", {"type": "linear", "factor": -2.0}, "factor"),
    ("layer_norm_eps", 0, "layer_norm_eps"),
    ("hidden_act", "gelu", "hidden_act"),
])
def test_invalid_config_values_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        StableLmConfig(**{**TINY, key: value})


def test_other_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="llama"):
        stablelm.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="llama"):
        stablelm.AutoConfig.from_pretrained(tmp_path)


def test_broken_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        StableLmForCausalLM.from_pretrained(tmp_path)


def _saved(tmp_ckpt, **kw):
    model = tiny_model(**kw)
    model.save_pretrained(tmp_ckpt)
    return model, tmp_ckpt / "model.safetensors"


def test_missing_tensor(tmp_ckpt):
    _, path = _saved(tmp_ckpt)
    state = load_file(path)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path)
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        StableLmForCausalLM.from_pretrained(tmp_ckpt)


def test_misshaped_tensor(tmp_ckpt):
    _, path = _saved(tmp_ckpt)
    state = load_file(path)
    state["model.norm.weight"] = torch.ones(31)
    save_file(state, path)
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(31,\)"):
        StableLmForCausalLM.from_pretrained(tmp_ckpt)


def test_unexpected_tensor(tmp_ckpt):
    _, path = _saved(tmp_ckpt)
    state = load_file(path)
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)  # only with use_qkv_bias
    save_file(state, path)
    with pytest.raises(ValueError, match="q_proj.bias"):
        StableLmForCausalLM.from_pretrained(tmp_ckpt)


def test_truncated_safetensors(tmp_ckpt):
    _, path = _saved(tmp_ckpt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        StableLmForCausalLM.from_pretrained(tmp_ckpt)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_truncated_quantized_checkpoint(tmp_ckpt, quantization):
    """A quantized checkpoint's projections are read as their modules are built: a cut file still fails
    with the file's name, before anything is built from it."""
    StableLmForCausalLM.from_pretrained(_saved(tmp_ckpt, hidden_size=64, intermediate_size=128)[1].parent,
                                        quantization=quantization).save_pretrained(
        tmp_ckpt / "q")
    path = tmp_ckpt / "q" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        StableLmForCausalLM.from_pretrained(tmp_ckpt / "q")


def test_missing_shard(tmp_ckpt):
    tiny_model().save_pretrained(tmp_ckpt, max_shard_size="20KB")
    next(tmp_ckpt.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002"):
        StableLmForCausalLM.from_pretrained(tmp_ckpt)


def test_pickle_needs_allow_pickle(tmp_ckpt):
    model, path = _saved(tmp_ckpt)
    torch.save(load_file(path), tmp_ckpt / "pytorch_model.bin")
    path.unlink()
    with pytest.raises(ValueError, match="allow_pickle"):
        StableLmForCausalLM.from_pretrained(tmp_ckpt)
    loaded = StableLmForCausalLM.from_pretrained(tmp_ckpt, allow_pickle=True, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():  # loaded uses the prepacked fast path, model plain nn.Linear: same up to fp32 rounding
        assert (loaded(ids).logits - model(ids).logits).abs().max() < 1e-6


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such"):
        StableLmForCausalLM.from_pretrained(tmp_path / "no-such")


def test_failed_save_keeps_the_old_checkpoint(tmp_ckpt, monkeypatch):
    model, path = _saved(tmp_ckpt)
    before = {p.name: p.read_bytes() for p in tmp_ckpt.iterdir()}
    other = tiny_model(seed=1)
    import stablelm.io.checkpoint as ck

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(tmp_ckpt)
    assert {p.name: p.read_bytes() for p in tmp_ckpt.iterdir()} == before


def test_resave_with_fewer_shards_removes_stale_ones(tmp_ckpt):
    model = tiny_model()
    model.save_pretrained(tmp_ckpt, max_shard_size="20KB")
    (tmp_ckpt / "tokenizer.json").write_text("{}")  # other files in the folder are left alone
    model.save_pretrained(tmp_ckpt)
    assert sorted(p.name for p in tmp_ckpt.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    StableLmForCausalLM.from_pretrained(tmp_ckpt)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_auto_follows_the_checkpoint(dtype, tmp_ckpt):
    tiny_model().to(dtype).save_pretrained(tmp_ckpt)
    assert json.loads((tmp_ckpt / "config.json").read_text())["dtype"] == str(dtype)[6:]
    assert StableLmForCausalLM.from_pretrained(tmp_ckpt).dtype == dtype
    assert StableLmForCausalLM.from_pretrained(tmp_ckpt, dtype="float32").dtype == torch.float32
    assert StableLmForCausalLM.from_pretrained(tmp_ckpt, torch_dtype=torch.float32).dtype == torch.float32


def test_heads_load_from_a_causal_lm_checkpoint(tmp_ckpt):
    model, _ = _saved(tmp_ckpt)
    with pytest.warns(UserWarning, match="score.weight"):
        cls = stablelm.AutoModelForSequenceClassification.from_pretrained(tmp_ckpt, num_labels=3)
    assert cls.score.weight.shape == (3, 32) and cls.score.weight.is_floating_point()
    ours = cls.state_dict()  # the reference's names, also from the fused inference layout
    assert torch.equal(ours["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.gate_up_proj.up_proj.weight)
    assert "score.weight" in ours
    backbone = stablelm.AutoModel.from_pretrained(tmp_ckpt)
    assert torch.equal(backbone.norm.weight, model.model.norm.weight)


def test_hub_id_through_the_hub_cache(tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache layout, offline."""
    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-stablelm" / "snapshots" / ("a" * 40)
    tiny_model().save_pretrained(snap)
    (cache / "models--someone--tiny-stablelm" / "refs").mkdir()
    (cache / "models--someone--tiny-stablelm" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = StableLmForCausalLM.from_pretrained("someone/tiny-stablelm", cache_dir=str(cache))
    assert model.config.hidden_size == 32
    with pytest.raises(FileNotFoundError, match="someone/absent"):
        StableLmForCausalLM.from_pretrained("someone/absent", cache_dir=str(cache))


def test_loading_stays_light(tmp_path):
    """from_pretrained leaves nn.init as it was and never imports torch._dynamo (that alone costs ~1 s)."""
    import subprocess
    import sys

    from conftest import tiny_checkpoint

    tiny_checkpoint(tmp_path / "ckpt", hidden_size=64, intermediate_size=128)
    code = ("import sys, torch, stablelm\n"
            "normal = torch.nn.init.normal_\n"
            f"m = stablelm.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r})\n"
            "assert torch.nn.init.normal_ is normal\n"
            "assert m.inference_kind == 'mkldnn'\n"
            "print('torch._dynamo' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
