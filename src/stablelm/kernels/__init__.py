"""What this CPU can run, chosen once: the native kernels (built on first use) and torch's private ops.

Every path is probed with a tiny trial before it is used, never assumed from the CPU's name, and every
choice can be forced for tests and measurements:

- ``STABLELM_LINEAR=<format>`` (or ``from_pretrained(..., linear_format=...)``) picks the weight format,
  see ``stablelm.linear.FORMATS``;
- ``STABLELM_ISA=scalar|avx2|avx512`` caps the native kernels' instruction set;
- ``STABLELM_NATIVE=0`` never builds or loads the native kernels (the torch paths still work).

``stablelm.linear.describe()`` reports what was found and chosen; ``stablelm bench`` prints it and
records it in its JSON.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import threading
from pathlib import Path
from typing import NamedTuple

import torch

from . import build

ISA_LEVELS = ("scalar", "avx2", "avx512")
_SOURCES = [Path(__file__).with_name(name) for name in ("linear.cpp", "attention.cpp")]
_lock = threading.Lock()


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
              "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    """The SIMD features /proc/cpuinfo lists that the kernels or oneDNN can use (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in SIMD_FLAGS if flag in present]
    except OSError:
        pass
    return []


def cpu_capability() -> str:
    """torch's own view of the CPU: "AVX512", "AVX2", "DEFAULT", ..."""
    return torch.backends.cpu.get_cpu_capability()


_CFLAGS = ["-O3", "-fopenmp"]


