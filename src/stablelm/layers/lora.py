"""LoRA adapters (Hu et al., 2021) in PEFT's format: adapter_config.json + adapter_model.safetensors.

`add_lora(model, LoraConfig(...))` wraps the chosen projections (by the reference's names: q_proj, ...,
down_proj) in `LoraLinear`: y = W x + (alpha / r) B A dropout(x), with W frozen, A initialised as PEFT
does (Kaiming-uniform) and B at zero. `save_adapter` / `load_adapter` write and read the files PEFT
writes and reads (`peft.PeftModel.from_pretrained(transformers_model, dir)` loads ours, and the other
way round); `merge_lora` folds the adapters into the weights, after which `save_pretrained` writes a
plain checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import fast
from .fused import PROJECTIONS, reference_name
from .schemes import SCHEMES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MAX_RANK = 2**16  # bounds on numbers read from adapter_config.json, checked before anything is allocated
MAX_ALPHA = 2.0**16
TASK_TYPES = {"StableLmForCausalLM": "CAUSAL_LM", "StableLmForSequenceClassification": "SEQ_CLS",
              "StableLmForTokenClassification": "TOKEN_CLS", "StableLmModel": "FEATURE_EXTRACTION"}


@dataclass
class LoraConfig:
    """r: rank; lora_alpha: the update is scaled by lora_alpha / r (or / sqrt(r) with use_rslora);
    target_modules: projection names (the reference's) that get an adapter."""

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False
    # Whole modules trained and saved with the adapter: a classification head starts random, so PEFT
    # keeps `score` (its name here and in transformers) trainable for SEQ_CLS / TOKEN_CLS.
    modules_to_save: tuple[str, ...] | None = None
    extra: dict = field(default_factory=dict, repr=False)  # PEFT keys kept as they were read

    def __post_init__(self):
        self.target_modules = (self.target_modules,) if isinstance(self.target_modules, str) \
            else tuple(self.target_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or not 1 <= self.r <= MAX_RANK:
            raise ValueError(f"LoRA rank r must be an integer in [1, {MAX_RANK}], got {self.r!r}")
        if not (isinstance(self.lora_alpha, (int, float)) and not isinstance(self.lora_alpha, bool)
                and math.isfinite(self.lora_alpha) and 0 < self.lora_alpha <= MAX_ALPHA):
            raise ValueError(f"lora_alpha must be a number in (0, {MAX_ALPHA:g}], got {self.lora_alpha!r}")
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.modules_to_save is not None:
            self.modules_to_save = tuple(self.modules_to_save)
            if not set(self.modules_to_save) <= {"classifier", "score"}:
                raise ValueError(f"modules_to_save {list(self.modules_to_save)}: only the classification head "
                                 "('score', PEFT also lists 'classifier') can be saved with an adapter")
        unknown = [m for m in self.target_modules if m not in PROJECTIONS]
        if not self.target_modules or unknown:
            raise ValueError(f"target_modules {list(self.target_modules)}: expected names among {list(PROJECTIONS)}"
                             + (f"; unknown: {unknown}" if unknown else ""))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft(self, task_type: str, base: str | None) -> dict:
        return {**self.extra, "peft_type": "LORA", "task_type": task_type, "r": self.r, "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout, "target_modules": sorted(self.target_modules), "bias": "none",
                "use_rslora": self.use_rslora, "use_dora": False, "fan_in_fan_out": False,
                "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
                "base_model_name_or_path": base, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
                "layers_to_transform": None, "init_lora_weights": True}

    @classmethod
    def from_peft(cls, data: dict, source: str) -> LoraConfig:
        """From an adapter_config.json; what this implementation does not do is refused, naming the key."""
        if data.get("peft_type") != "LORA":
            raise ValueError(f"{source}: peft_type {data.get('peft_type')!r} is not LORA")
        refused = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
                   "layers_to_transform": None, "lora_bias": False}
        for key, plain in refused.items():
            if data.get(key, plain) not in (plain, None, {}, False):
                raise ValueError(f"{source}: {key}={data[key]!r} is not supported (only plain LoRA on projections)")
        targets = data.get("target_modules")
        if isinstance(targets, str):
            raise ValueError(f"{source}: target_modules as a regular expression ({targets!r}) is not supported")
        known = {k for k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "modules_to_save")}
        if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            raise ValueError(f"{source}: target_modules must be a list of names, got {targets!r}")
        try:  # None means the defaults, as in PEFT; an empty list is refused (PEFT refuses it too)
            return cls(**{k: data[k] for k in known if k in data},
                       target_modules=DEFAULT_TARGETS if targets is None else tuple(targets),
                       extra={k: v for k, v in data.items() if k not in known | {"target_modules"}})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


