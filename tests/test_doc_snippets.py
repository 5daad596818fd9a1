"""The two snippets of the StableLM documentation page run with only the import changed, offline, from the
hub cache, and print what the reference prints for the same weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import tiny_checkpoint, transformers_or_skip

REPO = "stabilityai/stablelm-3b-4e1t"
# The documentation's snippets as written, except device=0 (a GPU), which DEVICE stands for; the
# pipeline samples (its default), so both runs seed torch the same way first.
PIPELINE_SNIPPET = '''
import torch
from transformers import pipeline

torch.manual_seed(0)
pipe = pipeline(task="text-generation", model="stabilityai/stablelm-3b-4e1t", dtype=torch.bfloat16, device=DEVICE)
output = pipe("Plants create energy through a process known as")
print(output[0]["generated_text"])
'''
AUTO_SNIPPET = '''
import torch
from transformers import AutoTokenizer, AutoModelForCausalLM

tokenizer = AutoTokenizer.from_pretrained("stabilityai/stablelm-3b-4e1t")
model = AutoModelForCausalLM.from_pretrained("stabilityai/stablelm-3b-4e1t", dtype=torch.bfloat16, attn_implementation="sdpa")
input_ids = tokenizer("Plants create energy through a process known as", return_tensors="pt").to(model.device)
output = model.generate(**input_ids, max_length=50, cache_implementation="static")
print(tokenizer.decode(output[0], skip_special_tokens=True))
'''


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    """An HF_HOME whose hub cache holds a tiny checkpoint under the official repo id."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / f"models--{REPO.replace('/', '--')}"
    commit = "0" * 40
    tiny_checkpoint(repo / "snapshots" / commit, max_position_embeddings=512)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return home


def start(snippet: str, home, library: str) -> subprocess.Popen:
    code = snippet.replace("from transformers import", f"from {library} import").replace("DEVICE", '"cpu"')
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def output(proc: subprocess.Popen) -> str:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    return stdout


def test_snippets_print_the_reference_text(hub_home):
    """Both snippets, one after the other in one interpreter per library (an interpreter that imports
    transformers costs seconds), side by side."""
    transformers_or_skip()
    snippets = PIPELINE_SNIPPET + "print('-' * 8)\n" + AUTO_SNIPPET
    ours, reference = start(snippets, hub_home, "stablelm"), start(snippets, hub_home, "transformers")
    text = output(ours)
    pipeline_text, auto_text = text.split("-" * 8 + "\n")
    for printed in (pipeline_text, auto_text):
        assert printed.startswith("Plants create energy through a process known as")
    assert text == output(reference)
