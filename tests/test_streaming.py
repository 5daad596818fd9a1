"""Streaming: pieces join to the decoded text, never split a character, hold back stop strings."""

from __future__ import annotations


import torch

import stablelm
from conftest import tiny_checkpoint, tiny_tokenizer


class Collect(stablelm.TextStreamer):
    def __init__(self, tokenizer, **kw):
        super().__init__(tokenizer, **kw)
        self.pieces = []

    def on_text(self, text, stream_end=False):
        self.pieces.append(text)


def test_streamer_never_splits_multibyte_characters():
    tok = tiny_tokenizer()
    text = "Caf\u00e9 \u65e5\u672c \U0001F916 na\u00efve\nline two \U0001F916\U0001F916"
    ids = tok(text).input_ids
    # One byte-level token per byte for the rare characters: a multi-byte character spans tokens.
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))
    streamer = Collect(tok, skip_prompt=True)
    streamer.put(torch.tensor([ids[:1]]))  # the prompt, skipped
    for i in ids[1:]:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert all("\ufffd" not in p for p in streamer.pieces)
    assert "".join(streamer.pieces) == tok.decode(ids[1:])


def test_streamed_generation_joins_to_decode(tmp_path):
    model = tiny_checkpoint(tmp_path)
    tok = stablelm.AutoTokenizer.from_pretrained(tmp_path)
    enc = tok("To be, or", return_tensors="pt")
    streamer = Collect(tok, skip_prompt=True)
    out = model.generate(enc["input_ids"], max_new_tokens=20, do_sample=False, streamer=streamer)
    assert "".join(streamer.pieces) == tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_iterator_streamer_in_a_thread(tmp_path):
    import threading

    model = tiny_checkpoint(tmp_path)
    tok = stablelm.AutoTokenizer.from_pretrained(tmp_path)
    enc = tok("To be", return_tensors="pt")
    streamer = stablelm.TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=model.generate(
        enc["input_ids"], max_new_tokens=12, do_sample=False, streamer=streamer)))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == tok.decode(result["out"][0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_incremental_text_holds_back_a_stop_string_prefix():
    from stablelm.generation.streaming import IncrementalText

    tok = tiny_tokenizer()
    ids = tok.encode("To be, or not to be, that is the question:")
    text = IncrementalText(tok, stop=["not to"])
    pieces = []
    for token in ids:
        piece, stopped = text.add([token])
        pieces.append(piece)
        if stopped:
            break
    assert stopped and "".join(pieces) == "To be, or "
    assert all("not" not in p for p in pieces)