class FrozenInt8Linear(nn.Module):
    """A frozen projection stored as int8 per output row (a quarter of fp32's bytes): gradients flow to its
    input, never to its weight (QLoRA's idea, with stablelm's int8 rounding)."""

    scheme = SCHEMES["int8"]

    def __init__(self, linear: nn.Linear):
        super().__init__()
        fields = self.scheme.quantize(linear.weight.detach())
        self.register_buffer("q", fields["q"])
        self.register_buffer("scale", fields["scale"])
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.scheme.dequantize({"q": self.q, "scale": self.scale}, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


class LoraLinear(nn.Module):
    """A frozen nn.Linear (`base_layer`, PEFT's name) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, config: LoraConfig):
        super().__init__()
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        weight = base.weight if isinstance(base, nn.Linear) else base.scale
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        self.lora_A = nn.Linear(base.in_features, config.r, bias=False, **factory)
        self.lora_B = nn.Linear(config.r, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.scaling = config.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the update folded in (computed in fp32)."""
        base = self.base_layer.to_linear() if isinstance(self.base_layer, FrozenInt8Linear) else self.base_layer
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        return base


def _targets(model: nn.Module, config: LoraConfig, named: bool = False) -> list[tuple]:
    """(parent, attribute, nn.Linear) of every projection `config` names; with `named`, the parent's name first."""
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child_name in config.target_modules and isinstance(child, nn.Linear):
                found.append((name, module, child_name, child) if named else (module, child_name, child))
    if not found:
        raise ValueError(f"no module of {type(model).__name__} is named {list(config.target_modules)}")
    return found


def add_lora(model: nn.Module, config: LoraConfig, int8_base: bool = False) -> nn.Module:
    """Freeze the model and wrap the target projections in LoraLinear (in place); returns the model.

    int8_base: store every frozen projection (targets and the others; not the embeddings or the head) as
    int8, so the base costs a quarter of fp32's memory. An inference layout is turned back into plain
    modules first (as model.train() does)."""
    if fast.is_optimized(model):
        fast.restore(model)
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters: merge_lora(model) first, or load a fresh model")
    targets = _targets(model, config)
    if config.modules_to_save is None and hasattr(model, "score"):  # PEFT's default for SEQ_CLS / TOKEN_CLS
        config.modules_to_save = ("classifier", "score")
    for p in model.parameters():
        p.requires_grad_(False)
    if int8_base:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if name in PROJECTIONS and isinstance(child, nn.Linear):
                    setattr(parent, name, FrozenInt8Linear(child))
        targets = [(parent, name, getattr(parent, name)) for parent, name, _ in targets]
    for parent, name, linear in targets:
        setattr(parent, name, LoraLinear(linear, config))
    for module in _saved_modules(model, config).values():
        for p in module.parameters():
            p.requires_grad_(True)
    model.lora_config = config
    return model


def _saved_modules(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    """The top-level modules that `config.modules_to_save` names and the model has (its head)."""
    return {name: getattr(model, name) for name in config.modules_to_save or () if isinstance(getattr(model, name, None),
                                                                                              nn.Module)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's saved names: base_model.model.<reference path>.lora_A.weight."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            path = reference_name(name)
            state[f"base_model.model.{path}.lora_A.weight"] = module.lora_A.weight.detach()
            state[f"base_model.model.{path}.lora_B.weight"] = module.lora_B.weight.detach()
    config = getattr(model, "lora_config", None)
    for name, module in (_saved_modules(model, config) if config else {}).items():
        for pname, p in module.named_parameters():
            state[f"base_model.model.{name}.{pname}"] = p.detach()
    return state


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write adapter_config.json and adapter_model.safetensors as PEFT does."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapters (add_lora or load_adapter first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    base = getattr(model, "name_or_path", None)
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(
        json.dumps(config.to_peft(TASK_TYPES.get(type(model).__name__, "CAUSAL_LM"), base), indent=2, sort_keys=True)
        + "\n")


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Add the adapters saved in `directory` (by us or by PEFT) to `model`; returns the model.

    The config's numbers and every tensor's name, shape and dtype (from the file's header) are checked
    against the model before anything is allocated; a weight that is not finite is refused, named."""
    from ..io.checkpoint import read_tensors
    from ..io.jsonfile import read_json_object

    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: no {name} (a LoRA adapter folder has both)")
    weights = directory / ADAPTER_WEIGHTS
    config = LoraConfig.from_peft(read_json_object(directory / ADAPTER_CONFIG), str(directory / ADAPTER_CONFIG))
    if fast.is_optimized(model):
        fast.restore(model)
    saved = dict(read_tensors(weights, False, "cpu"))  # headers only: FileTensor handles
    expected = _adapter_shapes(model, config)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights}: does not fit this model: {len(missing)} missing (e.g. {missing[:2]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for key, shape in expected.items():
        if tuple(saved[key].shape) != shape:
            raise ValueError(f"{weights}: {key} has shape {tuple(saved[key].shape)}, the model (and r = {config.r} "
                             f"in {ADAPTER_CONFIG}) needs {shape}")
        if not saved[key].dtype.is_floating_point:
            raise ValueError(f"{weights}: {key} is {saved[key].dtype}; adapter weights are floating point")
    add_lora(model, config)
    with torch.no_grad():
        for key, target in lora_state_dict(model).items():
            value = saved[key].read()
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{weights}: {key} holds NaN or infinite values")
            target.copy_(value)
    return model


def _adapter_shapes(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """The tensors an adapter of `config` holds for `model` (plain layout), by PEFT's names: their shapes."""
    shapes = {}
    for parent_name, parent, name, linear in _targets(model, config, named=True):
        path = reference_name(f"{parent_name}.{name}" if parent_name else name)
        shapes[f"base_model.model.{path}.lora_A.weight"] = (config.r, linear.in_features)
        shapes[f"base_model.model.{path}.lora_B.weight"] = (linear.out_features, config.r)
    saved = config.modules_to_save if config.modules_to_save is not None else (
        ("classifier", "score") if hasattr(model, "score") else ())
    for name in saved:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            for pname, p in module.named_parameters():
                shapes[f"base_model.model.{name}.{pname}"] = tuple(p.shape)
    return shapes


def adapter_num_labels(directory: str | os.PathLike) -> int | None:
    """Rows of the classification head saved with an adapter (PEFT's modules_to_save), or None."""
    from ..io.checkpoint import safetensors_header

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS} (a LoRA adapter folder has it)")
    info = safetensors_header(path).get("base_model.model.score.weight")
    return info["shape"][0] if isinstance(info, dict) else None


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its projection's weight and drop the adapters (in place); returns the model.
    An int8 base comes back as plain (dequantized) weights."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                setattr(parent, name, child.merged())
            elif isinstance(child, FrozenInt8Linear):
                setattr(parent, name, child.to_linear())
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
