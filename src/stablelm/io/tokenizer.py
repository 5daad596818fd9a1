"""A tokenizer on the `tokenizers` library that reads a checkpoint's tokenizer files as the reference does.

Files: tokenizer.json (the BPE model), tokenizer_config.json (special tokens, add_bos_token,
padding side, chat_template), special_tokens_map.json, and chat_template.jinja (transformers 5.x).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as _Backend

from .jsonfile import read_json_object
from .hub import resolve_folder

# Special tokens a tokenizer class brings when its files name none (as the reference's classes do).
CLASS_DEFAULTS = {
    "GPTNeoXTokenizer": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                         "unk_token": "<|endoftext|>", "pad_token": "<|padding|>"},
    "GPT2Tokenizer": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
}
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class BatchEncoding(dict):
    """input_ids / attention_mask, readable as keys or attributes (`enc.input_ids`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


def _token_text(value) -> str | None:
    """A special token as the config writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Byte-level BPE tokenizer with the reference's call, decode and chat-template behaviour."""

    def __init__(self, backend: _Backend, config: dict[str, Any] | None = None,
                 chat_template: str | None = None):
        self.backend = backend
        config = dict(config or {})
        self.init_kwargs = config
        defaults = CLASS_DEFAULTS.get(str(config.get("tokenizer_class", "")).removesuffix("Fast"), {})
        for name in SPECIAL_NAMES:
            setattr(self, name, _token_text(config.get(name, defaults.get(name))))
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        self.model_max_length = int(config.get("model_max_length", 10**30))
        self.chat_template = chat_template or config.get("chat_template")
        # A TemplateProcessing post-processor with special tokens (Llama-style) inserts them itself;
        # the ByteLevel ones of GPT-NeoX and Arcade100k do not, so add_bos/eos_token are applied here.
        processor = json.loads(backend.to_str()).get("post_processor") or {}
        self._backend_adds_specials = processor.get("type") == "TemplateProcessing" and bool(
            processor.get("special_tokens"))

    # -- loading / saving --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> Tokenizer:
        """Load tokenizer files; keywords other than the hub's (revision, ...) override tokenizer_config.json
        entries, e.g. padding_side="left" or pad_token="<|endoftext|>"."""
        hub_names = ("revision", "local_files_only", "cache_dir", "token")
        hub_kwargs = {k: v for k, v in kwargs.items() if k in hub_names}
        overrides = {k: v for k, v in kwargs.items() if k not in hub_names and k not in ("use_fast", "trust_remote_code")}
        folder = resolve_folder(name_or_path, **hub_kwargs)
        path = folder / "tokenizer.json"
        if not path.exists():
            if (folder / "arcade100k.tiktoken").exists():
                raise ValueError(f"{folder}: ships only arcade100k.tiktoken with remote code; this library reads "
                                 "tokenizer.json (use a StableLM 2 repository that has one)")
            raise FileNotFoundError(f"{folder}: no tokenizer.json")
        try:
            backend = _Backend.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).exists():
                config.update(read_json_object(folder / name))
        config.update(overrides)
        template_path = folder / "chat_template.jinja"
        template = template_path.read_text(encoding="utf-8") if template_path.exists() else None
        tok = cls(backend, config, template)
        tok.name_or_path = str(name_or_path)
        return tok

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        target = Path(save_directory)
        target.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in self.init_kwargs.items() if k != "chat_template"}
        for name in SPECIAL_NAMES:
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token,
                      padding_side=self.padding_side, model_max_length=self.model_max_length)
        config.setdefault("tokenizer_class", "GPT2Tokenizer")
        if self.chat_template:
            config["chat_template"] = self.chat_template
        files = {"tokenizer.json": self.backend.to_str(),
                 "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                 "special_tokens_map.json": json.dumps(
                     {n: getattr(self, n) for n in SPECIAL_NAMES if getattr(self, n) is not None}, indent=2) + "\n"}
        for name, text in files.items():
            tmp = target / f".{name}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target / name)

    # -- vocabulary --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    bos_token_id = property(lambda self: self._id(self.bos_token))
    eos_token_id = property(lambda self: self._id(self.eos_token))
    unk_token_id = property(lambda self: self._id(self.unk_token))
    pad_token_id = property(lambda self: self._id(self.pad_token))

    @property
    def all_special_ids(self) -> list[int]:
        return sorted({i for i in (self._id(getattr(self, n)) for n in SPECIAL_NAMES) if i is not None})

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {n: getattr(self, n) for n in SPECIAL_NAMES if getattr(self, n) is not None}

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > 16384:  # the batch call releases the GIL: a server's other threads go on meanwhile
            encoding = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        else:
            encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return self._with_specials(encoding.ids, add_special_tokens)

    def _with_specials(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        """Apply add_bos_token / add_eos_token where the backend's post-processor does not."""
        if add_special_tokens and not self._backend_adds_specials:
            if self.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
            if self.add_eos_token and self.eos_token_id is not None:
                ids = ids + [self.eos_token_id]
        return ids

    def __call__(self, text: str | list[str], padding: bool | str = False, truncation: bool | str = False,
                 max_length: int | None = None, return_tensors: str | None = None, add_special_tokens: bool = True,
                 padding_side: str | None = None, return_attention_mask: bool = True, **unused) -> BatchEncoding:
        """Encode one string or a batch; padding True/"longest"/"max_length", return_tensors "pt" or None."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' (torch) or None is supported")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        encoded = [self._with_specials(e.ids, add_special_tokens)
                   for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        if truncation and truncation != "do_not_truncate":
            limit = max_length if max_length is not None else self.model_max_length
            side = self.truncation_side
            encoded = [ids[:limit] if side == "right" else ids[max(len(ids) - limit, 0):] for ids in encoded]
        masks = [[1] * len(ids) for ids in encoded]
        if padding and padding != "do_not_pad":
            if padding == "max_length":
                if max_length is None:
                    raise ValueError("padding='max_length' needs max_length")
                width = max_length
            else:
                width = max(len(ids) for ids in encoded)
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ValueError("this tokenizer has no pad_token: set tokenizer.pad_token (e.g. to eos_token) to pad")
            side = padding_side or self.padding_side
            if side not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
            for i, ids in enumerate(encoded):
                fill = width - len(ids)
                if fill > 0:
                    encoded[i] = [pad_id] * fill + ids if side == "left" else ids + [pad_id] * fill
                    masks[i] = [0] * fill + masks[i] if side == "left" else masks[i] + [0] * fill
        if return_tensors == "pt":
            if len({len(ids) for ids in encoded}) > 1:
                raise ValueError("sequences have different lengths: pass padding=True to return tensors")
            out = {"input_ids": torch.tensor(encoded, dtype=torch.long)}
            if return_attention_mask:
                out["attention_mask"] = torch.tensor(masks, dtype=torch.long)
        else:
            out = {"input_ids": encoded[0] if single else encoded}
            if return_attention_mask:
                out["attention_mask"] = masks[0] if single else masks
        return BatchEncoding(out)

    # -- decoding ----------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False, **unused) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **unused) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return self.backend.decode_batch([list(s) for s in sequences], skip_special_tokens=skip_special_tokens)

    # -- chat --------------------------------------------------------------------------------
    def apply_chat_template(self, conversation: list[dict], chat_template: str | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = True, return_dict: bool = True,
                            return_tensors: str | None = None, padding: bool | str = False,
                            truncation: bool = False, max_length: int | None = None, **template_kwargs):
        """Render messages with the chat template (jinja2 sandbox); tokenize unless tokenize=False."""
        from .chat import render_chat

        template = chat_template or self.chat_template
        if not template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        rendered = [render_chat(template, conv, add_generation_prompt=add_generation_prompt,
                                **{**self.special_tokens_map, **template_kwargs}) for conv in conversations]
        text = rendered if batched else rendered[0]
        if not tokenize:
            return text
        enc = self(text, padding=padding, truncation=truncation, max_length=max_length,
                   return_tensors=return_tensors, add_special_tokens=False)
        return enc if return_dict else enc["input_ids"]
