"""Checkpoint I/O in the Hugging Face layout: config.json, (sharded) safetensors, generation_config.json.

Models are built on the meta device and filled with `load_state_dict(assign=True)`, so no weight is
initialised only to be overwritten. A save is all-or-nothing (see `write_checkpoint`): whatever stops
it, the folder holds the old checkpoint or the new one.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import struct
import tempfile
import uuid
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import fast
from .config import StableLmConfig, dtype_from_name
from .generation_config import GenerationConfig
from .meta import skip_init
from .hub import resolve_folder

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# Head weights of the other StableLm classes: dropped (with a warning) when loading into this one.
ALL_HEAD_KEYS = ("lm_head.weight", "score.weight", "score.bias")


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like '5GB'")
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(match.group(1)) * units.get((match.group(2) or "B").upper(), 1))


def weight_files(folder: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    """The weight files of a checkpoint folder and whether they are pickles.

    The order is transformers': a single file before a shard index, safetensors before pickle."""
    for index_name, single, is_pickle in ((SAFE_INDEX, SAFE_SINGLE, False), (PICKLE_INDEX, PICKLE_SINGLE, True)):
        if is_pickle and not allow_pickle:
            if (folder / index_name).exists() or (folder / single).exists():
                raise ValueError(
                    f"{folder}: holds only pickle weights ({single}); pickle can run code on load, so it is "
                    "read only when you pass allow_pickle=True (then with torch.load(weights_only=True))")
            break
        if (folder / single).exists():
            return [folder / single], is_pickle
        if (folder / index_name).exists():
            return [folder / name for name in shard_names(folder / index_name)], is_pickle
    raise FileNotFoundError(f"{folder}: no {SAFE_SINGLE} or {SAFE_INDEX}")


def shard_names(index_path: Path) -> list[str]:
    """The shard file names a shard index lists, in order; each must name a file inside its folder."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index_path}: not a valid shard index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path}: weight_map must be an object mapping tensor names to file names, "
                         f"got {type(weight_map).__name__}")
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        normal = os.path.normpath(name)
        if not name or os.path.isabs(name) or normal == ".." or normal.startswith(".." + os.sep) or "\0" in name:
            raise ValueError(f"{index_path}: shard {name!r} is not a file inside the checkpoint folder; refused")
    return names


def read_tensors(path: Path, is_pickle: bool, device: str):
    """Yield (name, tensor) from one weight file, with errors that name the file; safetensors on the CPU
    yield FileTensor handles (read when needed)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: listed in the shard index but missing")
    if is_pickle:
        try:  # a legacy (pre-zip) pickle cannot be memory-mapped
            state = torch.load(path, map_location=device, weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as e:
            raise ValueError(f"{path}: cannot read pickle weights ({type(e).__name__}: {str(e)[:300]})") from None
        yield from state.items()
        return
    try:
        with safe_open(path, framework="pt", device=device) as f:  # validates the header against the file size
            if device != "cpu":
                for name in f.keys():
                    yield name, f.get_tensor(name)
                return
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file, truncated or damaged? ({e})") from None
    yield from _read_safetensors(path)


_SAFE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


class FileTensor:
    """A tensor still in a safetensors file: `read()` it, or `read_into` a buffer of its dtype."""

    def __init__(self, path: Path, name: str, offset: int, shape: list[int], dtype: torch.dtype):
        self.path, self.name, self.offset, self.shape, self.dtype = path, name, offset, torch.Size(shape), dtype
        self.nbytes = self.shape.numel() * dtype.itemsize

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def read(self) -> torch.Tensor:
        return self.read_into(torch.empty(self.shape, dtype=self.dtype))

    def read_into(self, out: torch.Tensor) -> torch.Tensor:
        """Plain file reads straight into `out`'s memory (contiguous, this dtype, this many elements)."""
        if out.dtype != self.dtype or out.numel() != self.shape.numel() or not out.is_contiguous():
            raise ValueError(f"{self.path}: cannot read {self.name!r} into a {out.dtype} tensor of {out.numel()}")
        if self.nbytes:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                target = (ctypes.c_char * self.nbytes).from_address(out.data_ptr())  # no numpy, no intermediate
                if f.readinto(target) != self.nbytes:
                    raise ValueError(f"{self.path}: tensor {self.name!r} is truncated")
        return out.view(self.shape)


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets), metadata left out;
    the data starts at byte `header["__data_start__"]`."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            if header_len > min(size - 8, 100 * 2**20):
                raise ValueError(f"header length {header_len} exceeds the file")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file, truncated or damaged? ({e})") from None
    header.pop("__metadata__", None)
    header["__data_start__"] = 8 + header_len
    return header