@functools.cache
def native_ops():
    """torch.ops.stablelm_kernels, built from linear.cpp and attention.cpp on first use (cached, see
    `build`), or None.

    None when STABLELM_NATIVE=0, on a non-x86 CPU, or when the build fails (no compiler, no ninja, another
    process building for longer than STABLELM_BUILD_WAIT): then one line says so and the torch paths are used.
    """
    if os.environ.get("STABLELM_NATIVE", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    with _lock:
        try:
            build.load("stablelm_kernels", _SOURCES, _CFLAGS, announce="stablelm: building the native CPU kernels "
                       "for this CPU")
        except Exception as e:  # noqa: BLE001 - any build failure means the same: use torch's kernels
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            print(f"stablelm: native CPU kernels unavailable ({reason[:300]}); using torch's kernels, "
                  "slower for bf16/fp16 and quantized decoding on CPUs without native bf16", file=sys.stderr)
            return None
    return torch.ops.stablelm_kernels


def native_isa() -> int | None:
    """The ISA level the native kernels run at (index into ISA_LEVELS), or None without them.

    The CPU's best level, capped by STABLELM_ISA."""
    ops = native_ops()
    if ops is None:
        return None
    best = int(ops.isa_level())
    forced = os.environ.get("STABLELM_ISA")
    if forced:
        if forced not in ISA_LEVELS:
            raise ValueError(f"STABLELM_ISA={forced!r}: expected one of {ISA_LEVELS}")
        if ISA_LEVELS.index(forced) > best:
            raise ValueError(f"STABLELM_ISA={forced}: this CPU supports at most {ISA_LEVELS[best]}")
        return ISA_LEVELS.index(forced)
    return best


def native_isa_levels() -> list[str]:
    """Every ISA level the native kernels can run at on this CPU (for tests that force each)."""
    ops = native_ops()
    return [] if ops is None else list(ISA_LEVELS[:int(ops.isa_level()) + 1])


@functools.cache
def mkldnn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN's prepacked linear runs in `dtype` here (bf16/fp16 need CPU support): a tiny trial."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 16, dtype=dtype), 1)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 16, dtype=dtype), w, None, "none", [], "")
        return bool(torch.all(y.float() == 16))
    except RuntimeError:
        return False


@functools.cache
def int8_op_works() -> bool:
    """Whether torch's weight-only int8 kernel gives right answers here: a tiny trial."""
    try:
        x = torch.arange(64, dtype=torch.float32).view(2, 32) / 64
        q = torch.ones(16, 32, dtype=torch.int8)
        y = torch.ops.aten._weight_int8pack_mm(x, q, torch.full((16,), 2.0))
        return bool(torch.allclose(y, (x.sum(1, keepdim=True) * 2).expand(2, 16)))
    except RuntimeError:
        return False


def fast_16bit_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices natively (AVX512-BF16 / AMX / AVX-NE-CONVERT...).

    Without it, torch's bf16/fp16 matmuls run 4-8x slower than fp32 here, so prompts and training compute
    in fp32 instead. oneDNN's prepacked linear refuses bf16/fp16 on exactly those CPUs."""
    return dtype == torch.float32 or mkldnn_supports(dtype)


# The checks live here, before the call: an error raised inside the extension crossed the library boundary
# as a crash on one machine (torch 2.11 + another libstdc++), so the C++ checks are only a last line.
def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, isa: int = -1,
         bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K) bf16 / fp16 / int8 (times `scale` (N,) float32 per row) -> (M, N), at ISA
    level `isa` (-1: the best this CPU has). x is float32, bfloat16 or float16 (widened to fp32); the result
    has x's dtype, accumulated in fp32 with `bias` added before the one rounding (as do gemv_q8 and gemv_q16)."""
    _check_rows(x, weight.shape[1] if weight.dim() == 2 else -1)
    if weight.dim() != 2 or not weight.is_contiguous() or weight.dtype not in (torch.bfloat16, torch.float16, torch.int8):
        raise ValueError(f"gemv: weight must be a contiguous (N, K) bf16, fp16 or int8 tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if weight.dtype == torch.int8 and (scale is None or scale.dtype != torch.float32 or not scale.is_contiguous()
                                       or scale.numel() != weight.shape[0]):
        raise ValueError(f"gemv: int8 weights need a contiguous float32 scale of {weight.shape[0]} rows")
    return torch.ops.stablelm_kernels.gemv(x, weight, scale, _check_isa(isa), _bias(bias, weight.shape[0]))


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int,
              isa: int = -1) -> torch.Tensor:
    """x (M, K) float32 @ int4 weights (see linear.cpp for the layout) -> (M, N) float32."""
    if packed.dim() != 2 or packed.dtype != torch.uint8 or not packed.is_contiguous():
        raise ValueError(f"gemv_int4: packed must be contiguous (N, K / 2) uint8, got {packed.dtype} {tuple(packed.shape)}")
    n, k = packed.shape[0], packed.shape[1] * 2
    _check_rows(x, k, (torch.float32,))
    if group % 32 or k % group:
        raise ValueError(f"gemv_int4: group {group} must be a multiple of 32 that divides K = {k}")
    for name, t in (("scale", scale), ("offset", offset)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != n * (k // group):
            raise ValueError(f"gemv_int4: {name} must be contiguous float32 ({n}, {k // group})")
    return torch.ops.stablelm_kernels.gemv_int4(x, packed, scale, offset, group, _check_isa(isa))


def gemv_q8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
            group: int = 0, isa: int = -1, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) float32, rounded to int8 per block of 32 inputs (d = max|x| / 127), times int8 weights
    (N, K) with `scale` (N,) float32, or packed int4 weights (N, K / 2) with `scale` and `zero` (N, K / group),
    both float32 or both bfloat16, w = (q - 8) * scale + zero; products summed in integers per block, the
    zero points against the exact activations. K must be a multiple of 32."""
    int4 = weight.dtype == torch.uint8
    if weight.dim() != 2 or not weight.is_contiguous() or weight.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"gemv_q8: weight must be contiguous int8 (N, K) or packed int4 (N, K / 2) uint8, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape[0], weight.shape[1] * (2 if int4 else 1)
    _check_rows(x, k)
    if k % 32:
        raise ValueError(f"gemv_q8: K = {k} is not a multiple of the 32-input block")
    groups = k // group if int4 and group and not group % 32 and not k % group else None
    if int4 and (groups is None or zero is None):
        raise ValueError(f"gemv_q8: int4 weights need a group (multiple of 32 dividing K = {k}) and zero points")
    dtypes = (torch.float32, torch.bfloat16) if int4 else (torch.float32,)
    for name, t in (("scale", scale), ("zero", zero if int4 else scale)):
        if t.dtype not in dtypes or t.dtype != scale.dtype or not t.is_contiguous() or t.numel() != n * (groups or 1):
            raise ValueError(f"gemv_q8: {name} must be contiguous {' or '.join(map(str, dtypes))} (the scale's "
                             f"dtype) with {n * (groups or 1)} values")
    return torch.ops.stablelm_kernels.gemv_q8(x, weight, scale, zero, group, _check_isa(isa), _bias(bias, n))


def gemv_q16(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, isa: int = -1,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) float32, rounded to int16 per block of 128 inputs (d = max|x| / 32767; the last block may be
    shorter), times int8 weights (N, K) with `scale` (N,) float32; products summed in integers per block."""
    if weight.dim() != 2 or not weight.is_contiguous() or weight.dtype != torch.int8:
        raise ValueError(f"gemv_q16: weight must be contiguous int8 (N, K), got {weight.dtype} {tuple(weight.shape)}")
    _check_rows(x, weight.shape[1])
    if scale.dtype != torch.float32 or not scale.is_contiguous() or scale.numel() != weight.shape[0]:
        raise ValueError(f"gemv_q16: scale must be contiguous float32 with {weight.shape[0]} values")
    return torch.ops.stablelm_kernels.gemv_q16(x, weight, scale, _check_isa(isa), _bias(bias, weight.shape[0]))


def gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, offset: torch.Tensor | None = None,
         group: int = 0, isa: int = -1, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Prompt rows: x (M, K) float32/bfloat16/float16 @ weight -> (M, N) in x's dtype, `bias` added before the
    one rounding. weight: (N, K) bf16 / fp16, int8 (outputs times `scale` (N,) float32), or int4 packed as
    gemv_int4's (N, K / 2) uint8 with `scale` and `offset` (N, K / group) float32, w = q * scale + offset.
    A blocked fp32 GEMM (AVX2 and up; below it the caller multiplies in torch): each output summed in one
    order, whatever rows are beside it."""
    if weight.dim() != 2 or not weight.is_contiguous() or \
            weight.dtype not in (torch.bfloat16, torch.float16, torch.int8, torch.uint8):
        raise ValueError(f"gemm: weight must be a contiguous (N, K) bf16, fp16, int8 or packed int4 (uint8) tensor, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape[0], weight.shape[1] * (2 if weight.dtype == torch.uint8 else 1)
    _check_rows(x, k)
    if weight.dtype == torch.int8 and (scale is None or scale.dtype != torch.float32 or not scale.is_contiguous()
                                       or scale.numel() != n):
        raise ValueError(f"gemm: int8 weights need a contiguous float32 scale of {n} rows")
    if weight.dtype == torch.uint8:
        if group <= 0 or group % 32 or k % group:
            raise ValueError(f"gemm: group {group} must be a multiple of 32 that divides K = {k}")
        for name, t in (("scale", scale), ("offset", offset)):
            if t is None or t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != n * (k // group):
                raise ValueError(f"gemm: int4 weights need a contiguous float32 {name} ({n}, {k // group})")
    isa = _check_isa(isa)
    level = _best_isa() if isa < 0 else isa
    if level < ISA_LEVELS.index("avx2"):
        raise ValueError(f"gemm: runs at AVX2 and up, not {ISA_LEVELS[level]} (below it, multiply in torch)")
    return torch.ops.stablelm_kernels.gemm(x, weight, scale, offset, group, isa, _bias(bias, n))


class Lossless(NamedTuple):
    """A bf16 weight (N, K) in 12 bits a weight, exactly (see linear.cpp): `values` (N, K64 / 64 * 96) uint8
    (codes and low bytes of the first K64 = K - K % 64 inputs), `table` (N, 16) uint8 (each row's high bytes),
    `tail` (N, K % 64) bf16 (the last inputs as they are), and the weights no table entry holds: `starts`
    (N + 1,) int64 (row r's are [starts[r], starts[r + 1])), `columns` (E,) int32 and `exceptions` (E,) bf16."""

    values: torch.Tensor
    table: torch.Tensor
    tail: torch.Tensor
    starts: torch.Tensor
    columns: torch.Tensor
    exceptions: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[0], self.values.shape[1] // 96 * 64 + self.tail.shape[1]


def lossless_pack(weight: torch.Tensor, isa: int = -1) -> Lossless:
    """A contiguous (N, K) bf16 weight in the 12-bit lossless layout (lossless_unpack gives its bits back);
    every ISA level writes the same bytes."""
    if weight.dim() != 2 or weight.dtype != torch.bfloat16 or not weight.is_contiguous():
        raise ValueError(f"lossless_pack: weight must be a contiguous (N, K) bfloat16 tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    isa = _check_isa(isa)  # loads the extension before its op is looked up
    return Lossless(*torch.ops.stablelm_kernels.lossless_pack(weight, isa))


def lossless_unpack(weight: Lossless, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The (N, K) weight back: its exact bf16 bits, or their fp32 values."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"lossless_unpack: dtype must be bfloat16 or float32, not {dtype}")
    out = torch.empty(weight.shape, dtype=dtype)
    torch.ops.stablelm_kernels.lossless_unpack(*weight, out)
    return out


def gemv_lossless(x: torch.Tensor, weight: Lossless, isa: int = -1, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) float32/bfloat16/float16 @ a lossless bf16 weight -> (M, N) in x's dtype, as gemv computes with
    the unpacked weight (the exceptions summed after each row's other inputs)."""
    n, k = weight.shape
    _check_rows(x, k)
    return torch.ops.stablelm_kernels.gemv_lossless(x, *weight, _check_isa(isa), _bias(bias, n))


def gemm_lossless(x: torch.Tensor, weight: Lossless, isa: int = -1, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Prompt rows against a lossless bf16 weight: gemm's product, each panel decoded as it is packed."""
    n, k = weight.shape
    _check_rows(x, k)
    isa = _check_isa(isa)
    if (_best_isa() if isa < 0 else isa) < ISA_LEVELS.index("avx2"):
        raise ValueError("gemm_lossless: runs at AVX2 and up (below it, unpack and multiply in torch)")
    return torch.ops.stablelm_kernels.gemm_lossless(x, *weight, isa, _bias(bias, n))


def paged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, blocks: torch.Tensor,
                    starts: torch.Tensor, lengths: torch.Tensor, block_size: int, scale: float,
                    isa: int = -1) -> torch.Tensor:
    """Attention over a block pool. q (T, H, D) float32: the query tokens of segment r (one sequence) at
    starts[r]..starts[r+1]-1; keys/values (H_kv, slots, D) fp32/bf16/fp16, slot = block * block_size + offset;
    blocks (segments, max_blocks) int64, each segment's blocks in order; lengths (T,) int64 >= 1, the
    positions each token attends to. Returns (T, H, D) float32. isa: 0 scalar, >= 1 AVX2, -1 the best."""
    t, h, d = q.shape if q.dim() == 3 else (None, None, None)
    if t is None or q.dtype != torch.float32 or not q.is_contiguous():
        raise ValueError(f"paged_attention: q must be a contiguous (T, H, D) float32 tensor, got {q.dtype} "
                         f"{tuple(q.shape)}")
    if keys.dim() != 3 or keys.shape != values.shape or keys.dtype != values.dtype or keys.shape[2] != d \
            or h % keys.shape[0] or not (keys.is_contiguous() and values.is_contiguous()) \
            or keys.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"paged_attention: keys/values must be contiguous (H_kv, slots, {d}) fp32/bf16/fp16 with "
                         f"H_kv dividing {h}, got {keys.dtype} {tuple(keys.shape)} and {values.dtype} "
                         f"{tuple(values.shape)}")
    slots = keys.shape[1]
    if block_size < 1 or slots % block_size:
        raise ValueError(f"paged_attention: block_size {block_size} must divide the pool's {slots} slots")
    if blocks.dim() != 2 or blocks.dtype != torch.long or not blocks.is_contiguous():
        raise ValueError("paged_attention: blocks must be a contiguous (segments, max_blocks) int64 tensor")
    segments = blocks.shape[0]
    if starts.shape != (segments + 1,) or starts.dtype != torch.long or lengths.shape != (t,) \
            or lengths.dtype != torch.long or int(starts[0]) != 0 or int(starts[-1]) != t \
            or bool((starts.diff() < 0).any()):
        raise ValueError(f"paged_attention: starts must be ({segments + 1},) int64 from 0 to {t}, not decreasing, "
                         f"and lengths ({t},) int64")
    segment = torch.repeat_interleave(torch.arange(segments), starts.diff())
    used = -(-lengths // block_size)
    if bool((lengths < 1).any()) or bool((used > blocks.shape[1]).any()):
        raise ValueError(f"paged_attention: lengths must be >= 1 and within the table's {blocks.shape[1]} blocks")
    named = blocks[segment][torch.arange(blocks.shape[1])[None] < used[:, None]]
    if bool(((named < 0) | (named >= slots // block_size)).any()):
        raise ValueError(f"paged_attention: a block outside the pool of {slots // block_size}")
    _check_isa(min(max(isa, 0), 1))  # loads the extension; AVX2 is the kernel's top level
    return torch.ops.stablelm_kernels.paged_attention(q, keys, values, blocks, starts.contiguous(),
                                                      lengths.contiguous(), block_size, scale, isa)


def quantize_blocks_reference(x: torch.Tensor, block: int = 32, levels: int = 127) -> torch.Tensor:
    """What gemv_q8 (block 32, levels 127) and gemv_q16 (block 128, levels 32767) multiply instead of x:
    each block rounded to integer steps of max|x| / levels; the last block may be shorter."""
    pieces = []
    for part in x.split(block, dim=1):
        amax = part.abs().amax(-1, keepdim=True)
        inverse = torch.where(amax > 0, levels / amax, torch.zeros_like(amax))
        pieces.append((part * inverse).round() * (amax / levels))
    return torch.cat(pieces, dim=1)


def _bias(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The products' optional bias, checked: (N,) contiguous, any floating dtype. The kernels add it in fp32
    and round the sum once to x's dtype, their output dtype."""
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous() or not bias.is_floating_point()):
        raise ValueError(f"native kernels: bias must be a contiguous floating ({n},) tensor, got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    return bias


def _check_rows(x: torch.Tensor, k: int, dtypes=(torch.float32, torch.bfloat16, torch.float16)) -> None:
    if x.dim() != 2 or x.dtype not in dtypes or not x.is_contiguous():
        raise ValueError(f"native kernels: x must be a contiguous (M, K) {' or '.join(map(str, dtypes))} tensor, got "
                         f"{x.dtype} {tuple(x.shape)}")
    if x.shape[1] != k:
        raise ValueError(f"native kernels: x has {x.shape[1]} columns, the weight {k}")
    if x.shape[0] < 1:
        raise ValueError("native kernels: x has no rows")


@functools.cache
def _best_isa() -> int:
    return int(native_ops().isa_level())


def _check_isa(isa: int) -> int:
    best = _best_isa()
    if isa > best:
        raise ValueError(f"native kernels: ISA level {ISA_LEVELS[isa] if isa < len(ISA_LEVELS) else isa} is not "
                         f"supported by this CPU (best: {ISA_LEVELS[best]})")
    return isa
