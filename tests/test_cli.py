"""The command line: generate and chat end to end in a subprocess; errors, help and quantize through the same
main() in this process (an interpreter's start costs seconds; main is all `python -m stablelm` runs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import stablelm
from conftest import tiny_checkpoint


def cli(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "stablelm.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def in_process(capsys, *args):
    """main(args) here: (exit code, stdout, stderr)."""
    from stablelm.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:  # argparse: --help and bad option values
        code = e.code
    printed = capsys.readouterr()
    return code, printed.out, printed.err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    tiny_checkpoint(path, max_position_embeddings=512)
    return path


def test_cli_generate_streams_greedy_text(ckpt):
    proc = cli("generate", "To be, or", "--model", str(ckpt), "--max-new-tokens", "10", "--greedy")
    assert proc.returncode == 0, proc.stderr
    model = stablelm.AutoModelForCausalLM.from_pretrained(ckpt)
    tok = stablelm.AutoTokenizer.from_pretrained(ckpt)
    ids = tok("To be, or", return_tensors="pt")["input_ids"]
    expected = tok.decode(model.generate(ids, max_new_tokens=10, do_sample=False)[0], skip_special_tokens=True)
    assert proc.stdout == expected + "\n"


def test_cli_chat_keeps_history(ckpt):
    proc = cli("chat", "--model", str(ckpt), "--max-new-tokens", "5", "--greedy", "--system", "Be brief.",
               stdin="Hello there\nAnd again\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") >= 2


def test_chat_sends_the_history(ckpt, monkeypatch):
    import io

    from stablelm import cli as cli_module
    from stablelm.io.tokenizer import Tokenizer

    seen = []
    original = Tokenizer.apply_chat_template

    def spy(self, conversation, **kw):
        seen.append([dict(m) for m in conversation])
        return original(self, conversation, **kw)

    monkeypatch.setattr(Tokenizer, "apply_chat_template", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nAnd again\n"))
    assert cli_module.main(["chat", "--model", str(ckpt), "--max-new-tokens", "4", "--greedy",
                            "--system", "Be brief."]) == 0
    assert [m["role"] for m in seen[-1]] == ["system", "user", "assistant", "user"]
    assert seen[-1][1]["content"] == "Hello there" and seen[-1][3]["content"] == "And again"


@pytest.mark.parametrize("args,message", [
    (["generate", "x", "--model", "/no/such/folder"], "no such checkpoint folder"),
    (["generate", "x", "--temperature", "0", "--sample"], "temperature"),
    (["generate", "x", "--top-p", "1.5"], "top_p"),
])
def test_cli_errors_are_one_line(ckpt, args, message, capsys):
    if "--model" not in args:
        args = args + ["--model", str(ckpt)]
    code, _, err = in_process(capsys, *args)
    assert code != 0
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_bad_option_value(capsys):
    code, _, err = in_process(capsys, "generate", "x", "--max-new-tokens", "-3")
    assert code == 2 and "max-new-tokens" in err and "Traceback" not in err


def test_cli_help_explains_options(capsys):
    code, out, _ = in_process(capsys, "generate", "--help")
    assert code == 0
    for option in ("--model", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed", "demo"):
        assert option in out


def test_cli_quantize_writes_a_loadable_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    tiny_checkpoint(ckpt, hidden_size=64, intermediate_size=128)  # int4 groups are 64 inputs wide
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(["To be, or not to be, that is the question."] * 40))
    out = tmp_path / "q4"
    code, _, err = in_process(capsys, "quantize", str(out), "--model", str(ckpt), "--calibration", str(text),
                              "--samples", "4", "--seq-len", "16")
    assert code == 0, err
    model = stablelm.AutoModelForCausalLM.from_pretrained(out)
    assert model.quantization == "int4" and model.model.layers[0].mlp.down_proj.quantization == "int8"
    assert stablelm.AutoTokenizer.from_pretrained(out)("To be").input_ids
    code, _, err = in_process(capsys, "quantize", str(tmp_path / "x"), "--model", str(ckpt),
                              "--calibration", str(tmp_path / "missing.txt"))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "missing.txt" in err
    # the bundled calibration text, for a quick GPTQ without a file of one's own
    code, _, err = in_process(capsys, "quantize", str(tmp_path / "demo-cal"), "--model", str(ckpt),
                              "--calibration", "demo", "--samples", "2", "--seq-len", "16")
    assert code == 0, err
    assert stablelm.AutoModelForCausalLM.from_pretrained(tmp_path / "demo-cal").quantization == "int4"
