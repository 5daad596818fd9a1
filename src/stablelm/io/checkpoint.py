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
import zipfile
from pathlib import Path

from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:  # only named in annotations: io sits below models
    from ..models.config import StableLmConfig

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


def check_fits_in_memory(config: StableLmConfig, cls, dtype: torch.dtype, fraction: float = 1.0) -> None:
    """Refuse, before building anything, a config whose weights alone exceed this machine's memory.

    fraction: the share of the weights this machine holds (tensor parallelism: its ranks' slices)."""
    need = int(parameter_count(config, cls) * dtype.itemsize * fraction)
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


def shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
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

