"""StableLmConfig: the keys of the reference's config.json, with its defaults (stablelm-3b-4e1t)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..io.jsonfile import read_json_object

MODEL_TYPE = "stablelm"
ROPE_TYPES = ("default", "linear", "dynamic")
# Keys we read but never store as attributes: they are folded into rope_* fields or ignored.
_ROPE_KEYS = ("rope_theta", "partial_rotary_factor", "rope_scaling", "rope_parameters", "rope_pct")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """Map "bfloat16", "torch.float16", "fp32", ... or a torch.dtype to a torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    key = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(key, key)
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


MAX_LABELS = 2**20


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class StableLmConfig:
    """Hyper-parameters of a StableLM model; field names are the config.json keys.

    RoPE settings are flat fields here (rope_theta, partial_rotary_factor, rope_scaling) and are
    read from either the transformers 4.x layout (top-level keys) or 5.x (`rope_parameters`).
    """

    vocab_size: int = 50304
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    # None, or {"rope_type": "linear" | "dynamic", "factor": float}
    rope_scaling: dict | None = None
    use_qkv_bias: bool = False
    qk_layernorm: bool = False
    use_parallel_residual: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = None
    # Heads: number of labels (from id2label when given), problem type, classifier dropout.
    id2label: dict[int, str] | None = None
    problem_type: str | None = None
    classifier_dropout: float | None = None
    # Storage dtype of the checkpoint ("bfloat16", ...); used by from_pretrained(dtype="auto").
    dtype: str | None = None
    architectures: list[str] | None = None
    # Keys we do not model (quantization_config, custom fields): kept so a round trip preserves them.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            scaling.setdefault("rope_type", scaling.pop("type", None))
            scaling.pop("type", None)
            self.rope_scaling = scaling
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
        self.validate()

    # -- derived sizes ---------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_labels(self) -> int:
        return len(self.id2label) if self.id2label else 2

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_LABELS:
            raise ValueError(f"num_labels must be an integer in [1, {MAX_LABELS}], got {n!r}")
        if self.id2label is None or len(self.id2label) != n:
            self.id2label = {i: f"LABEL_{i}" for i in range(n)}

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in (self.id2label or {i: f"LABEL_{i}" for i in range(2)}).items()}

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @property
    def model_type(self) -> str:
        return MODEL_TYPE

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first key whose value cannot describe a StableLM."""
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config key {key!r} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"config key 'hidden_size' ({self.hidden_size}) must be divisible by "
                f"'num_attention_heads' ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config key 'num_attention_heads' ({self.num_attention_heads}) must be divisible by "
                f"'num_key_value_heads' ({self.num_key_value_heads})")
        for key in ("partial_rotary_factor", "rope_theta", "layer_norm_eps", "initializer_range", "hidden_dropout",
                    "attention_dropout", "classifier_dropout"):
            value = getattr(self, key)
            if value is not None and not _finite(value):
                raise ValueError(f"config key {key!r} must be a finite number, got {value!r}")
        if self.id2label is not None and len(self.id2label) > MAX_LABELS:
            raise ValueError(f"config key 'id2label' has {len(self.id2label)} labels, more than {MAX_LABELS}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"config key 'partial_rotary_factor' must be in (0, 1], got {self.partial_rotary_factor!r}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(
                f"config key 'partial_rotary_factor' ({self.partial_rotary_factor}) gives rotary_dim "
                f"{self.rotary_dim} of head_dim {self.head_dim}; it must be a positive even number")
        if not self.rope_theta > 0:
            raise ValueError(f"config key 'rope_theta' must be > 0, got {self.rope_theta!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"config key 'layer_norm_eps' must be > 0, got {self.layer_norm_eps!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"config key 'hidden_act' must be 'silu' for StableLM, got {self.hidden_act!r}")
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"config key {key!r} must be in [0, 1], got {getattr(self, key)!r}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"config key 'rope_scaling.rope_type' must be one of {ROPE_TYPES}, got {rope_type!r}")
            if rope_type != "default":
                factor = self.rope_scaling.get("factor")
                if not _finite(factor) or factor <= 0:
                    raise ValueError(f"config key 'rope_scaling.factor' must be a finite number > 0, got {factor!r}")
                if rope_type == "dynamic" and factor < 1:
                    raise ValueError(f"config key 'rope_scaling.factor' must be >= 1 for dynamic scaling, got {factor!r}")
                if rope_type == "dynamic" and self.rotary_dim <= 2:
                    raise ValueError(f"config key 'partial_rotary_factor' gives rotary_dim {self.rotary_dim}; "
                                     "dynamic rope scaling needs more than 2")

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type") or "default"

    # -- (de)serialisation -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> StableLmConfig:
        """Build from a config.json dict written by transformers 4.x, 5.x or an older hub repo."""
        data = dict(data)
        model_type = data.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"{source}: model_type is {model_type!r}; this library implements only 'stablelm'")
        # Legacy aliases used by early hub configs.
        if "norm_eps" in data:
            data.setdefault("layer_norm_eps", data.pop("norm_eps"))
        rope = dict(data.pop("rope_parameters", None) or {})
        scaling = data.pop("rope_scaling", None)
        kwargs: dict[str, Any] = {}
        theta = rope.get("rope_theta", data.pop("rope_theta", None))
        factor = rope.get("partial_rotary_factor", data.pop("partial_rotary_factor", data.pop("rope_pct", None)))
        data.pop("rope_pct", None)
        if theta is not None:
            kwargs["rope_theta"] = float(theta)
        if factor is not None:
            kwargs["partial_rotary_factor"] = float(factor)
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type not in (None, "default"):
            scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
        if scaling:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.pop("type", None))
            scaling.pop("type", None)
            kwargs["rope_scaling"] = scaling if scaling.get("rope_type") not in (None, "default") else None
        if "torch_dtype" in data:
            data.setdefault("dtype", data.pop("torch_dtype"))
        if "num_labels" in data and "id2label" not in data:
            n = data.pop("num_labels")
            if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_LABELS:
                raise ValueError(f"{source}: config key 'num_labels' must be an integer in [1, {MAX_LABELS}], "
                                 f"got {n!r}")
            data["id2label"] = {i: f"LABEL_{i}" for i in range(n)}
        data.pop("num_labels", None)
        data.pop("label2id", None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in data.items() if k not in names}
        kwargs.update({k: v for k, v in data.items() if k in names})
        if isinstance(kwargs.get("dtype"), torch.dtype):
            kwargs["dtype"] = str(kwargs["dtype"]).removeprefix("torch.")
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> StableLmConfig:
        return cls.from_dict(read_json_object(path), source=str(path))

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hub_kwargs) -> StableLmConfig:
        from ..io.hub import resolve_file

        return cls.from_json_file(resolve_file(name_or_path, "config.json", **hub_kwargs))

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict, in the layout transformers 5.x writes and 4.x also reads."""
        out: dict[str, Any] = {"architectures": self.architectures, "model_type": MODEL_TYPE}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_scaling", "rope_theta", "partial_rotary_factor", "architectures"):
                continue
            out[f.name] = getattr(self, f.name)
        if out["id2label"] is None:
            del out["id2label"]
        else:
            out["id2label"] = {str(k): v for k, v in self.id2label.items()}
            out["label2id"] = self.label2id
        for key in ("problem_type", "classifier_dropout"):
            if out[key] is None:
                del out[key]
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor}
        if self.rope_scaling:
            rope.update({k: v for k, v in self.rope_scaling.items() if k != "rope_type"})
            # transformers 4.x reads only the top-level rope_scaling.
            out["rope_scaling"] = {"type": self.rope_type, **{k: v for k, v in self.rope_scaling.items() if k != "rope_type"}}
        out["rope_parameters"] = rope
        out["rope_theta"] = self.rope_theta
        out["partial_rotary_factor"] = self.partial_rotary_factor
        out.update(self.extra)
        return {k: out[k] for k in sorted(out)}

    def save_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, **changes) -> StableLmConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)
