"""Run the kernel tests at the AVX-512 level on a CPU without AVX-512, through SIMDe's emulation.

The native kernels' AVX-512 functions are compiled with a `target("avx512f,...")` attribute and run only where
the CPU has AVX-512. This tool checks their arithmetic on any x86-64 CPU with AVX2: it builds a copy of the
kernels in which the AVX-512 intrinsics are SIMDe's portable versions (https://github.com/simd-everywhere/simde,
Debian's `libsimde-dev`), the AVX-512 functions are compiled for AVX2, and the CPU probe reports AVX-512; then
it runs the given pytest arguments (default: tests/test_linear.py and tests/test_fast.py, ~15 s once built)
against that build, where every test that loops over `native_isa_levels()` also runs "avx512", and the formats
pick it as this CPU's best.

It checks what the intrinsics compute (and that aligned 512-bit loads and stores get 64-byte aligned addresses),
not speed, and not what SIMDe does not emulate (a wrong `target` list: the real build catches that): a CPU with
AVX-512 is still the real test.

    apt-get install libsimde-dev      # header-only
    python tools/emulate_avx512.py                                   # the kernel and format tests
    python tools/emulate_avx512.py -q tests/test_linear.py -k "gemm and avx512"
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

import stablelm.kernels as kernels

SIMDE = Path("/usr/include/simde/x86/avx512.h")

# What SIMDe 0.7.4 (Debian 12) lacks or aliases wrongly, built from its AVX2 halves.
SHIM = r"""
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
namespace emu {
inline simde__m512i join(__m256i lo, __m256i hi) {
  simde__m512i_private r;
  r.m256i[0] = lo;
  r.m256i[1] = hi;
  return simde__m512i_from_private(r);
}
inline simde__m512 join(__m256 lo, __m256 hi) {
  simde__m512_private r;
  r.m256[0] = lo;
  r.m256[1] = hi;
  return simde__m512_from_private(r);
}
inline __m256i lo(simde__m512i v) { return simde__m512i_to_private(v).m256i[0]; }
inline __m256i hi(simde__m512i v) { return simde__m512i_to_private(v).m256i[1]; }
inline __m256 lo(simde__m512 v) { return simde__m512_to_private(v).m256[0]; }
inline __m256 hi(simde__m512 v) { return simde__m512_to_private(v).m256[1]; }
inline simde__m512i cvtepu16_epi32(__m256i a) {
  return join(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(a)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(a, 1)));
}
inline simde__m512i cvtepi8_epi32(__m128i a) {
  return join(_mm256_cvtepi8_epi32(a), _mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)));
}
inline simde__m512 cvtph_ps(__m256i a) {
  return join(_mm256_cvtph_ps(_mm256_castsi256_si128(a)), _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1)));
}
inline simde__m512 cvtepi32_ps(simde__m512i a) { return join(_mm256_cvtepi32_ps(lo(a)), _mm256_cvtepi32_ps(hi(a))); }
// Masked loads read only the lanes the mask names, as the instructions do (no fault past a buffer's end).
inline __m256i maskz_loadu_epi8(uint32_t mask, const void* p) {
  alignas(32) int8_t lanes[32] = {};
  for (int i = 0; i < 32; ++i) if (mask >> i & 1) lanes[i] = static_cast<const int8_t*>(p)[i];
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
}
inline simde__m512i maskz_loadu_epi16(uint32_t mask, const void* p) {
  alignas(64) int16_t lanes[32] = {};
  for (int i = 0; i < 32; ++i) if (mask >> i & 1) lanes[i] = static_cast<const int16_t*>(p)[i];
  return join(_mm256_load_si256(reinterpret_cast<const __m256i*>(lanes)),
              _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes + 16)));
}
// Aligned loads and stores fault on an address that is not a multiple of 64 on a real CPU: here they abort.
inline void check_aligned(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 64) {
    fprintf(stderr, "emulate_avx512: %s at %p, not 64-byte aligned (a fault on AVX-512 hardware)\n", what, p);
    abort();
  }
}
inline simde__m512 load_ps(const void* p) { check_aligned(p, "_mm512_load_ps"); return simde_mm512_loadu_ps(p); }
inline simde__m512i load_si512(const void* p) { check_aligned(p, "_mm512_load_si512"); return simde_mm512_loadu_si512(p); }
inline void store_ps(void* p, simde__m512 v) { check_aligned(p, "_mm512_store_ps"); simde_mm512_storeu_ps(p, v); }
inline void store_si512(void* p, simde__m512i v) { check_aligned(p, "_mm512_store_si512"); simde_mm512_storeu_si512(p, v); }
inline float reduce_add_ps(simde__m512 v) {  // GCC's order: halves, quarters, pairs, then the last two
  const __m256 a = _mm256_add_ps(hi(v), lo(v));
  const __m128 b = _mm_add_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
  const __m128 c = _mm_add_ps(b, _mm_shuffle_ps(b, b, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(c) + _mm_cvtss_f32(_mm_shuffle_ps(c, c, 1));
}
inline simde__m512i madd_epi16(simde__m512i a, simde__m512i b) {
  return join(_mm256_madd_epi16(lo(a), lo(b)), _mm256_madd_epi16(hi(a), hi(b)));
}
}  // namespace emu
#define _mm512_cvtepu16_epi32(a) emu::cvtepu16_epi32(a)
#define _mm512_cvtepi8_epi32(a) emu::cvtepi8_epi32(a)
#define _mm512_cvtph_ps(a) emu::cvtph_ps(a)
#define _mm512_cvtepi32_ps(a) emu::cvtepi32_ps(a)
#define _mm512_reduce_add_ps(a) emu::reduce_add_ps(a)
#define _mm256_maskz_loadu_epi8(m, p) emu::maskz_loadu_epi8(m, p)
#define _mm512_maskz_loadu_epi16(m, p) emu::maskz_loadu_epi16(m, p)
#undef _mm512_load_ps
#undef _mm512_load_si512
#undef _mm512_store_ps
#undef _mm512_store_si512
#define _mm512_load_ps(p) emu::load_ps(p)
#define _mm512_load_si512(p) emu::load_si512(p)
#define _mm512_store_ps(p, v) emu::store_ps(p, v)
#define _mm512_store_si512(p, v) emu::store_si512(p, v)
#undef _mm512_madd_epi16
#define _mm512_madd_epi16(a, b) emu::madd_epi16(a, b)
"""

# (text in the source, its replacement): each must occur exactly once in a source that uses AVX-512.
REPLACEMENTS = [
    ("#include <immintrin.h>\n", "#include <immintrin.h>\n" + SHIM),
    ('#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))',
     '#define AVX512 __attribute__((target("avx2,fma,f16c")))'),
    ('  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && '
     '__builtin_cpu_supports("avx512vl"))',
     '  if (__builtin_cpu_supports("avx2"))  // emulated: SIMDe runs the AVX-512 functions'),
]


def emulated_sources(folder: Path) -> list[Path]:
    out = []
    for source in kernels._SOURCES:
        text = source.read_text()
        uses_avx512 = "_mm512" in text
        for old, new in REPLACEMENTS:
            count = text.count(old)
            if count > 1 or (count == 0 and uses_avx512):
                raise SystemExit(f"{source.name}: expected {old!r} once, found it {count} times; update this tool")
            if uses_avx512:
                text = text.replace(old, new)
        copy = folder / source.name
        copy.write_text(text)
        out.append(copy)
    return out


def main(argv: list[str]) -> int:
    if not SIMDE.exists():
        print(f"{SIMDE} is missing: apt-get install libsimde-dev", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        kernels._SOURCES[:] = emulated_sources(Path(tmp))
        # AVX2 native everywhere, so SIMDe emulates only AVX-512, on AVX2 types (this CPU runs AVX2).
        kernels._CFLAGS[:] = [*kernels._CFLAGS, "-mavx2", "-mfma", "-mf16c"]
        ops = kernels.native_ops()
        if ops is None or int(ops.isa_level()) != kernels.ISA_LEVELS.index("avx512"):
            print("the emulated build did not load, or does not report AVX-512", file=sys.stderr)
            return 2
        print("emulated build loaded; ISA levels:", kernels.native_isa_levels(), file=sys.stderr)
        return pytest.main(argv or ["-q", "-p", "no:cacheprovider", "tests/test_linear.py", "tests/test_fast.py"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
