"""PreTrainedModel: what every StableLm class shares (config, from_pretrained, save_pretrained, weight init,
the transformers idioms), on top of the file I/O in stablelm.io.checkpoint."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..models.generation_config import GenerationConfig
from ..io.checkpoint import (
    ALL_HEAD_KEYS,
    FileTensor,
    StagedWeights,
    check_config_against_files,
    check_fits_in_memory,
    parse_size,
    read_tensors,
    shard,
    weight_files,
    write_checkpoint,
)
from ..io.hub import resolve_folder
from ..layers import fast, fused
from ..layers.schemes import SCHEMES
from ..layers import lora
from . import parallel
from .config import StableLmConfig, dtype_from_name
from ..layers.meta import skip_init


class PreTrainedModel(nn.Module):
    """Base of the StableLm classes: config, from_pretrained, save_pretrained, weight init."""

    base_prefix = ""  # where the backbone's weights sit in this class's state dict
    head_keys: tuple[str, ...] = ()
    inference_kind: str | None = None  # the linear format set by stablelm.fast.optimize ("mkldnn", "native", ...)
    quantization: str | None = None  # "int8" or "int4" when the weights are quantized
    tp = None  # this process's tensor-parallel group when the model is split (stablelm.models.parallel)

    def __init__(self, config: StableLmConfig):
        super().__init__()
        self.config = config
        self.generation_config = GenerationConfig.from_model_config(config)
        # State dicts in and out use the reference's names (stablelm.layers.fused holds the table).
        self.register_state_dict_post_hook(PreTrainedModel._reference_names)
        self.register_load_state_dict_pre_hook(fused.state_dict_from_reference)

    # -- conveniences ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype if hasattr(self, "model") else self.embed_tokens.weight.dtype

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters as the reference counts them, in every layout (a packed or quantized projection counts
        its dense weight and bias)."""
        seen, count = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (only_trainable and not p.requires_grad) or \
                    (exclude_embeddings and name.endswith("embed_tokens.weight")):
                continue
            seen.add(id(p))
            count += p.numel()
        if not only_trainable:  # the inference layout's weights are frozen buffers
            for module in self.modules():
                if isinstance(module, fast.LinearFormat):
                    count += module.in_features * module.out_features
                    count += module.bias.numel() if module.bias is not None else 0
        return count

    def optimize_for_inference(self, quantization: str | None = None, linear_format: str | None = None):
        """Fuse projections and convert (or quantize to "int8" / "int4") the weights; see stablelm.layers.fast."""
        return fast.optimize(self, quantization, linear_format=linear_format)

    def train(self, mode: bool = True):
        if mode and self.tp is not None:
            raise ValueError("a tensor-parallel model runs inference only: train on one process (or with torch's "
                             "own distributed training) and split the saved checkpoint")
        if mode and fast.is_optimized(self):
            fast.restore(self)  # training needs plain nn.Linear parameters
        return super().train(mode)

    # -- the reference's names in every layout ----------------------------------------------------
    def _reference_names(self, state_dict, prefix, local_metadata) -> None:
        """State-dict post-hook: the reference's names and tensors in every layout and every calling form.
        The inference layout's format modules keep no persistent buffers: their stored tensors (quantized
        weights as q + scale (+ zero), as saved) are added under the reference's names."""
        if not fast.is_optimized(self):
            return fused.state_dict_to_reference(self, state_dict, prefix, local_metadata)
        for key, value in fast.format_tensors(self, present=lambda k: prefix + k in state_dict):
            state_dict[prefix + key] = value

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load reference-named tensors in every layout: the inference layout is re-laid from them."""
        if not fast.is_optimized(self) or self.quantization is not None:
            if self.quantization is not None:
                raise ValueError("load_state_dict into a quantized model: load the dense weights into a model "
                                 "loaded with fast_inference=False, then call optimize_for_inference(quantization)")
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        layout = self.inference_kind
        fast.restore(self)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        fast.optimize(self, linear_format=layout)
        return result

    # -- dtype and device moves --------------------------------------------------------------------
    def to(self, *args, **kwargs):
        """As nn.Module.to; an inference layout is re-laid for the new dtype / device."""
        if not fast.is_optimized(self):
            return super().to(*args, **kwargs)
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if (device is None or torch.device(device) == self.device) and (dtype is None or dtype == self.dtype):
            return self
        layout, quantization = self.inference_kind, self.quantization
        fast.restore(self)
        super().to(*args, **kwargs)
        runs = layout in fast.FORMATS and fast.FORMATS[layout].unavailable(self.dtype, self.device) is None
        fast.optimize(self, quantization, linear_format=layout if runs else None)
        return self

    def half(self):
        return self.to(torch.float16)

    def bfloat16(self):
        return self.to(torch.bfloat16)

    def float(self):
        return self.to(torch.float32)

    def cpu(self):
        return self.to("cpu")

    def cuda(self, device=None):
        return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))

    # -- training conveniences ------------------------------------------------------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each decoder layer's activations in the backward pass instead of storing them."""
        backbone = self.model if hasattr(self, "model") else self
        backbone.gradient_checkpointing = True
        backbone.checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}

    def gradient_checkpointing_disable(self) -> None:
        (self.model if hasattr(self, "model") else self).gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return getattr(self.model if hasattr(self, "model") else self, "gradient_checkpointing", False)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The reference's init: normal(0, initializer_range) weights, zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if hasattr(self, "tie_weights"):
            self.tie_weights()

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: StableLmConfig, dtype: torch.dtype | str | None = None, seed: int | None = None):
        """A freshly initialised model (the reference's init), optionally in `dtype`."""
        model = cls(config)
        model.init_weights(torch.Generator().manual_seed(seed) if seed is not None else None)
        return model.to(dtype_from_name(dtype)) if dtype is not None else model

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, config: StableLmConfig | None = None,
                        dtype: torch.dtype | str | None = "auto", device: torch.device | str | None = None,
                        attn_implementation: str = "sdpa", revision: str | None = None,
                        local_files_only: bool = False, allow_pickle: bool = False, cache_dir: str | None = None,
                        token: str | bool | None = None, torch_dtype=None, device_map=None,
                        quantization: str | None = None, fast_inference: bool = True, linear_format: str | None = None,
                        adapter: str | os.PathLike | None = None, merge_adapter: bool = True,
                        tp: int | str | None = None, **config_overrides):
        """Load a checkpoint folder or hub id.

        dtype: "auto" (the checkpoint's stored dtype), a torch.dtype or its name; None = float32.
        device: where the weights go (read there directly by safetensors).
        quantization: None, "int8" or "int4" (weight-only; a quantized checkpoint loads as saved).
        fast_inference: fuse projections and prepack weights for the fastest kernels (undone by .train()).
        linear_format: force a weight format (stablelm.linear.FORMATS, e.g. "dense", "native", "int8-torch");
            by default the fastest one this CPU runs (STABLELM_LINEAR sets it too).
        adapter: a LoRA adapter folder (ours or PEFT's) to apply; merge_adapter folds it into the weights
            (then the inference layout applies as usual), else the adapters stay separate (plain layout).
        tp: split the model over this many processes (tensor parallelism, stablelm.models.parallel), or "auto"
            for as many as torchrun started; every process calls from_pretrained and reads only its slices.
        config_overrides: config fields to change, e.g. num_labels=3 for a fresh classification head.
        """
        if torch_dtype is not None:  # the name transformers 4.x used
            dtype = torch_dtype
        if device is None and isinstance(device_map, (str, torch.device)) and device_map != "auto":
            device = device_map
        device = str(torch.device(device)) if device is not None else "cpu"
        folder = resolve_folder(name_or_path, revision=revision, local_files_only=local_files_only,
                                allow_pickle=allow_pickle, cache_dir=cache_dir, token=token)
        if config is None:
            config_path = folder / "config.json"
            if not config_path.exists():
                raise FileNotFoundError(f"{folder}: no config.json")
            config = StableLmConfig.from_json_file(config_path)
        if adapter is not None and "score.weight" in cls.head_keys and "num_labels" not in config_overrides:
            config_overrides["num_labels"] = lora.adapter_num_labels(adapter)  # the head saved with the adapter
        if config_overrides:
            num_labels = config_overrides.pop("num_labels", None)
            config = config.replace(**config_overrides)
            if num_labels is not None:
                config.num_labels = num_labels
        if dtype == "auto":
            dtype = config.dtype or "float32"
        dtype = dtype_from_name(dtype) if dtype is not None else torch.float32
        qconfig = config.extra.get("quantization_config")
        saved_kind, int8_modules = fast.kind_from_config(qconfig, str(folder / "config.json")) if qconfig \
            else (None, ())
        if saved_kind and quantization not in (None, saved_kind):
            raise ValueError(f"{folder}: the checkpoint is quantized as {saved_kind}; cannot load it as {quantization}")

        files, is_pickle = weight_files(folder, allow_pickle)
        if not is_pickle:  # cheap header reads: a config.json that does not fit is refused before any build
            check_config_against_files(config, files)
        group = parallel.join(tp, device)
        if group is not None:
            if is_pickle or saved_kind or adapter is not None:
                raise ValueError(f"{folder}: tensor parallelism reads a dense safetensors checkpoint (no pickle, "
                                 "no saved quantization: pass quantization= to quantize each rank's slice; "
                                 "merge an adapter first with stablelm merge)")
            return cls._from_pretrained_split(folder, name_or_path, config, files, dtype, device, group, quantization,
                                              fast_inference, linear_format, attn_implementation)
        check_fits_in_memory(config, cls, dtype)
        with skip_init():
            model = cls(config)
        expected = {k: v for k, v in model.state_dict().items()}
        tied = getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in expected
        if tied:
            expected.pop("lm_head.weight")
        if adapter is not None and saved_kind:
            raise ValueError(f"{folder}: an adapter needs the dense checkpoint, not a quantized one")
        optimize = not saved_kind and (quantization or fast_inference) and adapter is None
        staged = StagedWeights(dtype) if optimize and device == "cpu" else None
        loaded, quantized = model._read_checkpoint(files, is_pickle, expected, dtype, device, saved_kind, staged)

        missing = [k for k in expected if k not in loaded and k not in quantized
                   and not (saved_kind and any(f"{k}_{extra}" in quantized for extra in _scheme_extras()))
                   and (staged is None or k not in staged.entries)]
        fresh = [k for k in missing if k in cls.head_keys]
        if len(fresh) != len(missing):
            absent = [k for k in missing if k not in fresh]
            raise ValueError(f"{folder}: checkpoint lacks {len(absent)} tensor(s) the model needs: "
                             f"{', '.join(absent[:8])}{' ...' if len(absent) > 8 else ''}")
        model.load_state_dict(loaded, strict=False, assign=True)
        del loaded, expected  # the modules hold the tensors now; fusing below must be able to free them
        if fresh:
            warnings.warn(f"{folder}: {', '.join(fresh)} not in the checkpoint; initialised randomly (train the head)")
            model._materialize_fresh(fresh, dtype, device)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        if saved_kind:
            fast.load_quantized(model, quantized, saved_kind, str(folder), int8_modules, linear_format)
        elif optimize:
            fast.optimize(model, quantization, fetch=staged, linear_format=linear_format)
            if staged is not None and staged.entries:
                raise ValueError(f"{folder}: tensor(s) not used by the model: {', '.join(sorted(staged.entries)[:5])}")
        if adapter is not None:
            lora.load_adapter(model, adapter)
            if merge_adapter:
                lora.merge_lora(model)
                if quantization or fast_inference:
                    fast.optimize(model, quantization, linear_format=linear_format)
        return model._finish_loading(folder, name_or_path, attn_implementation)

    @classmethod
    def _from_pretrained_split(cls, folder, name_or_path, config, files, dtype, device, group, quantization,
                               fast_inference, linear_format, attn_implementation):
        """This rank's part of a tensor-parallel model: its slices read from the files, then converted."""
        parallel.check_same_checkpoint(group, folder, files)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", group.world))  # ranks on this machine
        check_fits_in_memory(config, cls, dtype, fraction=local / group.world)
        with skip_init():
            model = cls(config)
        split = parallel.shard(model, group)
        parallel.load(model, files, split, dtype, device)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        if quantization or fast_inference:
            fast.optimize(model, quantization, linear_format=linear_format)
        return model._finish_loading(folder, name_or_path, attn_implementation)

    def _finish_loading(self, folder: Path, name_or_path, attn_implementation: str):
        gen_path = folder / "generation_config.json"
        if gen_path.exists():
            self.generation_config = GenerationConfig.from_json_file(gen_path)
        self.name_or_path = str(name_or_path)
        self.set_attn_implementation(attn_implementation)
        return self.eval()

    def _read_checkpoint(self, files: list[Path], is_pickle: bool, expected: dict, dtype: torch.dtype, device: str,
                         quantized_kind: str | None = None, staged: StagedWeights | None = None):
        """(tensors for load_state_dict, quantized linear tensors kept as stored).

        staged: collects the projection weights that fast.optimize will read itself (left out of the first)."""
        loaded: dict[str, torch.Tensor] = {}
        quantized: dict[str, torch.Tensor] = {}
        prefix = self.base_prefix
        for path in files:
            for name, tensor in read_tensors(path, is_pickle, device):
                key = name
                if prefix and not key.startswith(prefix) and key.split(".")[0] not in ("lm_head", "score"):
                    key = prefix + key  # a bare backbone checkpoint loaded under a head
                elif not prefix and key.startswith("model."):
                    key = key[len("model."):]  # a head checkpoint loaded as the bare backbone
                if quantized_kind and (key.endswith(("_proj.weight", *(f"_{e}" for e in _scheme_extras())))
                                       or key == "lm_head.weight"
                                       or (key.endswith("_proj.bias") and ".self_attn." in key)):
                    if key.rpartition(".")[0] + ".weight" in expected or key in expected:
                        quantized[key] = tensor  # a FileTensor is read when its module is built
                        continue
                if key not in expected:
                    if key in ALL_HEAD_KEYS or (not prefix and name in ALL_HEAD_KEYS):
                        continue  # another head's weights, or the tied lm_head copy
                    raise ValueError(f"{path}: unexpected tensor {name!r}; it is not a weight of "
                                     f"{type(self).__name__} with this config.json")
                want = expected[key]
                if tuple(tensor.shape) != tuple(want.shape):
                    raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"config.json implies {tuple(want.shape)}")
                if want.is_floating_point() and not tensor.is_floating_point():
                    raise ValueError(f"{path}: tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                                     "this weight is floating point (a quantized checkpoint needs its "
                                     "quantization_config in config.json)")
                if staged is not None and isinstance(tensor, FileTensor) \
                        and (key.endswith("_proj.weight") or key == "lm_head.weight"):
                    staged.entries[key] = tensor
                    continue
                if isinstance(tensor, FileTensor):
                    tensor = tensor.read()
                loaded[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        return loaded, quantized

    def _materialize_fresh(self, keys: list[str], dtype: torch.dtype, device: str) -> None:
        std = self.config.initializer_range
        for key in keys:
            module_name, _, param_name = key.rpartition(".")
            module = self.get_submodule(module_name)
            old = getattr(module, param_name)
            value = torch.zeros(old.shape, dtype=dtype, device=device)
            if param_name == "weight":
                value.normal_(0.0, std)
            setattr(module, param_name, nn.Parameter(value))

    def set_attn_implementation(self, implementation: str) -> None:
        (self.model if hasattr(self, "model") else self).set_attn_implementation(implementation)

    # -- saving ------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True) -> None:
        """Write config.json, generation_config.json and safetensors shards that transformers loads."""
        if not safe_serialization:
            raise ValueError("only safetensors checkpoints are written (safe_serialization=True)")
        if getattr(self, "lora_config", None) is not None:
            raise ValueError("the model has LoRA adapters: save them with stablelm.layers.lora.save_adapter, or "
                             "fold them in with merge_lora(model) before save_pretrained")
        target = Path(save_directory)
        target.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        shards = shard(state, parse_size(max_shard_size))
        first = next(iter(state.values()))
        config = self.config.replace(architectures=[type(self).__name__],
                                     dtype=str(first.dtype).removeprefix("torch."), extra=dict(self.config.extra))
        if self.quantization is not None:
            config.extra["quantization_config"] = fast.quantization_config(self)

        write_checkpoint(target, shards, sum(t.numel() * t.element_size() for t in state.values()),
                         {"generation_config.json": self.generation_config.save_json, "config.json": config.save_json})


def _scheme_extras() -> set[str]:
    """What the quantization schemes store beside a projection's "weight": "scale", "zero", ... (the key
    `x.weight_scale` ends in `_scale`)."""
    return {suffix.removeprefix("weight_") for scheme in SCHEMES.values()
            for suffix in scheme.stored_layout(1, 64) if suffix != "weight"}