def _read_safetensors(path: Path):
    """Yield (name, FileTensor) for each tensor of a (validated) safetensors file, in file order.

    Tensors are read with plain file reads, not through safetensors' memory map: mapped pages count in this
    process's memory until every tensor from the file is freed, so converting the weights (fusing, packing)
    would hold two copies at once.
    """
    header = safetensors_header(path)
    start = header.pop("__data_start__")
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        dtype = _SAFE_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which no StableLM weight uses")
        yield name, FileTensor(path, name, start + info["data_offsets"][0], info["shape"], dtype)


def check_config_against_files(config: StableLmConfig, files: list[Path]) -> None:
    """Refuse a config.json that does not describe these safetensors files, from their headers alone:
    the number of layers and the embedding's shape (what decides the size of everything built)."""
    layers, embed = set(), None
    for path in files:
        if not path.exists():
            raise FileNotFoundError(f"{path}: listed in the shard index but missing")
        header = safetensors_header(path)
        header.pop("__data_start__")
        for name, info in header.items():
            match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            if match:
                layers.add(int(match.group(1)))
            elif name.endswith("embed_tokens.weight") and isinstance(info, dict):
                embed = (path, name, info.get("shape"))
    source = files[0].parent
    if layers and max(layers) + 1 != config.num_hidden_layers:
        raise ValueError(f"{source}: config.json says num_hidden_layers={config.num_hidden_layers}, the weights "
                         f"hold {max(layers) + 1} layers")
    if embed is not None and embed[2] != [config.vocab_size, config.hidden_size]:
        raise ValueError(f"{embed[0]}: tensor {embed[1]!r} has shape {tuple(embed[2])}, config.json implies "
                         f"({config.vocab_size}, {config.hidden_size}) (vocab_size, hidden_size)")


def parameter_count(config: StableLmConfig, cls) -> int:
    """Parameters of `cls` built from `config`, counted from the config alone."""
    h, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    layer = h * (q + 2 * kv) + q * h + 3 * h * inter + 4 * h
    if config.use_qkv_bias:
        layer += q + 2 * kv
    count = config.num_hidden_layers * layer + config.vocab_size * h + 2 * h
    heads = {"StableLmForCausalLM": 0 if config.tie_word_embeddings else config.vocab_size * h,
             "StableLmForSequenceClassification": config.num_labels * h,
             "StableLmForTokenClassification": config.num_labels * (h + 1)}
    return count + heads.get(cls.__name__, 0)


def check_fits_in_memory(config: StableLmConfig, cls, dtype: torch.dtype) -> None:
    """Refuse, before building anything, a config whose weights alone exceed this machine's memory."""
    need = parameter_count(config, cls) * dtype.itemsize
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    if total and need > total:
        raise ValueError(f"config.json describes a {cls.__name__} of {need / 2**30:.1f} GiB in {dtype} "
                         f"(num_hidden_layers={config.num_hidden_layers}, hidden_size={config.hidden_size}, "
                         f"vocab_size={config.vocab_size}, num_labels={config.num_labels}); this machine has "
                         f"{total / 2**30:.1f} GiB")


