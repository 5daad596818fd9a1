"""The bench's checkpoint handling (its measurements are commands, not tests)."""

import torch
from conftest import tiny_checkpoint

from stablelm import StableLmForCausalLM
from stablelm.bench import quantized_checkpoint


def test_quantized_checkpoint_is_saved_once_and_loads_as_quantizing_at_load(tmp_path):
    """Against llama.cpp's quantized GGUF, our side loads a quantized checkpoint saved beside the dense one:
    the same logits as quantizing while loading, written once (whole, by rename) and then reused."""
    dense = tmp_path / "tiny-bfloat16"
    tiny_checkpoint(dense, hidden_size=64, intermediate_size=128)
    ids = torch.tensor([[3, 17, 99, 250, 4]])
    for quantization in ("int8", "int4"):
        path = quantized_checkpoint(dense, quantization, "bfloat16")
        assert path == tmp_path / f"tiny-bfloat16-{quantization}" and (path / "config.json").exists()
        assert not list(tmp_path.glob(".*.tmp"))
        stamp = (path / "config.json").stat().st_mtime_ns
        assert quantized_checkpoint(dense, quantization, "bfloat16") == path
        assert (path / "config.json").stat().st_mtime_ns == stamp  # reused, not written again
        saved = StableLmForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        assert saved.quantization == quantization
        at_load = StableLmForCausalLM.from_pretrained(dense, dtype=torch.bfloat16, quantization=quantization)
        with torch.no_grad():
            assert torch.equal(saved(ids).logits, at_load(ids).logits), quantization
