"""pipeline(): the reference's text-generation, text-classification and token-classification pipelines."""

from __future__ import annotations

import os

import dataclasses

import torch

from .auto import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)
from .models.generation_config import GenerationConfig

# The reference's text-generation defaults, used where the model's generation_config is silent.
TEXT_GENERATION_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}


def pipeline(task: str, model=None, tokenizer=None, dtype="auto", device=None, torch_dtype=None, **kwargs):
    """Build a pipeline. model: a folder, a hub id, or a loaded StableLm* model; tokenizer likewise."""
    tasks = {"text-generation": (TextGenerationPipeline, AutoModelForCausalLM),
             "text-classification": (TextClassificationPipeline, AutoModelForSequenceClassification),
             "sentiment-analysis": (TextClassificationPipeline, AutoModelForSequenceClassification),
             "token-classification": (TokenClassificationPipeline, AutoModelForTokenClassification),
             "ner": (TokenClassificationPipeline, AutoModelForTokenClassification)}
    if task not in tasks:
        raise ValueError(f"unknown task {task!r}; supported: {', '.join(tasks)}")
    if model is None:
        raise ValueError("pipeline needs model= (a checkpoint folder, a hub id, or a loaded model)")
    cls, auto = tasks[task]
    dtype = torch_dtype if torch_dtype is not None else dtype
    if isinstance(model, (str, os.PathLike)):
        name = model
        model = auto.from_pretrained(model, dtype=dtype, device=device)
        tokenizer = tokenizer if tokenizer is not None else name
    elif device is not None:
        model = model.to(device)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if tokenizer is None:
        name = getattr(model, "name_or_path", None)
        if name is None:
            raise ValueError("pass tokenizer= when model is an object not loaded with from_pretrained")
        tokenizer = AutoTokenizer.from_pretrained(name)
    return cls(model, tokenizer, **kwargs)


class Pipeline:
    def __init__(self, model, tokenizer, **defaults):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.defaults = defaults

    @property
    def device(self) -> torch.device:
        return self.model.device


class TextGenerationPipeline(Pipeline):
    """Text or chat in, [{"generated_text": ...}] out (one list per input when given a list)."""

    def __init__(self, model, tokenizer, **defaults):
        super().__init__(model, tokenizer, **defaults)
        if self.tokenizer.padding_side == "right":
            self.tokenizer.padding_side = "left"
        model_set = model.generation_config.to_dict()
        self.generate_defaults = {**TEXT_GENERATION_DEFAULTS,
                                  **{k: v for k, v in model_set.items() if k in _GEN_FIELDS}}
        if tokenizer.pad_token_id is not None:
            self.generate_defaults["pad_token_id"] = tokenizer.pad_token_id

    def __call__(self, inputs, return_full_text: bool = True, skip_special_tokens: bool = True, **generate_kwargs):
        if _is_chat(inputs):
            return self._one(inputs, return_full_text, skip_special_tokens, generate_kwargs)
        if isinstance(inputs, str):
            return self._one(inputs, return_full_text, skip_special_tokens, generate_kwargs)
        if isinstance(inputs, (list, tuple)):
            return [self._one(x, return_full_text, skip_special_tokens, generate_kwargs) for x in inputs]
        raise TypeError("text-generation takes a string, a list of strings, or chat messages (a list of dicts)")

    def _one(self, prompt, return_full_text, skip_special_tokens, generate_kwargs):
        chat = _is_chat(prompt)
        if chat:
            continue_final = prompt[-1]["role"] == "assistant"
            enc = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=not continue_final,
                                                     return_tensors="pt")
        else:
            enc = self.tokenizer(prompt, return_tensors="pt")
        options = {**self.generate_defaults, **self.defaults, **generate_kwargs}
        if "max_length" in generate_kwargs and "max_new_tokens" not in generate_kwargs:
            options.pop("max_new_tokens", None)
        out = self.model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], tokenizer=self.tokenizer,
                                  **options)
        prompt_len = enc["input_ids"].shape[1]
        records = []
        for row in out.tolist():
            text = self.tokenizer.decode(row[prompt_len:], skip_special_tokens=skip_special_tokens)
            if return_full_text:
                if chat and continue_final:
                    last = prompt[-1]
                    text = list(prompt[:-1]) + [{"role": last["role"], "content": last["content"] + text}]
                elif chat:
                    text = list(prompt) + [{"role": "assistant", "content": text}]
                else:
                    text = prompt + text
            records.append({"generated_text": text})
        return records


class TextClassificationPipeline(Pipeline):
    """{"label", "score"} for the best label (top_k=1), or a sorted list of them (top_k=None or k)."""

    def __call__(self, inputs, top_k: int | None = 1, function_to_apply: str | None = None):
        single = isinstance(inputs, str)
        results = [self._one(text, top_k, function_to_apply) for text in ([inputs] if single else inputs)]
        # As the reference: a list of dicts for top_k=1 (one per input), else one ranked list per input.
        return results if top_k == 1 or not single else results[0]

    def _one(self, text, top_k, function_to_apply):
        enc = self.tokenizer(text, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            logits = self.model(**enc).logits[0].float()
        config = self.model.config
        if function_to_apply is None:
            if config.problem_type == "regression":
                function_to_apply = "none"
            elif config.problem_type == "multi_label_classification" or config.num_labels == 1:
                function_to_apply = "sigmoid"
            else:
                function_to_apply = "softmax"
        scores = {"sigmoid": torch.sigmoid, "softmax": lambda x: torch.softmax(x, -1), "none": lambda x: x}[
            function_to_apply](logits)
        labels = config.id2label or {i: f"LABEL_{i}" for i in range(len(scores))}
        if top_k == 1:
            best = int(scores.argmax())
            return {"label": labels[best], "score": float(scores[best])}
        ranked = sorted(({"label": labels[i], "score": float(s)} for i, s in enumerate(scores)),
                        key=lambda d: d["score"], reverse=True)
        return ranked if top_k is None else ranked[:top_k]


class TokenClassificationPipeline(Pipeline):
    """Per-token entities {"entity", "score", "index", "word", "start", "end"}; label "O" is dropped."""

    def __call__(self, inputs, ignore_labels=("O",)):
        single = isinstance(inputs, str)
        results = [self._one(text, ignore_labels) for text in ([inputs] if single else inputs)]
        return results[0] if single else results

    def _one(self, text, ignore_labels):
        encoding = self.tokenizer.backend.encode(text)
        ids = torch.tensor([encoding.ids], device=self.device)
        with torch.inference_mode():
            logits = self.model(ids).logits[0].float()
        scores = logits.softmax(-1)
        labels = self.model.config.id2label or {i: f"LABEL_{i}" for i in range(scores.shape[-1])}
        special = set(self.tokenizer.all_special_ids)
        entities = []
        for index, (token_id, token, (start, end)) in enumerate(zip(encoding.ids, encoding.tokens,
                                                                    encoding.offsets)):
            if token_id in special:
                continue
            best = int(scores[index].argmax())
            if labels[best] in ignore_labels:
                continue
            entities.append({"entity": labels[best], "score": float(scores[index, best]), "index": index,
                             "word": token, "start": start, "end": end})
        return entities


_GEN_FIELDS = {f.name for f in dataclasses.fields(GenerationConfig)} - {"extra"}


def _is_chat(x) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and isinstance(x[0], dict) and "role" in x[0]
