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


def test_every_result_records_the_code_command_and_cpu(monkeypatch):
    """The bench's JSON names the commit (and whether the tree was dirty), the command and the CPU's features."""
    import argparse
    import re
    import sys
    from pathlib import Path

    from stablelm import bench

    monkeypatch.setattr(sys, "argv", ["stablelm", "bench", "--shape", "stablelm-2-1_6b", "--layers", "2"])
    machine = bench._machine(argparse.Namespace(threads=None, quantization="none", dtype="bfloat16",
                                                linear_format=None))
    assert machine["command"] == "stablelm bench --shape stablelm-2-1_6b --layers 2"
    assert machine["cpu"] and isinstance(machine["cpu_flags"], list) and machine["linear_format"]
    if (Path(bench.__file__).resolve().parents[2] / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", machine["commit"]) and isinstance(machine["dirty"], bool)


def test_the_measurements_index_lists_every_file():
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "measurements_index.py"
    proc = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
