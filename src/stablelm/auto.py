"""Auto* names over the StableLm classes, so code written for transformers runs with its import changed."""

from __future__ import annotations

import os

from .io.tokenizer import Tokenizer
from .models.config import StableLmConfig
from .models.model import (
    StableLmForCausalLM,
    StableLmForSequenceClassification,
    StableLmForTokenClassification,
    StableLmModel,
)


class _Auto:
    model_class: type

    def __init__(self):
        raise TypeError(f"{type(self).__name__} is built with from_pretrained() or from_config()")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *args, **kwargs):
        # A non-stablelm config.json fails inside StableLmConfig with a message naming its model_type.
        kwargs.pop("trust_remote_code", None)  # never honoured: no code from a checkpoint runs here
        return cls.model_class.from_pretrained(name_or_path, *args, **kwargs)

    @classmethod
    def from_config(cls, config: StableLmConfig, **kwargs):
        return cls.model_class.from_config(config, **kwargs)


class AutoConfig(_Auto):
    model_class = StableLmConfig

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        kwargs.pop("trust_remote_code", None)
        return StableLmConfig.from_pretrained(name_or_path, **kwargs)

    @staticmethod
    def for_model(model_type: str, **kwargs) -> StableLmConfig:
        return StableLmConfig.from_dict({"model_type": model_type, **kwargs})


class AutoTokenizer(_Auto):
    model_class = Tokenizer


class AutoModel(_Auto):
    model_class = StableLmModel


class AutoModelForCausalLM(_Auto):
    model_class = StableLmForCausalLM


class AutoModelForSequenceClassification(_Auto):
    model_class = StableLmForSequenceClassification


class AutoModelForTokenClassification(_Auto):
    model_class = StableLmForTokenClassification