class StagedWeights:
    """Projection weights left in their files until `fast.optimize` packs them (its `fetch`).

    Each group (q/k/v, gate/up, ...) is read straight into the optimizer's reused staging buffer and packed
    from there, so loading allocates the packed weights once and nothing else: faster, and peak memory is
    about the weights' size.
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.entries: dict[str, FileTensor] = {}

    def __call__(self, keys: list[str], out: torch.Tensor | None = None) -> torch.Tensor:
        parts = [self.entries.pop(key) for key in keys]
        rows, cols, stored = sum(p.shape[0] for p in parts), parts[0].shape[1], parts[0].dtype
        staging = out if out is not None and stored == self.dtype else torch.empty(rows, cols, dtype=stored)
        row = 0
        for part in parts:  # read_into rejects a part stored in another dtype
            part.read_into(staging[row:row + part.shape[0]])
            row += part.shape[0]
        if stored == self.dtype:
            return staging
        return out.copy_(staging) if out is not None else staging.to(self.dtype)


class PreTrainedModel(nn.Module):
    """Base of the StableLm classes: config, from_pretrained, save_pretrained, weight init."""

    base_prefix = ""  # where the backbone's weights sit in this class's state dict
    head_keys: tuple[str, ...] = ()
    inference_kind: str | None = None  # the linear format set by stablelm.fast.optimize ("mkldnn", "native", ...)
    quantization: str | None = None  # "int8" or "int4" when the weights are quantized

    def __init__(self, config: StableLmConfig):
        super().__init__()
        self.config = config
        self.generation_config = GenerationConfig.from_model_config(config)

    # -- conveniences ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype if hasattr(self, "model") else self.embed_tokens.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def optimize_for_inference(self, quantization: str | None = None, linear_format: str | None = None):
        """Fuse projections and convert (or quantize to "int8" / "int4") the weights; see stablelm.fast."""
        return fast.optimize(self, quantization, linear_format=linear_format)

    def train(self, mode: bool = True):
        if mode and fast.is_optimized(self):
            fast.restore(self)  # training needs plain nn.Linear parameters
        return super().train(mode)

    def state_dict(self, *args, **kwargs):
        if fast.is_optimized(self) and not args and not kwargs:
            return fast.reference_state_dict(self)
        return super().state_dict(*args, **kwargs)

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
                        **config_overrides):
        """Load a checkpoint folder or hub id.

        dtype: "auto" (the checkpoint's stored dtype), a torch.dtype or its name; None = float32.
        device: where the weights go (read there directly by safetensors).
        quantization: None, "int8" or "int4" (weight-only; a quantized checkpoint loads as saved).
        fast_inference: fuse projections and prepack weights for the fastest kernels (undone by .train()).
        linear_format: force a weight format (stablelm.linear.FORMATS, e.g. "dense", "native", "int8-torch");
            by default the fastest one this CPU runs (STABLELM_LINEAR sets it too).
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
        check_fits_in_memory(config, cls, dtype)
        with skip_init():
            model = cls(config)
        expected = {k: v for k, v in model.state_dict().items()}
        tied = getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in expected
        if tied:
            expected.pop("lm_head.weight")
        optimize = not saved_kind and (quantization or fast_inference)
        staged = StagedWeights(dtype) if optimize and device == "cpu" else None
        loaded, quantized = model._read_checkpoint(files, is_pickle, expected, dtype, device, saved_kind, staged)

        missing = [k for k in expected if k not in loaded and k not in quantized and f"{k}_scale" not in quantized
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
        gen_path = folder / "generation_config.json"
        if gen_path.exists():
            model.generation_config = GenerationConfig.from_json_file(gen_path)
        model.name_or_path = str(name_or_path)
        model.set_attn_implementation(attn_implementation)
        return model.eval()

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
                if quantized_kind and (key.endswith(("_proj.weight", "_scale", "_zero")) or key == "lm_head.weight"
                                       or (key.endswith("_proj.bias") and ".self_attn." in key)):
                    if key.rpartition(".")[0] + ".weight" in expected or key in expected:
                        quantized[key] = tensor.read() if isinstance(tensor, FileTensor) else tensor
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
        target = Path(save_directory)
        target.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        shards = _shard(state, parse_size(max_shard_size))
        first = next(iter(state.values()))
        config = self.config.replace(architectures=[type(self).__name__],
                                     dtype=str(first.dtype).removeprefix("torch."), extra=dict(self.config.extra))
        if self.quantization is not None:
            config.extra["quantization_config"] = fast.quantization_config(self)

        write_checkpoint(target, shards, sum(t.numel() * t.element_size() for t in state.values()),
                         {"generation_config.json": self.generation_config.save_json, "config.json": config.save_json})


# -- writing a checkpoint all-or-nothing ---------------------------------------------------------
# The weights a folder holds are named by one pointer file, the one a loader (ours, and transformers') reads
# first: model.safetensors, else model.safetensors.index.json. A save writes its shards under names that no
# pointer names yet, then switches the pointer with one rename, then removes what the old pointer named. A
# kill at any moment leaves the old checkpoint or the new one, never a mix; the next save removes leftovers.
def write_checkpoint(target: Path, shards: list[dict[str, torch.Tensor]], total_size: int, writers: dict) -> None:
    """Write `shards` and the small files (`writers`: name -> function(path)) into `target` atomically."""
    remove_leftovers(target)
    live = live_weight_files(target)
    names = [SAFE_SINGLE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) > 1 and set(names) & live:  # the live checkpoint uses these names: take others
        tag = uuid.uuid4().hex[:8]
        names = [f"model-{tag}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with tempfile.TemporaryDirectory(dir=target, prefix=f".saving-{os.getpid()}-") as tmp:
        tmp = Path(tmp)
        for name, shard in zip(names, shards):
            save_file(shard, tmp / name, metadata={"format": "pt"})
            _sync(tmp / name)
        for name, write in writers.items():
            write(tmp / name)
            _sync(tmp / name)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total_size},
                     "weight_map": {k: names[i] for i, shard in enumerate(shards) for k in sorted(shard)}}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            _sync(tmp / SAFE_INDEX)
            for name in names:  # no pointer names these yet
                _replace(tmp / name, target / name)
            _replace(tmp / SAFE_INDEX, target / SAFE_INDEX)
            _unlink(target / SAFE_SINGLE)  # the switch, when the old checkpoint was one file (read first)
        else:
            _replace(tmp / SAFE_SINGLE, target / SAFE_SINGLE)  # the switch
            _unlink(target / SAFE_INDEX)
        for name in writers:
            _replace(tmp / name, target / name)
    for old in live - set(names) - {SAFE_INDEX}:
        _unlink(target / old)
    _sync(target)


def live_weight_files(folder: Path) -> set[str]:
    """The safetensors files the folder's pointer names now (and the pointer)."""
    if (folder / SAFE_SINGLE).exists():
        return {SAFE_SINGLE}
    if (folder / SAFE_INDEX).exists():
        try:
            return set(shard_names(folder / SAFE_INDEX)) | {SAFE_INDEX}
        except ValueError:
            return {SAFE_INDEX}
    return set()


def remove_leftovers(folder: Path) -> None:
    """Remove what interrupted saves left: their temporary folders, and shards that no pointer names."""
    for tmp in folder.glob(".saving-*"):
        pid = tmp.name.split("-")[1] if tmp.name.count("-") >= 2 else ""
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another process is saving here right now
        shutil.rmtree(tmp, ignore_errors=True)
    live = live_weight_files(folder)
    for path in folder.glob("model*.safetensors"):
        if path.name not in live:
            _unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    os.chmod(dst, 0o666 & ~_umask())  # the temporary folder's files are private until moved in


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _sync(path: Path) -> None:
    """Flush a file (or a folder's entries) to the disk, so a rename never publishes unwritten data."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split a state dict in order into shards of at most max_bytes (a bigger tensor gets its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards

