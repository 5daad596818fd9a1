"""Tensor parallelism over torch.distributed: one model split across processes (Megatron's split).

Each rank holds a slice of every projection and reads only that slice from the safetensors files:

    q/k/v, gate/up   by output rows (whole heads; kv heads replicated when there are fewer than ranks)
    o_proj, down     by input columns: each rank's output is a partial sum, all-reduced once per block
                     (once per layer with the parallel residual: attention and MLP partials together)
    embed_tokens     by vocabulary rows: a token outside a rank's rows embeds as zeros, then all-reduce
    lm_head          by vocabulary rows: each rank's logits are all-gathered, so every rank sees them all

LayerNorms and classification heads are replicated. The local projections are ordinary modules, so the
inference layout (stablelm.layers.fast) converts or quantizes each rank's shard as it would a whole
model, and the KV cache holds each rank's own kv heads. Sampled tokens come from rank 0 (`agree`).

Processes come from `torchrun` (RANK / WORLD_SIZE / MASTER_ADDR in the environment) or from `launch`;
the backend is gloo on the CPU and NCCL on CUDA.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import math
import os
import signal
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..io.checkpoint import FileTensor, read_tensors, safetensors_header
from ..layers.fused import Fused


@dataclass
class TensorParallel:
    """This process's place in the tensor-parallel group."""

    rank: int
    world: int
    group: dist.ProcessGroup | None = None

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x` (in place)."""
        dist.all_reduce(x, group=self.group)
        return x

    def gather(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """Every rank's `x` side by side on the last dim, cut to `size` (the vocabulary's padding dropped)."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)[..., :size]

    def agree(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank (sampled tokens: each rank's random numbers differ)."""
        x = x.contiguous()
        dist.broadcast(x, dist.get_global_rank(self.group, 0) if self.group is not None else 0, group=self.group)
        return x

    def share(self, obj=None):
        """Rank 0's picklable `obj` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                                   group=self.group)
        return box[0]


def leave() -> None:
    """Close the process group this process joined, if any. `join` registers it to run at exit: a process
    that exits with gloo's group open can abort there ("terminate called without an active exception",
    gloo's threads outliving the interpreter), which torchrun reports as a failure; seen in 3 of 12
    torchrun runs of a 2-rank script on 2 busy cores, 0 of 14 with this."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def collective_timeout() -> float:
    """Seconds a collective waits for the other ranks before it fails, so one hung rank ends the others
    (STABLELM_TP_TIMEOUT or `--tp-timeout`; default 120, gloo's own is 30 minutes)."""
    text = os.environ.get("STABLELM_TP_TIMEOUT", "120")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"STABLELM_TP_TIMEOUT={text!r}: expected a number of seconds > 0")
    return seconds


def world_from_environment() -> int:
    """The process count torchrun (or `launch`) set, 1 when none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(tp: int | str | None, device: torch.device | str = "cpu") -> TensorParallel | None:
    """The group for `tp` processes ("auto": as many as the environment says), joining the process group
    (gloo on the CPU, NCCL on CUDA) if this process has not yet; None for one process."""
    world = world_from_environment()
    size = world if tp == "auto" else tp
    if size is None or size == 1:
        return None
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tp must be a positive integer or 'auto', got {tp!r}")
    if size != world:
        raise ValueError(f"tp={size} but this process is one of {world}: start {size} processes "
                         f"(torchrun --nproc-per-node {size} ..., or stablelm ... --tp {size})")
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise ValueError("tensor parallelism needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the "
                             "environment: start the processes with torchrun (or stablelm ... --tp N)")
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=collective_timeout()))
        # Closed before the interpreter exits, in any script: gloo's threads outliving it abort the process.
        atexit.register(leave)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return TensorParallel(dist.get_rank(), world)


# -- the split -----------------------------------------------------------------------------------
class Split:
    """Which rows / columns of each weight this rank holds, for one config and world size."""

    def __init__(self, config, tp: TensorParallel):
        check_world(config, tp.world)
        heads, kv_heads, world = config.num_attention_heads, config.num_key_value_heads, tp.world
        d, r = config.head_dim, tp.rank
        self.rank = r
        self.heads = heads // world
        self.kv_heads = max(kv_heads // world, 1)
        self.first_head = r * self.heads
        # The kv heads this rank's query heads read (group = heads / kv_heads query heads per kv head).
        self.first_kv_head = self.first_head // (heads // kv_heads)
        self.inter = config.intermediate_size // world
        self.vocab_rows = -(-config.vocab_size // world)  # padded: every rank the same count
        self.vocab_start = r * self.vocab_rows
        self.vocab_size = config.vocab_size
        self.rows = {  # weight name -> (first output row, count) of this rank's slice
            "q_proj": (self.first_head * d, self.heads * d),
            "k_proj": (self.first_kv_head * d, self.kv_heads * d),
            "v_proj": (self.first_kv_head * d, self.kv_heads * d),
            "gate_proj": (r * self.inter, self.inter),
            "up_proj": (r * self.inter, self.inter),
            "embed_tokens": (self.vocab_start, self.vocab_rows),
            "lm_head": (self.vocab_start, self.vocab_rows),
        }
        self.columns = {"o_proj": (self.first_head * d, self.heads * d), "down_proj": (r * self.inter, self.inter)}
        self.norm_start = {"q_layernorm": self.first_head, "k_layernorm": self.first_kv_head}

    def source(self, key: str) -> tuple[str, int | None, int, int]:
        """(checkpoint key, dim sliced or None, first index, count) of this rank's tensor `key`."""
        parts = key.split(".")
        for owner, start in self.norm_start.items():  # ...q_layernorm.norms.{local head}.weight
            if owner in parts:
                i = parts.index(owner) + 2
                parts[i] = str(start + int(parts[i]))
                return ".".join(parts), None, 0, 0
        name = parts[-2] if len(parts) > 1 else ""
        if name in self.rows:
            return key, 0, *self.rows[name]
        if name in self.columns and parts[-1] == "weight":
            return key, 1, *self.columns[name]
        return key, None, 0, 0


def check_world(config, world: int) -> None:
    """ValueError unless `config`'s heads and MLP split over `world` processes (checked before any starts)."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % world:
        raise ValueError(f"tensor parallelism over {world} processes: num_attention_heads ({heads}) "
                         f"must divide by {world}")
    if kv_heads % world and world % kv_heads:
        raise ValueError(f"tensor parallelism over {world} processes: num_key_value_heads ({kv_heads}) must "
                         f"divide by {world}, or {world} by it (then kv heads are replicated)")
    if config.intermediate_size % world:
        raise ValueError(f"tensor parallelism over {world} processes: intermediate_size "
                         f"({config.intermediate_size}) must divide by {world}")


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the token embedding; tokens outside them embed as zeros before the all-reduce."""

    def __init__(self, split: Split, hidden_size: int, tp: TensorParallel):
        super().__init__()
        self.start, self.rows, self.tp = split.vocab_start, split.vocab_rows, tp
        self.weight = nn.Parameter(torch.empty(split.vocab_rows, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.reduce(out.masked_fill_(outside[..., None], 0))


def shard(model: nn.Module, tp: TensorParallel) -> Split:
    """Rebuild `model`'s (meta-device) modules at this rank's sizes, in place; returns the split."""
    config = model.config
    split = Split(config, tp)
    backbone = model.model if hasattr(model, "model") else model
    h, d, bias = config.hidden_size, config.head_dim, config.use_qkv_bias
    with torch.device("meta"):
        backbone.embed_tokens = VocabParallelEmbedding(split, h, tp)
        for layer in backbone.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.num_heads, attn.num_kv_heads = split.heads, split.kv_heads
            attn.qkv_proj = Fused(q_proj=nn.Linear(h, split.heads * d, bias=bias),
                                  k_proj=nn.Linear(h, split.kv_heads * d, bias=bias),
                                  v_proj=nn.Linear(h, split.kv_heads * d, bias=bias))
            attn.o_proj = nn.Linear(split.heads * d, h, bias=False)
            if config.qk_layernorm:
                attn.q_layernorm = type(attn.q_layernorm)(d, split.heads, config.layer_norm_eps)
                attn.k_layernorm = type(attn.k_layernorm)(d, split.kv_heads, config.layer_norm_eps)
            mlp.gate_up_proj = Fused(gate_proj=nn.Linear(h, split.inter, bias=False),
                                     up_proj=nn.Linear(h, split.inter, bias=False))
            mlp.down_proj = nn.Linear(split.inter, h, bias=False)
            layer.tp = tp
        if hasattr(model, "lm_head"):
            model.lm_head = nn.Linear(h, split.vocab_rows, bias=False)
    for m in {model, backbone}:
        m.tp = tp
    return split


# -- reading each rank's slices --------------------------------------------------------------------
def read_slice(tensor: FileTensor, dim: int | None, start: int, count: int, rows: int | None = None) -> torch.Tensor:
    """Rows or columns [start, start + count) of a tensor in a safetensors file, read from the file alone
    (a column slice is one read per row). Rows past the tensor's end (the vocabulary's padding) are zeros."""
    if dim is None:
        return tensor.read()
    shape = list(tensor.shape)
    if dim == 0:
        have = max(0, min(count, shape[0] - start))
        out = torch.zeros([count] + shape[1:], dtype=tensor.dtype)
        row_bytes = tensor.nbytes // max(shape[0], 1)
        if have:
            part = FileTensor(tensor.path, tensor.name, tensor.offset + start * row_bytes, [have] + shape[1:],
                              tensor.dtype)
            part.read_into(out[:have])
        return out
    n, k = shape
    size, row_bytes = tensor.dtype.itemsize, count * tensor.dtype.itemsize
    out = torch.empty(n, count, dtype=tensor.dtype)
    with open(tensor.path, "rb") as f:
        for row in range(n):
            target = (ctypes.c_char * row_bytes).from_address(out.data_ptr() + row * row_bytes)
            if os.preadv(f.fileno(), [target], tensor.offset + (row * k + start) * size) != row_bytes:
                raise ValueError(f"{tensor.path}: tensor {tensor.name!r} is truncated")
    return out


def load(model: nn.Module, files: list[Path], split: Split, dtype: torch.dtype, device: str) -> None:
    """This rank's slices of every weight `model` needs, from the safetensors `files`, into the model."""
    handles = {}
    for path in files:
        for name, tensor in read_tensors(path, False, "cpu"):
            handles[name] = tensor
    prefix = model.base_prefix
    expected = model.state_dict()
    tied = model.config.tie_word_embeddings and "lm_head.weight" in expected
    state = {}
    for key, want in expected.items():
        if tied and key == "lm_head.weight":
            continue
        source, dim, start, count = split.source(key)
        handle = handles.get(source)
        if handle is None and prefix and source.startswith(prefix):
            handle = handles.get(source[len(prefix):])  # a bare backbone checkpoint under a head
        if handle is None:
            raise ValueError(f"{files[0].parent}: checkpoint lacks {source}")
        if dim is not None and len(handle.shape) <= dim:
            raise ValueError(f"{handle.path}: tensor {source!r} has shape {tuple(handle.shape)}; cannot split it")
        tensor = read_slice(handle, dim, start, count)
        if tuple(tensor.shape) != tuple(want.shape):
            raise ValueError(f"{handle.path}: tensor {source!r} has shape {tuple(handle.shape)}, which does not fit "
                             f"config.json (rank {split.rank} expects the slice {tuple(want.shape)})")
        state[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(state, strict=False, assign=True)  # every key but a tied lm_head is in `state`


def check_same_checkpoint(tp: TensorParallel, folder: Path, files: list[Path]) -> None:
    """ValueError on every rank when the ranks did not open the same checkpoint: config.json, the tensor
    headers, and the weights' bytes (every byte of files up to 64 MiB; 64 KiB of every 16 MiB of larger ones,
    read by every rank, so a checkpoint whose values differ anywhere but in small runs is caught)."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in files:
        digest.update(repr(sorted((k, v if k == "__data_start__" else (v["dtype"], v["shape"], v["data_offsets"]))
                                  for k, v in safetensors_header(path).items())).encode())
        digest.update(sampled_bytes_digest(path))
    mine = digest.hexdigest()[:16]
    every = [None] * tp.world
    dist.all_gather_object(every, (socket.gethostname(), str(folder), mine), group=tp.group)
    if len({entry[2] for entry in every}) > 1:
        listed = "; ".join(f"rank {i}: {host}:{path} ({fp})" for i, (host, path, fp) in enumerate(every))
        raise ValueError(f"the ranks opened different checkpoints (config.json or tensors differ): {listed}")


def sampled_bytes_digest(path: Path, whole: int = 64 << 20, stride: int = 16 << 20, sample: int = 64 << 10) -> bytes:
    """A digest of a file's bytes: all of them up to `whole` bytes, else `sample` bytes at every `stride`
    and the last `sample` (~0.4 % of a large checkpoint: 100 MB of 24 GB)."""
    h = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    with open(path, "rb") as f:
        offsets = [0] if size <= whole else [*range(0, size, stride), max(0, size - sample)]
        for offset in offsets:
            h.update(os.pread(f.fileno(), size if size <= whole else sample, offset))
    return h.digest()


# -- starting processes ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_before_launch(model, world: int) -> None:
    """ValueError when the model at `model` (a folder or hub id) cannot be split over `world` processes, from its
    config alone, before any process is started (`--tp 64` spawned 64 interpreters, 10.7 GB, to say so)."""
    from .config import StableLmConfig

    collective_timeout()  # a bad STABLELM_TP_TIMEOUT is an error here, once, not in every process
    check_world(StableLmConfig.from_pretrained(model), world)


def launch(world: int, target, *args, **kwargs) -> None:
    """Run `target(*args, **kwargs)` in `world` fresh processes on this machine as one group (torchrun's
    environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). If one fails, the others are stopped and
    this raises ChildProcessError."""
    import torch.multiprocessing as mp

    port = free_port()
    context = mp.start_processes(_run_rank, args=(world, port, target, args, kwargs), nprocs=world,
                                 start_method="spawn", join=False)

    stopping = []

    def stop(signum, frame):  # rank 0 winds down and tells the others (a server drains its requests first)
        stopping.append(signum)
        os.kill(context.processes[0].pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not context.join(grace_period=5):  # a failed rank's peers get 5 s, then SIGTERM, then SIGKILL
            pass
    except mp.ProcessExitedException as e:
        if stopping and e.error_index == 0 and e.signal_name == "SIGTERM":
            return  # asked to stop (uvicorn ends by raising the signal again once it has shut down)
        why = f"signal {e.signal_name}" if e.signal_name else f"exit status {e.exit_code}"
        raise ChildProcessError(f"tensor-parallel process {e.error_index} stopped ({why})") from None
    except mp.ProcessRaisedException as e:
        raise ChildProcessError(f"tensor-parallel process {e.error_index} failed: {str(e).strip().splitlines()[-1]}") \
            from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_rank(rank: int, world: int, port: int, target, args, kwargs) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # The cores are shared between the ranks: torch's default (every core per process) oversubscribes them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        result = target(*args, **kwargs)
    finally:
        leave()  # multiprocessing's children end with os._exit: no atexit handlers
    if result:
        raise SystemExit(result)
