"""Shared helpers: tiny seeded checkpoints written by the reference (transformers) or by us."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NEOX_TOKENIZER = ROOT.parent / "shared" / "data" / "gpt-neox-20b" / "tokenizer.json"

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Every architecture option and the combinations the official checkpoints use.
VARIANTS = {
    "base": {},
    "qkv_bias": dict(use_qkv_bias=True),
    "qk_layernorm": dict(qk_layernorm=True),
    "parallel_residual": dict(use_parallel_residual=True),
    "gqa": dict(num_key_value_heads=2),
    "full_rotary": dict(partial_rotary_factor=1.0),
    "rope_linear": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    "rope_dynamic": dict(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=8,
                         partial_rotary_factor=0.5),
    "tied": dict(tie_word_embeddings=True),
    "stablelm2_1_6b": dict(use_qkv_bias=True),
    "stablelm2_12b": dict(num_key_value_heads=2, qk_layernorm=True, use_parallel_residual=True),
    "everything": dict(num_key_value_heads=1, use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True,
                       partial_rotary_factor=0.5, rope_scaling={"type": "linear", "factor": 3.0}),
}


def transformers_or_skip():
    return pytest.importorskip("transformers", reason="the reference (transformers) is a test dependency; "
                               "pip install -r requirements-test.txt")


def perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (LayerNorm weights and biases too) seeded random values of a sane size."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if "layernorm" in name or name.endswith("norm.weight") else noise * 2)


def reference_model(cls_name: str, overrides: dict, seed: int = 0, **extra):
    transformers = transformers_or_skip()
    config = transformers.StableLmConfig(**{**TINY, **overrides, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    perturb_(model, seed)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def padded_batch(seed: int = 0, lengths=(7, 4, 6), vocab: int = 97, side: str = "left"):
    """input_ids and attention_mask for rows of the given lengths, padded with id 0."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        row = torch.randint(3, vocab, (n,), generator=g)
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, sl], mask[i, sl] = row, 1
    return ids, mask


@pytest.fixture(autouse=True)
def _restore_grad_mode():
    """In-process CLI calls switch autograd off for the process, as the CLI should; not for the next test."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


@pytest.fixture
def tmp_ckpt(tmp_path):
    return tmp_path / "ckpt"


SAMPLE_TEXT = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles and by opposing end them.",
    "Caf\u00e9 na\u00efve \u65e5\u672c \U0001F916 -- unicode too.",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE of 300 tokens trained on a few lines (ids 0, 1 = end-of-text, padding)."""
    from stablelm.training.train import train_tokenizer

    tok = train_tokenizer(SAMPLE_TEXT * 20, 300)
    tok.chat_template = chat_template
    return tok


def tiny_checkpoint(path, cls_name: str = "StableLmForCausalLM", seed: int = 0, **overrides):
    """Our model (vocab 320, ids 0 = eos/bos, 1 = pad) and tokenizer saved to `path`."""
    import stablelm

    config = stablelm.StableLmConfig(**{**TINY, "vocab_size": 320, "bos_token_id": 0, "eos_token_id": 0,
                                        "pad_token_id": 1, **overrides})
    model = getattr(stablelm, cls_name).from_config(config, seed=seed)
    perturb_(model, seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`stablelm serve` as a real process on a free loopback port (stdout and stderr to `log`)."""

    def __init__(self, model, *extra, log=None):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        out = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "stablelm.cli", "serve", "--model", str(model),
                                      "--port", str(self.port), "--model-name", "tiny", *extra],
                                     stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300  # a loaded machine: imports and loading take far longer than quietly
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                raise RuntimeError(open(log).read() if log else f"the server exited with {self.proc.returncode}")
        raise RuntimeError("the server did not start")

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=5).json()

    def wait_idle(self, timeout: float = 10) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.health()
            if h["batch_size"] == 0 and h["queue_depth"] == 0:
                return h
            time.sleep(0.05)
        return self.health()

    def rss(self) -> int:
        """Resident memory of the server process, bytes."""
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` s; the exit status (None when it had to be killed)."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
