// Matrix products on x86 CPUs: y (M, N) = x (M, K) W^T with the weight read in its stored form.
// Decoding (M small: a decode batch, or a short prompt chunk beside it) streams the weight (gemv, gemv_int4,
// gemv_q8, gemv_q16); prompts past the caller's crossover take the blocked GEMM (gemm, at the end).
//
// Batch-1 decoding reads every weight once per token, so its speed is bytes moved / memory bandwidth.
// These kernels read the weight in its stored form (bf16, fp16, int8 per row, int4 in groups) and
// widen it in registers to fp32, accumulating in fp32; torch has no such path on CPUs without native
// bf16/fp16 matmuls (it converts, or runs scalar code). The int8 and int4 decode products (gemv_q16,
// gemv_q8) instead round the activations per block and sum in integers (see below). Each ISA level is a separate function compiled
// with a `target` attribute, so one build holds every level and the caller picks one at run time.
//
// Layouts (all row-major, one row per output feature):
//   bf16 / fp16: (N, K) as stored in the checkpoint.
//   int8:        (N, K) int8 with one fp32 scale per row: w = q * scale.
//   int4:        (N, K / 2) bytes in blocks of 32 inputs: byte j of a block holds input j in its low nibble
//                and input 16 + j in its high nibble (ggml's Q4_0 order); groups of `group` inputs
//                (a multiple of 32) share a scale and a zero point. gemv_int4 (fp32 activations): fp32 scale
//                and offset, w = q * scale + offset. gemv_q8: fp32 or bf16 scale and zero as the checkpoint
//                stores them, w = (q - 8) * scale + zero (bf16: 4.5 bits a weight, as ggml's Q4_0).
//   bf16 lossless (gemv_lossless, gemm_lossless): 12 bits a weight, see "bf16 in 12 bits" below.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
enum Kind { kBF16, kF16, kI8 };

int64_t best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kAvx2;
  return kScalar;
}

// ---- scalar (any x86-64) -------------------------------------------------------------------------
template <Kind kind>
inline float load_scalar(const void* w, int64_t i) {
  if constexpr (kind == kBF16) {
    uint32_t bits = uint32_t(static_cast<const uint16_t*>(w)[i]) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  } else if constexpr (kind == kF16) {
    return float(static_cast<const c10::Half*>(w)[i]);
  } else {
    return float(static_cast<const int8_t*>(w)[i]);
  }
}

template <Kind kind>
void rows_scalar(const float* x, int64_t m, const void* w, const float* scale, float* y, int64_t n_begin,
                 int64_t n_end, int64_t n, int64_t k) {
  for (int64_t row = n_begin; row < n_end; ++row) {
    const int64_t base = row * k;
    for (int64_t r = 0; r < m; ++r) {
      float acc = 0.f;
      for (int64_t i = 0; i < k; ++i) acc += x[r * k + i] * load_scalar<kind>(w, base + i);
      y[r * n + row] = scale ? acc * scale[row] : acc;
    }
  }
}

// ---- AVX2 + FMA + F16C ---------------------------------------------------------------------------
#define AVX2 __attribute__((target("avx2,fma,f16c")))

template <Kind kind>
AVX2 inline __m256 load8(const void* w, int64_t i) {
  if constexpr (kind == kBF16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (kind == kF16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i)));
  } else {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(w) + i));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  }
}

AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// NR weight rows against MR activation rows: MR * NR accumulators, each weight vector loaded once.
template <Kind kind, int MR, int NR>
AVX2 void tile_avx2(const float* x, int64_t k, const void* w, int64_t row, const float* scale, float* y, int64_t n) {
  __m256 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t k8 = k - k % 8;
  for (int64_t i = 0; i < k8; i += 8) {
    __m256 wv[NR];
    for (int c = 0; c < NR; ++c) wv[c] = load8<kind>(w, (row + c) * k + i);
    for (int r = 0; r < MR; ++r) {
      __m256 xv = _mm256_loadu_ps(x + r * k + i);
      for (int c = 0; c < NR; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) {
      float s = hsum8(acc[r][c]);
      for (int64_t i = k8; i < k; ++i) s += x[r * k + i] * load_scalar<kind>(w, (row + c) * k + i);
      y[r * n + row + c] = scale ? s * scale[row + c] : s;
    }
}

// One weight row, read as a single stream (interleaving rows costs streaming speed), four independent
// accumulators along K so the adds' latency is hidden.
template <Kind kind, int MR>
AVX2 void row_avx2(const float* x, int64_t k, const void* w, int64_t row, const float* scale, float* y, int64_t n) {
  __m256 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < 4; ++u) acc[r][u] = _mm256_setzero_ps();
  const int64_t k32 = k - k % 32, k8 = k - k % 8;
  for (int64_t i = 0; i < k32; i += 32) {
    __m256 wv[4];
    for (int u = 0; u < 4; ++u) wv[u] = load8<kind>(w, row * k + i + 8 * u);
    for (int r = 0; r < MR; ++r)
      for (int u = 0; u < 4; ++u) acc[r][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i + 8 * u), wv[u], acc[r][u]);
  }
  for (int64_t i = k32; i < k8; i += 8) {
    const __m256 wv = load8<kind>(w, row * k + i);
    for (int r = 0; r < MR; ++r) acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i), wv, acc[r][0]);
  }
  for (int r = 0; r < MR; ++r) {
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])));
    for (int64_t i = k8; i < k; ++i) s += x[r * k + i] * load_scalar<kind>(w, row * k + i);
    y[r * n + row] = scale ? s * scale[row] : s;
  }
}

template <Kind kind, int MR>
AVX2 void rows_avx2_mr(const float* x, const void* w, const float* scale, float* y, int64_t n_begin, int64_t n_end,
                       int64_t n, int64_t k) {
  int64_t row = n_begin;
  if constexpr (MR <= 2) {
    for (; row < n_end; ++row) row_avx2<kind, MR>(x, k, w, row, scale, y, n);
  } else {
    for (; row + 2 <= n_end; row += 2) tile_avx2<kind, MR, 2>(x, k, w, row, scale, y, n);
    for (; row < n_end; ++row) tile_avx2<kind, MR, 1>(x, k, w, row, scale, y, n);
  }
}

// ---- AVX-512 (F, BW, VL) -------------------------------------------------------------------------
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

template <Kind kind>
AVX512 inline __m512 load16(const void* w, int64_t i) {
  if constexpr (kind == kBF16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else if constexpr (kind == kF16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i)));
  } else {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(w) + i));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  }
}

template <Kind kind, int MR, int NR>
AVX512 void tile_avx512(const float* x, int64_t k, const void* w, int64_t row, const float* scale, float* y,
                        int64_t n) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t k16 = k - k % 16;
  for (int64_t i = 0; i < k16; i += 16) {
    __m512 wv[NR];
    for (int c = 0; c < NR; ++c) wv[c] = load16<kind>(w, (row + c) * k + i);
    for (int r = 0; r < MR; ++r) {
      __m512 xv = _mm512_loadu_ps(x + r * k + i);
      for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) {
      float s = _mm512_reduce_add_ps(acc[r][c]);
      for (int64_t i = k16; i < k; ++i) s += x[r * k + i] * load_scalar<kind>(w, (row + c) * k + i);
      y[r * n + row + c] = scale ? s * scale[row + c] : s;
    }
}

template <Kind kind, int MR>
AVX512 void rows_avx512_mr(const float* x, const void* w, const float* scale, float* y, int64_t n_begin,
                           int64_t n_end, int64_t n, int64_t k) {
  constexpr int NR = MR <= 2 ? 4 : 3;
  int64_t row = n_begin;
  for (; row + NR <= n_end; row += NR) tile_avx512<kind, MR, NR>(x, k, w, row, scale, y, n);
  for (; row < n_end; ++row) tile_avx512<kind, MR, 1>(x, k, w, row, scale, y, n);
}

// ---- both SIMD levels --------------------------------------------------------------------------
// MR activation rows against output rows [b, e) at the chosen level.
template <Kind kind, int MR>
void rows_mr(int64_t isa, const float* x, const void* w, const float* scale, float* y, int64_t b, int64_t e,
             int64_t n, int64_t k) {
  if (isa == kAvx512) rows_avx512_mr<kind, MR>(x, w, scale, y, b, e, n, k);
  else rows_avx2_mr<kind, MR>(x, w, scale, y, b, e, n, k);
}

template <Kind kind>
void rows_simd(int64_t isa, const float* x, int64_t m, const void* w, const float* scale, float* y, int64_t n_begin,
               int64_t n_end, int64_t n, int64_t k) {
  // Blocks of output rows whose weights stay in L1 while every chunk of (up to 4) activation rows uses them.
  const int64_t block = isa == kAvx512 ? 24 : 16;
  for (int64_t b = n_begin; b < n_end; b += block) {
    const int64_t e = std::min(b + block, n_end);
    for (int64_t r = 0; r < m;) {
      const int64_t chunk = std::min<int64_t>(m - r, 4);
      const float* xr = x + r * k;
      float* yr = y + r * n;
      switch (chunk) {
        case 4: rows_mr<kind, 4>(isa, xr, w, scale, yr, b, e, n, k); break;
        case 3: rows_mr<kind, 3>(isa, xr, w, scale, yr, b, e, n, k); break;
        case 2: rows_mr<kind, 2>(isa, xr, w, scale, yr, b, e, n, k); break;
        default: rows_mr<kind, 1>(isa, xr, w, scale, yr, b, e, n, k);
      }
      r += chunk;
    }
  }
}

// ---- int4 in groups ------------------------------------------------------------------------------
// sum_k x_k w_k = sum_groups scale_g * sum_{k in g} x_k q_k + offset_g * sum_{k in g} x_k.
void int4_rows_scalar(const float* x, int64_t m, const uint8_t* w, const float* scale, const float* offset,
                      const float* xsum, float* y, int64_t n_begin, int64_t n_end, int64_t n, int64_t k,
                      int64_t group) {
  const int64_t groups = k / group;
  for (int64_t row = n_begin; row < n_end; ++row) {
    for (int64_t r = 0; r < m; ++r) {
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float dot = 0.f;
        for (int64_t b = g * group; b < (g + 1) * group; b += 32) {
          const uint8_t* bytes = w + (row * k + b) / 2;
          for (int j = 0; j < 16; ++j) {
            dot += x[r * k + b + j] * float(bytes[j] & 0xF) + x[r * k + b + 16 + j] * float(bytes[j] >> 4);
          }
        }
        acc += scale[row * groups + g] * dot + offset[row * groups + g] * xsum[r * groups + g];
      }
      y[r * n + row] = acc;
    }
  }
}

template <int MR>
AVX2 void int4_tile_avx2(const float* x, const uint8_t* w, const float* scale, const float* offset,
                         const float* xsum, float* y, int64_t row, int64_t n, int64_t k, int64_t group) {
  const int64_t groups = k / group;
  const __m256i low = _mm256_set1_epi32(0xF);
  float total[MR] = {};
  const uint8_t* wrow = w + row * k / 2;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 dot[MR];
    for (int r = 0; r < MR; ++r) dot[r] = _mm256_setzero_ps();
    for (int64_t b = g * group; b < (g + 1) * group; b += 32) {
      const uint8_t* bytes = wrow + b / 2;
      for (int half = 0; half < 2; ++half) {  // bytes 0..7 then 8..15 of the block
        __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * half)));
        __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, low));                        // inputs 8h .. 8h+7
        __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));                          // inputs 16+8h ..
        for (int r = 0; r < MR; ++r) {
          dot[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + b + 8 * half), lo, dot[r]);
          dot[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + b + 16 + 8 * half), hi, dot[r]);
        }
      }
    }
    const float s = scale[row * groups + g], o = offset[row * groups + g];
    for (int r = 0; r < MR; ++r) total[r] += s * hsum8(dot[r]) + o * xsum[r * groups + g];
  }
  for (int r = 0; r < MR; ++r) y[r * n + row] = total[r];
}

AVX2 void int4_rows_avx2(const float* x, int64_t m, const uint8_t* w, const float* scale, const float* offset,
                         const float* xsum, float* y, int64_t n_begin, int64_t n_end, int64_t n, int64_t k,
                         int64_t group) {
  for (int64_t row = n_begin; row < n_end; ++row) {
    for (int64_t r = 0; r < m;) {
      const int64_t left = m - r;
      const int64_t gs = k / group;
      if (left >= 4) { int4_tile_avx2<4>(x + r * k, w, scale, offset, xsum + r * gs, y + r * n, row, n, k, group); r += 4; }
      else if (left >= 2) { int4_tile_avx2<2>(x + r * k, w, scale, offset, xsum + r * gs, y + r * n, row, n, k, group); r += 2; }
      else { int4_tile_avx2<1>(x + r * k, w, scale, offset, xsum + r * gs, y + r * n, row, n, k, group); r += 1; }
    }
  }
}

// Decoding streams each weight once. While the integer kernels compute, the hardware prefetchers alone
// leave them at 16-19 GB/s on 2 Zen 3 cores (a plain read: 25): asking for the line kAhead bytes ahead of
// the one being read gave int4 18-19 and int8 (gemv_q16) 22 GB/s, alternating in one process over 12 cold
// matrices of the 1.6B shape (2, 4 and 8 KB alike; the 16-bit kernel, whose arithmetic per byte is lighter,
// gained nothing). The lossless bf16 kernel, which decodes more per byte, asks for both lines of each chunk:
// 14.7-14.9 against 16.4-16.6 ms in two of three alternations of benchmarks/gemv_cold.py, 16.5 against 14.4
// in the third (a standalone loop: 0-13 % faster in three of four). Prefetches past a tensor's end are
// harmless: they never fault.
constexpr int64_t kAhead = 4096;
AVX2 inline void prefetch_ahead(const void* p) { _mm_prefetch(static_cast<const char*>(p) + kAhead, _MM_HINT_T0); }

// ---- integer activations: integer dot products over blocks of inputs -----------------------------------
// Each activation row is rounded per block to integers with one fp32 step: x ~ d_b * xq. Then
// sum_k w_k x_k = sum_b d_b * (sum_{k in b} q_k xq_k) * (weight scale), the inner sums exact in int32.
//   int4 weights x int8 activations (llama.cpp's Q4_0 x Q8_0 trick), blocks of 32: AVX2 vpmaddubsw pairs
//     u8 x s8, vpmaddwd into int32.
//   int8 weights x int16 activations, blocks of 128: vpmaddwd of s16 pairs. Rounding to 15 bits per block
//     keeps more of each activation than its bf16 value had (int8 activations cost the int8 guard).
constexpr int64_t kBlock = 32, kBlock16 = 128;

// One block of 32 rounded to int8: d = max|x| / 127, xq = round-half-even(x * (127 / max|x|)); inputs 0-15
// are written to `lo`, 16-31 to `hi`. Both levels round the same products the same way: equal results.
inline float quantize_block_scalar(const float* v, int8_t* lo, int8_t* hi) {
  float amax = 0.f;
  for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(v[j]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int j = 0; j < 16; ++j) {
    lo[j] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
    hi[j] = static_cast<int8_t>(std::nearbyint(v[16 + j] * inv));
  }
  return amax / 127.f;
}

AVX2 inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

AVX2 inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }

AVX2 float quantize_block_avx2(const float* v, int8_t* lo, int8_t* hi) {
  const __m256 a0 = _mm256_loadu_ps(v), a1 = _mm256_loadu_ps(v + 8), a2 = _mm256_loadu_ps(v + 16),
               a3 = _mm256_loadu_ps(v + 24);
  const float amax = hmax8(_mm256_max_ps(_mm256_max_ps(abs8(a0), abs8(a1)), _mm256_max_ps(abs8(a2), abs8(a3))));
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  // cvtps rounds half to even (the default MXCSR mode), as nearbyint does; packs keep 128-bit lanes apart,
  // so the 4-byte groups come out as [a0 0-3, a1 0-3, a2 0-3, a3 0-3 | a0 4-7, ...] and are put back in order.
  const __m256i w01 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(a0, inv)),
                                         _mm256_cvtps_epi32(_mm256_mul_ps(a1, inv)));
  const __m256i w23 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(a2, inv)),
                                         _mm256_cvtps_epi32(_mm256_mul_ps(a3, inv)));
  const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm256_castsi256_si128(b));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), _mm256_extracti128_si256(b, 1));
  return amax / 127.f;
}

AVX2 float sum_avx2(const float* v, int64_t len) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(v + i));
  float total = hsum8(acc);
  for (; i < len; ++i) total += v[i];
  return total;
}

// The activations of one call, rounded once and shared by every thread.
//   int8 (for int8 weights, and int4 at the scalar level): q (M, K) in input order, d (M, K / 32).
//   int4 at AVX2 works on spans of 2 blocks (64 inputs, 32 weight bytes), at AVX-512 on spans of 4 (128
//   inputs, 64 bytes; a last span of 2 when K % 128 == 64): one load of the span's weight bytes gives, after
//   a mask and a shift, the low nibbles (inputs 0-15 of each block) and the high ones (inputs 16-31), so the
//   activations are laid out in that order and no weight is ever shuffled:
//     q, a span of S blocks: [block 0 0-15 | ... | block S-1 0-15 | block 0 16-31 | ... | block S-1 16-31]
//     d: each block's step 4 times, the steps of the int32 sums vpmaddwd leaves (4 per block).
//   sum (M, K / group): exact fp32 sums of the activations per weight group, for int4's zero points.
struct Rounded8 {
  at::Tensor q, d, sum;
};

Rounded8 round_int8(const float* xp, int64_t m, int64_t k, int64_t span, int64_t group, bool avx2) {
  const int64_t blocks = k / kBlock, groups = group ? k / group : 0;
  Rounded8 out{at::empty({m, k}, at::kChar), at::empty({m, span ? blocks * 4 : blocks}, at::kFloat),
               at::empty({m, groups}, at::kFloat)};
  int8_t* qp = out.q.data_ptr<int8_t>();
  float *dp = out.d.data_ptr<float>(), *sp = out.sum.data_ptr<float>();
  at::parallel_for(0, m, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < blocks; ++b) {
        const float* v = xp + r * k + b * kBlock;
        int8_t *dst = qp + r * k + b * kBlock, *hi = dst + 16;
        if (span) {
          const int64_t first = b / span * span, width = std::min(span, blocks - first);
          dst = qp + r * k + first * kBlock + (b - first) * 16;
          hi = dst + 16 * width;
        }
        const float d = avx2 ? quantize_block_avx2(v, dst, hi) : quantize_block_scalar(v, dst, hi);
        if (span) for (int j = 0; j < 4; ++j) dp[r * blocks * 4 + b * 4 + j] = d;
        else dp[r * blocks + b] = d;
      }
      for (int64_t g = 0; g < groups; ++g) {
        const float* v = xp + r * k + g * group;
        if (avx2) sp[r * groups + g] = sum_avx2(v, group);
        else {
          float total = 0.f;
          for (int64_t j = 0; j < group; ++j) total += v[j];
          sp[r * groups + g] = total;
        }
      }
    }
  });
  return out;
}

// The int32 dot of one block: u (32 values 0..255, unsigned) with s (32 int8).
inline int32_t dot_block_scalar_u8(const uint8_t* u, const int8_t* s) {
  int32_t acc = 0;
  for (int j = 0; j < kBlock; ++j) acc += int32_t(u[j]) * int32_t(s[j]);
  return acc;
}

AVX2 inline __m256 dot_block_avx2(__m256i u, __m256i s) {  // 8 int32 partial sums as floats
  const __m256i pairs = _mm256_maddubs_epi16(u, s);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// int4 group parameters (scale, zero) are fp32 or bf16: read as fp32.
inline float param(const float* p, int64_t i) { return p[i]; }
inline float param(const c10::BFloat16* p, int64_t i) { return float(p[i]); }
AVX2 inline __m256 param8(const float* p) { return _mm256_loadu_ps(p); }
AVX2 inline __m256 param8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// One pair of blocks of one weight row (wp: 32 bytes) against MR activation rows; s: the group's scale.
// 15 * 127 * 2 * 2 < 2^15: the low and high halves add in int16 before vpmaddwd widens them.
template <int MR>
AVX2 __attribute__((always_inline)) inline void int4_pair_avx2(const uint8_t* wp, __m256 s, const int8_t* a,
                                                              int64_t k, const float* dv, int64_t dstride,
                                                              __m256 (&acc)[MR]) {
  const __m256i mask = _mm256_set1_epi8(0xF), ones = _mm256_set1_epi16(1);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
  const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
  for (int r = 0; r < MR; ++r) {
    const __m256i a_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + r * k));
    const __m256i a_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + r * k + 32));
    const __m256i sum16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a_lo), _mm256_maddubs_epi16(hi, a_hi));
    acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(s, _mm256_loadu_ps(dv + r * dstride)),
                             _mm256_cvtepi32_ps(_mm256_madd_epi16(sum16, ones)), acc[r]);
  }
}

// The PP pairs of one group into acc0 (PP = 2: the second into acc1), s: the group's scale in every lane.
template <int MR, int PP>
AVX2 __attribute__((always_inline)) inline void int4_group_avx2(const uint8_t* wrow, const int8_t* xq, const float* dv,
                                                               int64_t g, __m256 s, int64_t k, int64_t dstride,
                                                               __m256 (&acc0)[MR], __m256 (&acc1)[MR]) {
  const int64_t p = g * PP;
  int4_pair_avx2<MR>(wrow + p * 32, s, xq + p * 64, k, dv + p * 8, dstride, acc0);
  if constexpr (PP == 2) int4_pair_avx2<MR>(wrow + p * 32 + 32, s, xq + p * 64 + 64, k, dv + p * 8 + 8, dstride, acc1);
}

// One int4 weight row against MR activation rows; PP pairs per group (1 for groups of 64, 2 for 128).
// w = (q - 8) * scale + zero, so sum_k w_k x_k = sum_g scale_g (sum_{k in g} q_k x_k) + (zero_g - 8 scale_g) * sum_g x:
// the first term in integers over the rounded activations, the second over their exact sums. Eight groups'
// scales are read as one vector and each lane broadcast in registers (a round trip through memory stalls
// on store forwarding); consecutive pairs add into two accumulators in turn, so neither waits on the other.
template <int MR, int PP, typename P>
AVX2 void int4_q8_row_avx2(const int8_t* xq, const float* dv, const float* xsum, const uint8_t* wrow, const P* srow,
                           const P* zrow, float* y, int64_t n, int64_t k) {
  const int64_t pairs = k / 64, groups = pairs / PP, dstride = pairs * 8;
  const __m256 eight = _mm256_set1_ps(8.f);
  __m256 acc0[MR], acc1[MR], off[MR];
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = off[r] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    for (int line = 0; line < 4 * PP; ++line) prefetch_ahead(wrow + g * PP * 32 + line * 64);
    const __m256 s8 = param8(srow + g), z8 = _mm256_fnmadd_ps(eight, s8, param8(zrow + g));
    for (int r = 0; r < MR; ++r) off[r] = _mm256_fmadd_ps(z8, _mm256_loadu_ps(xsum + r * groups + g), off[r]);
#define STABLELM_GROUP(j, a, b) \
    int4_group_avx2<MR, PP>(wrow, xq, dv, g + j, _mm256_permutevar8x32_ps(s8, _mm256_set1_epi32(j)), k, dstride, a, b)
    STABLELM_GROUP(0, acc0, acc1); STABLELM_GROUP(1, acc1, acc0); STABLELM_GROUP(2, acc0, acc1);
    STABLELM_GROUP(3, acc1, acc0); STABLELM_GROUP(4, acc0, acc1); STABLELM_GROUP(5, acc1, acc0);
    STABLELM_GROUP(6, acc0, acc1); STABLELM_GROUP(7, acc1, acc0);
#undef STABLELM_GROUP
  }
  float tail[MR] = {};
  for (; g < groups; ++g) {
    const float s = param(srow, g), z = param(zrow, g) - 8.f * s;
    for (int r = 0; r < MR; ++r) tail[r] += z * xsum[r * groups + g];
    int4_group_avx2<MR, PP>(wrow, xq, dv, g, _mm256_set1_ps(s), k, dstride, acc0, acc1);
  }
  for (int r = 0; r < MR; ++r) y[r * n] = hsum8(_mm256_add_ps(_mm256_add_ps(acc0[r], acc1[r]), off[r])) + tail[r];
}

// int8 weights are signed: |q| (unsigned) times xq with q's sign, as vpmaddubsw wants.
template <int MR>
AVX2 void int8_q8_tile_avx2(const int8_t* xq, const float* d, const int8_t* w, const float* scale, float* y,
                            int64_t row, int64_t n, int64_t k) {
  const int64_t blocks = k / kBlock;
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  const int8_t* wrow = w + row * k;
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + b * kBlock));
    const __m256i magnitude = _mm256_sign_epi8(q, q);
    for (int r = 0; r < MR; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * k + b * kBlock));
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d[r * blocks + b]), dot_block_avx2(magnitude, _mm256_sign_epi8(v, q)),
                               acc[r]);
    }
  }
  for (int r = 0; r < MR; ++r) y[r * n + row] = scale[row] * hsum8(acc[r]);
}

template <typename Tile1, typename Tile2, typename Tile4>
inline void over_rows(int64_t m, Tile1 one, Tile2 two, Tile4 four) {
  for (int64_t r = 0; r < m;) {
    if (m - r >= 4) { four(r); r += 4; }
    else if (m - r >= 2) { two(r); r += 2; }
    else { one(r); r += 1; }
  }
}

// ---- int16 activations for int8 weights ---------------------------------------------------------------
// Blocks of 128 inputs (the last one shorter when K is not a multiple): d = max|x| / 32767,
// xq = round-half-even(x * (32767 / max|x|)). At AVX2 every block's length is a multiple of 16.
inline float quantize16_scalar(const float* v, int64_t len, int16_t* out) {
  float amax = 0.f;
  for (int64_t j = 0; j < len; ++j) amax = std::max(amax, std::fabs(v[j]));
  const float inv = amax > 0.f ? 32767.f / amax : 0.f;
  for (int64_t j = 0; j < len; ++j) out[j] = static_cast<int16_t>(std::nearbyint(v[j] * inv));
  return amax / 32767.f;
}

AVX2 float quantize16_avx2(const float* v, int64_t len, int16_t* out) {
  __m256 m = _mm256_setzero_ps();
  for (int64_t j = 0; j < len; j += 8) m = _mm256_max_ps(m, abs8(_mm256_loadu_ps(v + j)));
  const float amax = hmax8(m);
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
  for (int64_t j = 0; j < len; j += 16) {
    const __m256i packed = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + j), inv)),
                                              _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + j + 8), inv)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm256_permute4x64_epi64(packed, 0xD8));
  }
  return amax / 32767.f;
}

// One int8 weight row against MR int16 activation rows: int32 sums per block (|sum| < 128 * 127 * 32767 < 2^31).
template <int MR>
AVX2 void int8_q16_row_avx2(const int16_t* xq, const float* d, const int8_t* wrow, float scale, float* y, int64_t n,
                            int64_t k) {
  const int64_t blocks = (k + kBlock16 - 1) / kBlock16;
  __m256 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t end = std::min(k, (b + 1) * kBlock16);
    __m256i sum0[MR], sum1[MR];
    for (int r = 0; r < MR; ++r) sum0[r] = sum1[r] = _mm256_setzero_si256();
    int64_t i = b * kBlock16;
    for (int line = 0; line < kBlock16 / 64; ++line) prefetch_ahead(wrow + i + line * 64);
    for (; i + 32 <= end; i += 32) {
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + i)));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + i + 16)));
      for (int r = 0; r < MR; ++r) {
        const int16_t* a = xq + r * k + i;
        sum0[r] = _mm256_add_epi32(sum0[r], _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))));
        sum1[r] = _mm256_add_epi32(sum1[r], _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16))));
      }
    }
    if (i < end) {  // 16 left
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + i)));
      for (int r = 0; r < MR; ++r)
        sum0[r] = _mm256_add_epi32(sum0[r], _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * k + i))));
    }
    for (int r = 0; r < MR; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d[r * blocks + b]), _mm256_cvtepi32_ps(_mm256_add_epi32(sum0[r], sum1[r])),
                               acc[r]);
  }
  for (int r = 0; r < MR; ++r) y[r * n] = scale * hsum8(acc[r]);
}


// One int4 weight row against MR activation rows, at the group size and parameter dtype of the call
// (scale and zero point at the row's first group).
template <int MR>
inline void int4_row(bool bf16, int64_t group, const int8_t* xq, const float* dv, const float* xsum,
                     const uint8_t* wrow, const void* scale, const void* zero, float* y, int64_t n, int64_t k) {
  if (bf16) {
    const auto *s = static_cast<const c10::BFloat16*>(scale), *z = static_cast<const c10::BFloat16*>(zero);
    if (group == 64) int4_q8_row_avx2<MR, 1>(xq, dv, xsum, wrow, s, z, y, n, k);
    else int4_q8_row_avx2<MR, 2>(xq, dv, xsum, wrow, s, z, y, n, k);
  } else {
    const auto *s = static_cast<const float*>(scale), *z = static_cast<const float*>(zero);
    if (group == 64) int4_q8_row_avx2<MR, 1>(xq, dv, xsum, wrow, s, z, y, n, k);
    else int4_q8_row_avx2<MR, 2>(xq, dv, xsum, wrow, s, z, y, n, k);
  }
}

float param_at(const at::Tensor& t, int64_t i) {
  return t.scalar_type() == at::kBFloat16 ? float(t.data_ptr<c10::BFloat16>()[i]) : t.data_ptr<float>()[i];
}

// ---- bf16 in 12 bits, losslessly ---------------------------------------------------------------------
// A bf16 weight is a high byte (the sign and the exponent's top 7 bits) and a low byte (the exponent's last
// bit and the 7 mantissa bits). Within a row of a trained or initialised matrix the high byte takes few
// values, the row's magnitudes spanning a few binades: each row keeps a table of its 16 commonest high bytes
// (entry 0 always 0x00) and stores a 4-bit code per weight beside the low byte, 12 bits a weight instead of
// 16, so batch-1 decoding, which is bound by the bytes it reads, moves a quarter less. A weight whose high
// byte is not in its row's table (a value ~2^-13 of the row's largest or smaller, a few in 10,000 weights of
// a Gaussian row) is stored as code 0 with low byte 0, +0.0, and listed apart with its column and bf16
// value; the products add those after each row's sum. Decoding gives the same bf16 bits back.
//
// Layout, per row: the first K64 = K - K % 64 inputs in chunks of 64 inputs, 96 bytes each: 32 bytes of
// codes (byte j holds the code of storage position j in its low nibble, of position 32 + j in its high
// one), then the 64 low bytes in storage order. The last K % 64 inputs stay bf16, apart (`tail`). Storage
// order is what makes decoding cheap: AVX2's in-lane interleaves (vpunpck{l,h}bw of low and high bytes,
// then vpunpck{l,h}wd against zeros) turn 32 storage positions into four fp32 vectors of consecutive
// inputs (kPosition gives the position of each input).
struct Lossless {
  const uint8_t* values;      // (N, K64 / 64 * 96)
  const uint8_t* table;       // (N, 16)
  const uint16_t* tail;       // (N, K - K64) bf16 bits
  const int64_t* starts;      // (N + 1,): row r's exceptions are [starts[r], starts[r + 1])
  const int32_t* columns;     // (E,) ascending within a row
  const uint16_t* exceptions; // (E,) bf16 bits
  int64_t n, k, k64;
  int64_t row_bytes() const { return k64 / 64 * 96; }
  int64_t tail_width() const { return k - k64; }
};

// The storage position (0-63) of input i (0-63) of a chunk: positions 0-15 hold inputs 0-3, 8-11, 16-19,
// 24-27, positions 16-31 inputs 4-7, 12-15, 20-23, 28-31, and the same for the chunk's second half.
constexpr int ll_position(int i) {
  return 32 * (i >> 5) + ((i & 7) < 4 ? 0 : 16) + 4 * ((i & 31) >> 3) + (i & 3);
}

constexpr auto kPosition = [] {
  std::array<uint8_t, 64> position{};
  for (int i = 0; i < 64; ++i) position[i] = uint8_t(ll_position(i));
  return position;
}();

inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &wide, 4);
  return f;
}

// Input i < K64 of a row as bf16 bits, before its exception (if any) is put back.
inline uint16_t ll_bits(const Lossless& w, int64_t row, int64_t i) {
  const uint8_t* chunk = w.values + row * w.row_bytes() + i / 64 * 96;
  const int s = kPosition[i % 64];
  const int code = s < 32 ? chunk[s] & 0xF : chunk[s - 32] >> 4;
  return uint16_t(uint16_t(w.table[row * 16 + code]) << 8 | chunk[32 + s]);
}

// Inputs [i0, i0 + len) of one row as bf16 bits (exact, exceptions included).
void ll_decode_bits(const Lossless& w, int64_t row, int64_t i0, int64_t len, uint16_t* out) {
  for (int64_t i = i0; i < i0 + len; ++i)
    out[i - i0] = i < w.k64 ? ll_bits(w, row, i) : w.tail[row * w.tail_width() + i - w.k64];
  for (int64_t e = w.starts[row]; e < w.starts[row + 1]; ++e)
    if (w.columns[e] >= i0 && w.columns[e] < i0 + len) out[w.columns[e] - i0] = w.exceptions[e];
}

// The exceptions of one row against MR activation rows, added to sums (fp32, in column order).
template <int MR>
inline void ll_add_exceptions(const Lossless& w, int64_t row, const float* x, int64_t k, float (&sums)[MR]) {
  for (int64_t e = w.starts[row]; e < w.starts[row + 1]; ++e) {
    const float v = bf16_bits_to_float(w.exceptions[e]);
    for (int r = 0; r < MR; ++r) sums[r] += x[r * k + w.columns[e]] * v;
  }
}

// Decode products at the scalar level: the row decoded (exceptions as +0.0), summed in input order, then
// the exceptions added, as the AVX2 kernel does.
void ll_rows_scalar(const float* x, int64_t m, const Lossless& w, float* y, int64_t n_begin, int64_t n_end,
                    int64_t n) {
  const int64_t k = w.k;
  std::vector<float> decoded(k);
  for (int64_t row = n_begin; row < n_end; ++row) {
    for (int64_t i = 0; i < k; ++i)
      decoded[i] = bf16_bits_to_float(i < w.k64 ? ll_bits(w, row, i) : w.tail[row * w.tail_width() + i - w.k64]);
    for (int64_t r = 0; r < m; ++r) {
      float sum[1] = {0.f};
      for (int64_t i = 0; i < k; ++i) sum[0] += x[r * k + i] * decoded[i];
      ll_add_exceptions<1>(w, row, x + r * k, k, sum);
      y[r * n + row] = sum[0];
    }
  }
}

// Half h of a chunk (inputs 32h .. 32h + 31) as four fp32 vectors of eight consecutive inputs.
AVX2 __attribute__((always_inline)) inline void ll_half_avx2(const uint8_t* chunk, __m256i high, int h, __m256 (&f)[4]) {
  const __m256i zero = _mm256_setzero_si256();
  const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 32 + 32 * h));
  const __m256i a = _mm256_unpacklo_epi8(low, high), b = _mm256_unpackhi_epi8(low, high);
  f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, a));
  f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, a));
  f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, b));
  f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, b));
}

// The high bytes of a chunk's 64 positions: table lookups (vpshufb) of its low nibbles, then its high ones.
AVX2 __attribute__((always_inline)) inline void ll_high_avx2(const uint8_t* chunk, __m256i table, __m256i (&high)[2]) {
  const __m256i mask = _mm256_set1_epi8(0xF);
  const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk));
  high[0] = _mm256_shuffle_epi8(table, _mm256_and_si256(codes, mask));
  high[1] = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(codes, 4), mask));
}

AVX2 inline __m256i ll_table_avx2(const Lossless& w, int64_t row) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.table + row * 16)));
}

// One weight row against MR activation rows (the rows' sums in 4 or 2 accumulators each). For one activation
// row, K % 64 == 0 and no exceptions, the sum is row_avx2's, in the same order: the same bits.
template <int MR>
AVX2 void ll_row_avx2(const float* x, int64_t k, const Lossless& w, int64_t row, float* y, int64_t n) {
  constexpr int NA = MR <= 2 ? 4 : 2;
  __m256 acc[MR][NA];
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < NA; ++u) acc[r][u] = _mm256_setzero_ps();
  const __m256i table = ll_table_avx2(w, row);
  const uint8_t* chunk = w.values + row * w.row_bytes();
  for (int64_t i = 0; i < w.k64; i += 64, chunk += 96) {
    prefetch_ahead(chunk);
    prefetch_ahead(chunk + 64);
    __m256i high[2];
    ll_high_avx2(chunk, table, high);
    for (int h = 0; h < 2; ++h) {
      __m256 f[4];
      ll_half_avx2(chunk, high[h], h, f);
      for (int r = 0; r < MR; ++r)
        for (int u = 0; u < 4; ++u)
          acc[r][u % NA] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i + 32 * h + 8 * u), f[u], acc[r][u % NA]);
    }
  }
  float sums[MR];
  for (int r = 0; r < MR; ++r) {  // added as row_avx2 adds: one row's products equal the `native` format's
    const __m256 pair = _mm256_add_ps(acc[r][0], acc[r][1]);
    sums[r] = hsum8(NA == 4 ? _mm256_add_ps(pair, _mm256_add_ps(acc[r][NA - 2], acc[r][NA - 1])) : pair);
    for (int64_t i = w.k64; i < k; ++i)
      sums[r] += x[r * k + i] * bf16_bits_to_float(w.tail[row * w.tail_width() + i - w.k64]);
  }
  ll_add_exceptions<MR>(w, row, x, k, sums);
  for (int r = 0; r < MR; ++r) y[r * n + row] = sums[r];
}

// Inputs [i0, i0 + len) of one row (i0 % 64 == 0) as fp32, exact, exceptions included: the GEMM's panels.
AVX2 void ll_decode_avx2(const Lossless& w, int64_t row, int64_t i0, int64_t len, float* out) {
  const __m256i table = ll_table_avx2(w, row);
  const int64_t full = std::min(i0 + len, w.k64);
  int64_t i = i0;
  for (; i < full; i += 64) {
    const uint8_t* chunk = w.values + row * w.row_bytes() + i / 64 * 96;
    __m256i high[2];
    ll_high_avx2(chunk, table, high);
    for (int h = 0; h < 2; ++h) {
      __m256 f[4];
      ll_half_avx2(chunk, high[h], h, f);
      for (int u = 0; u < 4; ++u) _mm256_storeu_ps(out + i - i0 + 32 * h + 8 * u, f[u]);
    }
  }
  for (; i < i0 + len; ++i) out[i - i0] = bf16_bits_to_float(w.tail[row * w.tail_width() + i - w.k64]);
  for (int64_t e = w.starts[row]; e < w.starts[row + 1]; ++e)
    if (w.columns[e] >= i0 && w.columns[e] < i0 + len) out[w.columns[e] - i0] = bf16_bits_to_float(w.exceptions[e]);
}

// ---- AVX-512 (F, BW, VL) integer and lossless decode products ---------------------------------------
// The same products at 512 bits: the integer sums are the AVX2 level's, the fp32 sums run in another order.
// Half the instructions per weight is what the kernels bound by arithmetic as much as by memory (int4,
// lossless bf16) need; Intel cores issue the byte shuffles and widenings on one port.

AVX512 inline __m512 param16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 inline __m512 param16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Lanes 0-7 from lo, 8-15 from hi.
AVX512 inline __m512 join8(__m256 lo, __m256 hi) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}

// One span of 4 blocks of one int4 weight row (wp: 64 bytes) against MR activation rows; s: each lane's group
// scale. As at AVX2, the low and high halves add in int16 before vpmaddwd widens them.
template <int MR>
AVX512 __attribute__((always_inline)) inline void int4_quad_avx512(const uint8_t* wp, __m512 s, const int8_t* a,
                                                                  int64_t k, const float* dv, int64_t dstride,
                                                                  __m512 (&acc)[MR]) {
  const __m512i mask = _mm512_set1_epi8(0xF), ones = _mm512_set1_epi16(1);
  const __m512i v = _mm512_loadu_si512(wp);
  const __m512i lo = _mm512_and_si512(v, mask), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
  for (int r = 0; r < MR; ++r) {
    const __m512i a_lo = _mm512_loadu_si512(a + r * k), a_hi = _mm512_loadu_si512(a + r * k + 64);
    const __m512i sum16 = _mm512_add_epi16(_mm512_maddubs_epi16(lo, a_lo), _mm512_maddubs_epi16(hi, a_hi));
    acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_loadu_ps(dv + r * dstride)),
                             _mm512_cvtepi32_ps(_mm512_madd_epi16(sum16, ones)), acc[r]);
  }
}

// One int4 weight row against MR activation rows (spans of 4 blocks, see round_int8), groups of G = 64 or 128
// inputs: 16 groups' scales are read as one vector and each span's lanes picked from it in registers.
template <int MR, int G, typename P>
AVX512 void int4_q8_row_avx512(const int8_t* xq, const float* dv, const float* xsum, const uint8_t* wrow,
                               const P* srow, const P* zrow, float* y, int64_t n, int64_t k) {
  constexpr int64_t kSpans = G == 64 ? 8 : 16;  // spans in 16 groups
  const int64_t spans = k / 128, groups = k / G, dstride = k / kBlock * 4;
  const __m512 eight = _mm512_set1_ps(8.f);
  const __m512i upper = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc0[MR], acc1[MR], off[MR];
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = off[r] = _mm512_setzero_ps();
  int64_t q = 0;
  for (; q + kSpans <= spans; q += kSpans) {
    const int64_t g = q * 128 / G;
    const __m512 s16 = param16(srow + g), z16 = _mm512_fnmadd_ps(eight, s16, param16(zrow + g));
    for (int r = 0; r < MR; ++r) off[r] = _mm512_fmadd_ps(z16, _mm512_loadu_ps(xsum + r * groups + g), off[r]);
#pragma GCC unroll 16
    for (int j = 0; j < kSpans; ++j) {
      prefetch_ahead(wrow + (q + j) * 64);
      const __m512i lanes = G == 64 ? _mm512_add_epi32(_mm512_set1_epi32(2 * j), upper) : _mm512_set1_epi32(j);
      int4_quad_avx512<MR>(wrow + (q + j) * 64, _mm512_permutexvar_ps(lanes, s16), xq + (q + j) * 128, k,
                           dv + (q + j) * 16, dstride, j % 2 ? acc1 : acc0);
    }
  }
  float tail[MR] = {};
  for (int64_t g = q * 128 / G; g < groups; ++g) {  // zero points of the groups left
    const float z = param(zrow, g) - 8.f * param(srow, g);
    for (int r = 0; r < MR; ++r) tail[r] += z * xsum[r * groups + g];
  }
  for (; q < spans; ++q) {
    const __m512 s = G == 64 ? join8(_mm256_set1_ps(param(srow, 2 * q)), _mm256_set1_ps(param(srow, 2 * q + 1)))
                             : _mm512_set1_ps(param(srow, q));
    int4_quad_avx512<MR>(wrow + q * 64, s, xq + q * 128, k, dv + q * 16, dstride, acc0);
  }
  __m256 last[MR];  // K % 128 == 64 (G == 64): the last 2 blocks, laid out as an AVX2 pair
  for (int r = 0; r < MR; ++r) last[r] = _mm256_setzero_ps();
  if (k % 128) int4_pair_avx2<MR>(wrow + spans * 64, _mm256_set1_ps(param(srow, 2 * spans)), xq + spans * 128, k,
                                  dv + spans * 16, dstride, last);
  for (int r = 0; r < MR; ++r)
    y[r * n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0[r], acc1[r]), off[r])) + hsum8(last[r]) + tail[r];
}

// One int8 weight row against MR int16 activation rows, as int8_q16_row_avx2; a block's last 16 or 32 inputs
// are read with masks.
template <int MR>
AVX512 void int8_q16_row_avx512(const int16_t* xq, const float* d, const int8_t* wrow, float scale, float* y,
                                int64_t n, int64_t k) {
  const int64_t blocks = (k + kBlock16 - 1) / kBlock16;
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t end = std::min(k, (b + 1) * kBlock16);
    __m512i sum0[MR], sum1[MR];
    for (int r = 0; r < MR; ++r) sum0[r] = sum1[r] = _mm512_setzero_si512();
    int64_t i = b * kBlock16;
    for (int line = 0; line < kBlock16 / 64; ++line) prefetch_ahead(wrow + i + line * 64);
    for (; i + 64 <= end; i += 64) {
      const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + i)));
      const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + i + 32)));
      for (int r = 0; r < MR; ++r) {
        const int16_t* a = xq + r * k + i;
        sum0[r] = _mm512_add_epi32(sum0[r], _mm512_madd_epi16(w0, _mm512_loadu_si512(a)));
        sum1[r] = _mm512_add_epi32(sum1[r], _mm512_madd_epi16(w1, _mm512_loadu_si512(a + 32)));
      }
    }
    for (; i < end; i += 32) {  // 16, 32 or 48 left
      const __mmask32 mask = end - i >= 32 ? 0xFFFFFFFFu : 0xFFFFu;
      const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, wrow + i));
      for (int r = 0; r < MR; ++r)
        sum0[r] = _mm512_add_epi32(sum0[r], _mm512_madd_epi16(w0, _mm512_maskz_loadu_epi16(mask, xq + r * k + i)));
    }
    for (int r = 0; r < MR; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(d[r * blocks + b]),
                               _mm512_cvtepi32_ps(_mm512_add_epi32(sum0[r], sum1[r])), acc[r]);
  }
  for (int r = 0; r < MR; ++r) y[r * n] = scale * _mm512_reduce_add_ps(acc[r]);
}

// Lossless bf16 at 512 bits: a chunk's 64 codes and 64 low bytes decode in one pass. The in-lane interleaves
// then give vector u of the chunk inputs 8u .. 8u + 7 and 32 + 8u .. 32 + 8u + 7 (128-bit lanes hold storage
// positions 0-15, 16-31, 32-47, 48-63), so the caller lays each activation row out in that order once
// (ll_swizzle) and the products read it straight.
inline void ll_swizzle(const float* x, int64_t k64, float* out) {
  for (int64_t c = 0; c < k64; c += 64)
    for (int u = 0; u < 4; ++u)
      for (int j = 0; j < 8; ++j) {
        out[c + 16 * u + j] = x[c + 8 * u + j];
        out[c + 16 * u + 8 + j] = x[c + 32 + 8 * u + j];
      }
}

// One weight row against MR activation rows: xs swizzled (the first K64 inputs of each row), x as given (the
// tail and the exceptions).
template <int MR>
AVX512 void ll_row_avx512(const float* xs, const float* x, int64_t k, const Lossless& w, int64_t row, float* y,
                          int64_t n) {
  constexpr int NA = MR <= 2 ? 4 : 2;
  __m512 acc[MR][NA];
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < NA; ++u) acc[r][u] = _mm512_setzero_ps();
  const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.table + row * 16)));
  const __m512i mask = _mm512_set1_epi8(0xF), zero = _mm512_setzero_si512();
  const uint8_t* chunk = w.values + row * w.row_bytes();
  for (int64_t i = 0; i < w.k64; i += 64, chunk += 96) {
    prefetch_ahead(chunk);
    prefetch_ahead(chunk + 64);
    const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk));
    const __m512i nibbles = _mm512_inserti64x4(_mm512_castsi256_si512(codes), _mm256_srli_epi16(codes, 4), 1);
    const __m512i high = _mm512_shuffle_epi8(table, _mm512_and_si512(nibbles, mask));
    const __m512i low = _mm512_loadu_si512(chunk + 32);
    const __m512i a = _mm512_unpacklo_epi8(low, high), b = _mm512_unpackhi_epi8(low, high);
    const __m512 f[4] = {_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, a)), _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, a)),
                         _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, b)), _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, b))};
    for (int r = 0; r < MR; ++r)
      for (int u = 0; u < 4; ++u)
        acc[r][u % NA] = _mm512_fmadd_ps(_mm512_loadu_ps(xs + r * k + i + 16 * u), f[u], acc[r][u % NA]);
  }
  float sums[MR];
  for (int r = 0; r < MR; ++r) {
    __m512 total = _mm512_add_ps(acc[r][0], acc[r][1]);
    if constexpr (NA == 4) total = _mm512_add_ps(total, _mm512_add_ps(acc[r][2], acc[r][3]));
    sums[r] = _mm512_reduce_add_ps(total);
    for (int64_t i = w.k64; i < k; ++i)
      sums[r] += x[r * k + i] * bf16_bits_to_float(w.tail[row * w.tail_width() + i - w.k64]);
  }
  ll_add_exceptions<MR>(w, row, x, k, sums);
  for (int r = 0; r < MR; ++r) y[r * n + row] = sums[r];
}

template <int MR>
inline void int4_row512(bool bf16, int64_t group, const int8_t* xq, const float* dv, const float* xsum,
                        const uint8_t* wrow, const void* scale, const void* zero, float* y, int64_t n, int64_t k) {
  if (bf16) {
    const auto *s = static_cast<const c10::BFloat16*>(scale), *z = static_cast<const c10::BFloat16*>(zero);
    if (group == 64) int4_q8_row_avx512<MR, 64>(xq, dv, xsum, wrow, s, z, y, n, k);
    else int4_q8_row_avx512<MR, 128>(xq, dv, xsum, wrow, s, z, y, n, k);
  } else {
    const auto *s = static_cast<const float*>(scale), *z = static_cast<const float*>(zero);
    if (group == 64) int4_q8_row_avx512<MR, 64>(xq, dv, xsum, wrow, s, z, y, n, k);
    else int4_q8_row_avx512<MR, 128>(xq, dv, xsum, wrow, s, z, y, n, k);
  }
}

// ---- prompt products (AVX2 GEMM) -----------------------------------------------------------------
// Past a few dozen rows a product is bound by arithmetic, not by the weight's bytes, so prompts take a
// blocked GEMM: the weight is widened to fp32 one panel at a time (kKc inputs x 16 outputs, 16 KB, in L1),
// the activations are packed once in strips of 6 rows, and a 6 x 16 register tile (12 accumulators) is
// updated with one FMA per weight vector and broadcast activation. The weight is never converted whole,
// so prompts need no fp32 copy of it. Each output is summed in one fixed order whatever the rows beside
// it, and is computed by one thread. 140-180 GFLOPS on 2 Zen 3 cores (peak ~198), against 100-120 for
// converting the weight and calling MKL's sgemm. Blocks of 128 outputs are handed to threads as they come
// free (+2 % at 512 rows, +9 % at 128 against a fixed split, on the shared 2-core VM). At AVX-512 the tile
// is 6 x 32 (two panels side by side, twice the products per instruction); each output is still one FMA
// chain in input order, so both levels give the same bits. Packing stays AVX2 code. (Where the CPU has
// native bf16, oneDNN takes 16-bit prompts instead: see the formats.)
constexpr int kMr = 6, kNr = 16;
constexpr int64_t kKc = 256, kMc = 8 * kMr, kNc = 8 * kNr;

enum PanelKind { kPanelBF16, kPanelF16, kPanelI8, kPanelI4, kPanelF32, kPanelLossless };

// The weight as the prompt product reads it: int8 values q with an fp32 scale per row applied to the
// outputs; int4 values q (0..15) in gemv_int4's layout, w = q * scale + offset (multiply, then add, as the
// dense path dequantizes), scale and offset fp32 per group; fp32 rows (a lossless panel's decoded rows);
// or bf16 in 12 bits (`lossless`, data unused).
struct PanelWeight {
  const void* data;
  int64_t n, k;
  const float* scale;
  const float* offset;
  int64_t group;
  const Lossless* lossless = nullptr;
};

template <PanelKind kind>
inline float widen_scalar(const PanelWeight& w, int64_t row, int64_t i) {
  if constexpr (kind == kPanelBF16) return load_scalar<kBF16>(w.data, row * w.k + i);
  else if constexpr (kind == kPanelF16) return load_scalar<kF16>(w.data, row * w.k + i);
  else if constexpr (kind == kPanelI8) return load_scalar<kI8>(w.data, row * w.k + i);
  else if constexpr (kind == kPanelF32) return static_cast<const float*>(w.data)[row * w.k + i];
  else {
    const uint8_t byte = static_cast<const uint8_t*>(w.data)[(row * w.k + i - i % 32) / 2 + i % 16];
    const int64_t g = row * (w.k / w.group) + i / w.group;
    return float(i % 32 < 16 ? byte & 0xF : byte >> 4) * w.scale[g] + w.offset[g];
  }
}

// Inputs [i, i + 8) of one row (i % 8 == 0), widened to fp32.
template <PanelKind kind>
AVX2 inline __m256 widen8(const PanelWeight& w, int64_t row, int64_t i) {
  if constexpr (kind == kPanelBF16) return load8<kBF16>(w.data, row * w.k + i);
  else if constexpr (kind == kPanelF16) return load8<kF16>(w.data, row * w.k + i);
  else if constexpr (kind == kPanelI8) return load8<kI8>(w.data, row * w.k + i);
  else if constexpr (kind == kPanelF32) return _mm256_loadu_ps(static_cast<const float*>(w.data) + row * w.k + i);
  else {
    const uint8_t* bytes = static_cast<const uint8_t*>(w.data) + (row * w.k + i - i % 32) / 2 + i % 16;
    __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
    q = i % 32 < 16 ? _mm256_and_si256(q, _mm256_set1_epi32(0xF)) : _mm256_srli_epi32(q, 4);
    const int64_t g = row * (w.k / w.group) + i / w.group;
    return _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(w.scale[g])),
                         _mm256_set1_ps(w.offset[g]));
  }
}

// Panel (kc x 16, row-major) of outputs [n0, n0 + 16) and inputs [k0, k0 + kc), widened to fp32; outputs
// past N are zeros. Full panels go eight inputs at a time through an 8 x 8 transpose in registers.
template <PanelKind kind>
AVX2 void pack_panel(const PanelWeight& w, int64_t n0, int64_t k0, int64_t kc, float* panel) {
  const int cols = int(std::min<int64_t>(kNr, w.n - n0));
  int64_t p = 0;
  if (cols == kNr) {
    for (; p + 8 <= kc; p += 8) {
      for (int half = 0; half < 2; ++half) {
        __m256 r[8];
        for (int j = 0; j < 8; ++j) r[j] = widen8<kind>(w, n0 + half * 8 + j, k0 + p);
        const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
        const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
        const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
        const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
        const __m256 s[8] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE),
                             _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE),
                             _mm256_shuffle_ps(t4, t6, 0x44), _mm256_shuffle_ps(t4, t6, 0xEE),
                             _mm256_shuffle_ps(t5, t7, 0x44), _mm256_shuffle_ps(t5, t7, 0xEE)};
        for (int q = 0; q < 4; ++q) {
          _mm256_store_ps(panel + (p + q) * kNr + half * 8, _mm256_permute2f128_ps(s[q], s[q + 4], 0x20));
          _mm256_store_ps(panel + (p + q + 4) * kNr + half * 8, _mm256_permute2f128_ps(s[q], s[q + 4], 0x31));
        }
      }
    }
  }
  for (; p < kc; ++p)
    for (int j = 0; j < kNr; ++j) panel[p * kNr + j] = j < cols ? widen_scalar<kind>(w, n0 + j, k0 + p) : 0.f;
}

// A lossless weight's panel: its rows decoded to fp32 first (k0 % 64 == 0), then packed as fp32 rows are.
AVX2 void pack_panel_lossless(const PanelWeight& w, int64_t n0, int64_t k0, int64_t kc, float* panel) {
  const int cols = int(std::min<int64_t>(kNr, w.n - n0));
  alignas(32) float rows[kNr * kKc];
  for (int j = 0; j < cols; ++j) ll_decode_avx2(*w.lossless, n0 + j, k0, kc, rows + j * kc);
  pack_panel<kPanelF32>(PanelWeight{rows, cols, kc, nullptr, nullptr, 0}, 0, 0, kc, panel);
}

// c (rows x cols of a 6 x 16 tile, row stride ldc) = (first ? 0 : c) + a (kc x 6) . b (kc x 16), then
// times the outputs' scale where one is given (the last block of inputs of an int8 weight).
AVX2 void gemm_tile(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, int rows, int cols, bool first,
                    const float* scale) {
  // Twelve named accumulators: GCC keeps an array of them in memory across the loop.
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t p = 0; p < kc; ++p, a += kMr, b += kNr) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
    __m256 ar = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(ar, b0, c00), c01 = _mm256_fmadd_ps(ar, b1, c01);
    ar = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(ar, b0, c10), c11 = _mm256_fmadd_ps(ar, b1, c11);
    ar = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(ar, b0, c20), c21 = _mm256_fmadd_ps(ar, b1, c21);
    ar = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(ar, b0, c30), c31 = _mm256_fmadd_ps(ar, b1, c31);
    ar = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(ar, b0, c40), c41 = _mm256_fmadd_ps(ar, b1, c41);
    ar = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(ar, b0, c50), c51 = _mm256_fmadd_ps(ar, b1, c51);
  }
  const __m256 acc[kMr][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (rows == kMr && cols == kNr) {
    for (int r = 0; r < kMr; ++r)
      for (int h = 0; h < 2; ++h) {
        float* out = c + r * ldc + 8 * h;
        __m256 v = first ? acc[r][h] : _mm256_add_ps(_mm256_loadu_ps(out), acc[r][h]);
        if (scale) v = _mm256_mul_ps(v, _mm256_loadu_ps(scale + 8 * h));
        _mm256_storeu_ps(out, v);
      }
    return;
  }
  alignas(32) float t[kMr][kNr];
  for (int r = 0; r < kMr; ++r) {
    _mm256_store_ps(t[r], acc[r][0]);
    _mm256_store_ps(t[r] + 8, acc[r][1]);
  }
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < cols; ++j) {
      float v = first ? t[r][j] : c[r * ldc + j] + t[r][j];
      c[r * ldc + j] = scale ? v * scale[j] : v;
    }
}

// The same at AVX-512 for two panels side by side (b: panel j, b + kKc * kNr: panel j + 1): a 6 x 32 tile.
AVX512 void gemm_tile_avx512(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, int rows, int cols,
                             bool first, const float* scale) {
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float* b1 = b + kKc * kNr;
  for (int64_t p = 0; p < kc; ++p, a += kMr) {
    const __m512 w0 = _mm512_loadu_ps(b + p * kNr), w1 = _mm512_loadu_ps(b1 + p * kNr);  // 64-byte aligned
    __m512 ar = _mm512_set1_ps(a[0]);
    c00 = _mm512_fmadd_ps(ar, w0, c00), c01 = _mm512_fmadd_ps(ar, w1, c01);
    ar = _mm512_set1_ps(a[1]);
    c10 = _mm512_fmadd_ps(ar, w0, c10), c11 = _mm512_fmadd_ps(ar, w1, c11);
    ar = _mm512_set1_ps(a[2]);
    c20 = _mm512_fmadd_ps(ar, w0, c20), c21 = _mm512_fmadd_ps(ar, w1, c21);
    ar = _mm512_set1_ps(a[3]);
    c30 = _mm512_fmadd_ps(ar, w0, c30), c31 = _mm512_fmadd_ps(ar, w1, c31);
    ar = _mm512_set1_ps(a[4]);
    c40 = _mm512_fmadd_ps(ar, w0, c40), c41 = _mm512_fmadd_ps(ar, w1, c41);
    ar = _mm512_set1_ps(a[5]);
    c50 = _mm512_fmadd_ps(ar, w0, c50), c51 = _mm512_fmadd_ps(ar, w1, c51);
  }
  const __m512 acc[kMr][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (rows == kMr && cols == 2 * kNr) {
    for (int r = 0; r < kMr; ++r)
      for (int h = 0; h < 2; ++h) {
        float* out = c + r * ldc + kNr * h;
        __m512 v = first ? acc[r][h] : _mm512_add_ps(_mm512_loadu_ps(out), acc[r][h]);
        if (scale) v = _mm512_mul_ps(v, _mm512_loadu_ps(scale + kNr * h));
        _mm512_storeu_ps(out, v);
      }
    return;
  }
  alignas(64) float t[kMr][2 * kNr];
  for (int r = 0; r < kMr; ++r) {
    _mm512_store_ps(t[r], acc[r][0]);
    _mm512_store_ps(t[r] + kNr, acc[r][1]);
  }
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < cols; ++j) {
      float v = first ? t[r][j] : c[r * ldc + j] + t[r][j];
      c[r * ldc + j] = scale ? v * scale[j] : v;
    }
}

// x (M, K) of type X (float, c10::BFloat16, c10::Half) -> out (M, N) of type O = x . W^T (+ bias). A thread
// sums one block of kNc outputs for every row in fp32 in its own buffer, then adds the bias and rounds the
// block into `out` once: no (M, N) fp32 array is written and read back.
template <PanelKind kind, typename X, typename O, typename B>
void gemm_blocked(const X* x, int64_t m, const PanelWeight& w, const float* out_scale, const B* bias, float* a, O* out,
                  bool avx512) {
  const int64_t n = w.n, k = w.k, strips = (m + kMr - 1) / kMr;
  // a: the activations widened to fp32 in strips of 6 rows, input-major: x[6s + r][p] at (s * k + p) * 6 + r.
  at::parallel_for(0, strips, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t p = 0; p < k; ++p)
        for (int r = 0; r < kMr; ++r)
          a[(s * k + p) * kMr + r] = s * kMr + r < m ? float(x[(s * kMr + r) * k + p]) : 0.f;
  });
  // Blocks of kNc outputs go to whichever thread is free next: on a shared machine one core can be slowed
  // down (steal time), and a fixed split would make the other wait for it at the end.
  const int64_t panels = (n + kNr - 1) / kNr, per_block = kNc / kNr, blocks = (panels + per_block - 1) / per_block;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(blocks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    // This thread's panels (64-byte aligned: a panel row is one cache line) and its block of products, kept
    // from call to call (fresh pages fault slowly; see gemm).
    thread_local std::vector<float> storage, block;
    if (storage.size() < size_t(kNc * kKc + 16)) storage.resize(kNc * kKc + 16);
    if (block.size() < size_t(strips * kMr * kNc)) block.resize(strips * kMr * kNc);
    float* panel = storage.data() + (16 - reinterpret_cast<uintptr_t>(storage.data()) / 4 % 16) % 16;
    float* c = block.data();
    for (int64_t b; (b = next.fetch_add(1)) < blocks;) {
      const int64_t jc = b * per_block, jn = std::min(panels, jc + per_block), cols = std::min(n, jn * kNr) - jc * kNr;
      for (int64_t pc = 0; pc < k; pc += kKc) {
        const int64_t kc = std::min(kKc, k - pc);
        const bool first = pc == 0, last = pc + kc == k;
        for (int64_t j = jc; j < jn; ++j) {
          float* dst = panel + (j - jc) * kKc * kNr;
          if constexpr (kind == kPanelLossless) pack_panel_lossless(w, j * kNr, pc, kc, dst);
          else pack_panel<kind>(w, j * kNr, pc, kc, dst);
        }
        for (int64_t ic = 0; ic < strips; ic += kMc / kMr) {
          const int64_t in = std::min(strips, ic + kMc / kMr);
          for (int64_t j = jc, step; j < jn; j += step) {
            step = avx512 && j + 1 < jn ? 2 : 1;
            const int cols = int(std::min<int64_t>(step * kNr, n - j * kNr));
            for (int64_t s = ic; s < in; ++s) {
              const float* as = a + (s * k + pc) * kMr;
              const float* b = panel + (j - jc) * kKc * kNr;
              float* cs = c + s * kMr * kNc + (j - jc) * kNr;
              const int rows = int(std::min<int64_t>(kMr, m - s * kMr));
              const float* scale = last && out_scale ? out_scale + j * kNr : nullptr;
              if (step == 2) gemm_tile_avx512(as, b, kc, cs, kNc, rows, cols, first, scale);
              else gemm_tile(as, b, kc, cs, kNc, rows, cols, first, scale);
            }
          }
        }
      }
      const int64_t n0 = jc * kNr;
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < cols; ++j)
          out[r * n + n0 + j] = O(c[r * kNc + j] + (bias ? float(bias[n0 + j]) : 0.f));
    }
  });
}

// ---- entry points --------------------------------------------------------------------------------
void check_x(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
              "stablelm kernels: x must be a contiguous (M, K) float32, bfloat16 or float16 tensor");
  TORCH_CHECK(x.size(1) == k, "stablelm kernels: x has ", x.size(1), " columns, the weight ", k);
  TORCH_CHECK(x.size(0) >= 1, "stablelm kernels: x has no rows");
}

// x's values as fp32 without an ATen call (one costs ~2 us, and decoding makes ~100 products a token): x's
// own memory when it is fp32, else its values widened into this thread's scratch, valid until the next call.
const float* widened(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>();
  thread_local std::vector<float> scratch;
  const int64_t count = x.numel();
  scratch.resize(count);
  if (x.scalar_type() == at::kBFloat16) {
    const c10::BFloat16* p = x.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < count; ++i) scratch[i] = float(p[i]);
  } else {
    const c10::Half* p = x.data_ptr<c10::Half>();
    for (int64_t i = 0; i < count; ++i) scratch[i] = float(p[i]);
  }
  return scratch.data();
}

template <typename O, typename B>
void finish_rows(const float* y, const B* bias, O* out, int64_t m, int64_t n) {
  // Rows split between threads from ~64K outputs (a prompt's rows; a decode step's stay on this one).
  at::parallel_for(0, m, std::max<int64_t>(1, 65536 / n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < n; ++j) out[r * n + j] = O(y[r * n + j] + (bias ? float(bias[j]) : 0.f));
  });
}

// `f` called with a null pointer of `dtype`'s C++ type (float, c10::BFloat16 or c10::Half), to pick a template.
template <typename F>
void as_type(at::ScalarType dtype, const F& f) {
  if (dtype == at::kBFloat16) f(static_cast<c10::BFloat16*>(nullptr));
  else if (dtype == at::kHalf) f(static_cast<c10::Half*>(nullptr));
  else f(static_cast<float*>(nullptr));
}

// The bias (N,) checked, and `f` called with a typed pointer to its values (a null float pointer without one).
template <typename F>
void with_bias(const c10::optional<at::Tensor>& bias, int64_t n, const F& f) {
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous()),
              "stablelm kernels: bias must be a contiguous (", n, ",) tensor");
  if (!bias.has_value()) return f(static_cast<const float*>(nullptr));
  as_type(bias->scalar_type(), [&](auto* type) {
    f(static_cast<const std::remove_pointer_t<decltype(type)>*>(bias->data_ptr()));
  });
}

// y (M, N) fp32 from a kernel, plus the bias (N,) in fp32, rounded once to the input's dtype: what
// `(y + bias).to(dtype)` gives in torch, without the two extra ops per projection.
at::Tensor finish(at::Tensor y, const c10::optional<at::Tensor>& bias, at::ScalarType dtype) {
  const int64_t m = y.size(0), n = y.size(1);
  if (!bias.has_value() && dtype == at::kFloat) return y;
  at::Tensor out = dtype == at::kFloat ? y : at::empty({m, n}, y.options().dtype(dtype));
  as_type(dtype, [&](auto* type) {
    auto* op = static_cast<decltype(type)>(out.data_ptr());
    with_bias(bias, n, [&](const auto* bp) { finish_rows(y.data_ptr<float>(), bp, op, m, n); });
  });
  return out;
}

int64_t resolve_isa(int64_t isa) {
  const int64_t best = best_isa();
  if (isa < 0) return best;
  TORCH_CHECK(isa <= best, "stablelm kernels: ISA level ", isa, " is not supported by this CPU (best ", best, ")");
  return isa;
}

template <Kind kind>
void run(const float* x, int64_t m, const void* w, const float* scale, float* y, int64_t n, int64_t k, int64_t isa) {
  at::parallel_for(0, (n + 15) / 16, 1, [&](int64_t begin, int64_t end) {
    const int64_t b = begin * 16, e = std::min(end * 16, n);
    if (isa >= kAvx2) rows_simd<kind>(isa, x, m, w, scale, y, b, e, n, k);
    else rows_scalar<kind>(x, m, w, scale, y, b, e, n, k);
  });
}

// x (M, K) fp32; weight (N, K) bf16 / fp16 / int8; scale (N,) fp32 for int8. Returns (M, N) fp32.
at::Tensor gemv(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t isa,
                const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "stablelm kernels: weight must be contiguous (N, K)");
  const int64_t n = weight.size(0), k = weight.size(1), m = x_in.size(0);
  check_x(x_in, k);
  const float* xp = widened(x_in);
  isa = resolve_isa(isa);
  auto y = at::empty({m, n}, x_in.options().dtype(at::kFloat));
  const float* s = nullptr;
  if (weight.scalar_type() == at::kChar) {
    TORCH_CHECK(scale.has_value() && scale->scalar_type() == at::kFloat && scale->numel() == n && scale->is_contiguous(),
                "stablelm kernels: int8 weights need a contiguous float32 scale per row");
    s = static_cast<float*>(scale->data_ptr());
  }
  float* yp = static_cast<float*>(y.data_ptr());
  switch (weight.scalar_type()) {
    case at::kBFloat16: run<kBF16>(xp, m, weight.data_ptr(), nullptr, yp, n, k, isa); break;
    case at::kHalf: run<kF16>(xp, m, weight.data_ptr(), nullptr, yp, n, k, isa); break;
    case at::kChar: run<kI8>(xp, m, weight.data_ptr(), s, yp, n, k, isa); break;
    default: TORCH_CHECK(false, "stablelm kernels: weight dtype ", weight.scalar_type(), " is not bf16, fp16 or int8");
  }
  return finish(y, bias, x_in.scalar_type());
}

// x (M, K) fp32; packed (N, K / 2) uint8 as described above; scale, offset (N, K / group) fp32.
at::Tensor gemv_int4(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& offset,
                     int64_t group, int64_t isa) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "stablelm kernels: int4 weights must be contiguous (N, K / 2) uint8");
  const int64_t n = packed.size(0), k = packed.size(1) * 2, m = x.size(0);
  check_x(x, k);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "stablelm kernels: gemv_int4 takes float32 x");
  TORCH_CHECK(group % 32 == 0 && k % group == 0, "stablelm kernels: group ", group, " must be a multiple of 32 dividing K");
  const int64_t groups = k / group;
  for (const auto* t : {&scale, &offset})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n * groups,
                "stablelm kernels: int4 scale and offset must be contiguous float32 (N, K / group)");
  isa = resolve_isa(isa);
  auto y = at::empty({m, n}, x.options());
  auto xsum = at::empty({m, groups}, x.options());  // each activation row's sum over each group
  const float *xp = static_cast<float*>(x.data_ptr()), *sp = static_cast<float*>(scale.data_ptr()),
              *op = static_cast<float*>(offset.data_ptr());
  float* xs = static_cast<float*>(xsum.data_ptr());
  for (int64_t i = 0; i < m * groups; ++i) {
    float total = 0.f;
    for (int64_t j = 0; j < group; ++j) total += xp[i * group + j];
    xs[i] = total;
  }
  const uint8_t* wp = static_cast<const uint8_t*>(packed.data_ptr());
  float* yp = static_cast<float*>(y.data_ptr());
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    if (isa >= kAvx2) int4_rows_avx2(xp, m, wp, sp, op, xs, yp, b, e, n, k, group);
    else int4_rows_scalar(xp, m, wp, sp, op, xs, yp, b, e, n, k, group);
  });
  return y;
}

// The int8-activation products: x (M, K) fp32 is rounded per block of 32 (see round_int8), K % 32 == 0.
// int8: weight (N, K) int8, scale (N,) fp32. int4: packed as gemv_int4, scale and zero (N, K / group), both
// fp32 or both bf16, w = (q - 8) * scale + zero.
at::Tensor gemv_q8(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& zero, int64_t group, int64_t isa,
                   const c10::optional<at::Tensor>& bias) {
  const bool int4 = weight.scalar_type() == at::kByte;
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && (int4 || weight.scalar_type() == at::kChar),
              "stablelm kernels: gemv_q8 takes contiguous int8 (N, K) or packed int4 (N, K / 2) weights");
  const int64_t n = weight.size(0), k = weight.size(1) * (int4 ? 2 : 1), m = x_in.size(0);
  check_x(x_in, k);
  TORCH_CHECK(k % kBlock == 0, "stablelm kernels: gemv_q8 needs K divisible by 32, got ", k);
  const int64_t groups = int4 ? k / group : 1;
  TORCH_CHECK(!int4 || (group % kBlock == 0 && k % group == 0 && zero.has_value()),
              "stablelm kernels: int4 needs a group that is a multiple of 32 dividing K, and zero points");
  const auto pdtype = scale.scalar_type();
  TORCH_CHECK((pdtype == at::kFloat || (int4 && pdtype == at::kBFloat16)) && scale.is_contiguous() &&
                  scale.numel() == n * groups && (!int4 || (zero->scalar_type() == pdtype && zero->is_contiguous() &&
                                                            zero->numel() == n * groups)),
              "stablelm kernels: gemv_q8 scale (and int4 zero) must be contiguous float32 (or bf16 for int4) with ",
              n * groups, " values");
  isa = resolve_isa(isa);
  const bool fast4 = isa >= kAvx2 && int4 && (group == 64 || group == 128);
  const int64_t span = !fast4 ? 0 : isa == kAvx512 ? 4 : 2;
  const Rounded8 a = round_int8(widened(x_in), m, k, span, int4 ? group : 0, isa >= kAvx2);
  const int8_t* qp = a.q.data_ptr<int8_t>();
  const float *dp = a.d.data_ptr<float>(), *xs = a.sum.data_ptr<float>();
  auto y = at::empty({m, n}, x_in.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const int64_t blocks = k / kBlock;
  if (fast4) {  // one weight row at a time (interleaving rows costs streaming speed), up to 4 activation rows
    const uint8_t* w = static_cast<const uint8_t*>(weight.data_ptr());
    const bool bf16 = pdtype == at::kBFloat16;
    const char *sp = static_cast<const char*>(scale.data_ptr()), *zp = static_cast<const char*>(zero->data_ptr());
    const int64_t step = groups * scale.element_size();  // bytes of parameters a row
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const uint8_t* wrow = w + row * k / 2;
        const char *s = sp + row * step, *z = zp + row * step;
#define STABLELM_ROW(MR) [&](int64_t r) {                                                                    \
          const int8_t* q = qp + r * k;                                                                        \
          const float *d = dp + r * blocks * 4, *sum = xs + r * groups;                                        \
          if (isa == kAvx512) int4_row512<MR>(bf16, group, q, d, sum, wrow, s, z, yp + r * n + row, n, k);     \
          else int4_row<MR>(bf16, group, q, d, sum, wrow, s, z, yp + r * n + row, n, k);                       \
        }
        over_rows(m, STABLELM_ROW(1), STABLELM_ROW(2), STABLELM_ROW(4));
#undef STABLELM_ROW
      }
    });
    return finish(y, bias, x_in.scalar_type());
  }
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (isa >= kAvx2 && !int4) {
        const float* sp = scale.data_ptr<float>();
        const int8_t* w = static_cast<const int8_t*>(weight.data_ptr());
        over_rows(m, [&](int64_t r) { int8_q8_tile_avx2<1>(qp + r * k, dp + r * blocks, w, sp, yp + r * n, row, n, k); },
                     [&](int64_t r) { int8_q8_tile_avx2<2>(qp + r * k, dp + r * blocks, w, sp, yp + r * n, row, n, k); },
                     [&](int64_t r) { int8_q8_tile_avx2<4>(qp + r * k, dp + r * blocks, w, sp, yp + r * n, row, n, k); });
        continue;
      }
      uint8_t values[kBlock];  // the same integer sums, one block at a time
      for (int64_t r = 0; r < m; ++r) {
        float total = 0.f;
        for (int64_t b = 0; b < blocks; ++b) {
          int32_t dot;
          if (int4) {
            const uint8_t* bytes = static_cast<const uint8_t*>(weight.data_ptr()) + row * k / 2 + b * kBlock / 2;
            for (int j = 0; j < 16; ++j) { values[j] = bytes[j] & 0xF; values[16 + j] = bytes[j] >> 4; }
            dot = dot_block_scalar_u8(values, qp + r * k + b * kBlock);
          } else {
            const int8_t* q = static_cast<const int8_t*>(weight.data_ptr()) + row * k + b * kBlock;
            dot = 0;
            for (int j = 0; j < kBlock; ++j) dot += int32_t(q[j]) * int32_t(qp[r * k + b * kBlock + j]);
          }
          total += (int4 ? param_at(scale, row * groups + b * kBlock / group) : 1.f) * dp[r * blocks + b] * float(dot);
        }
        if (int4)
          for (int64_t g = 0; g < groups; ++g) {
            const float s = param_at(scale, row * groups + g), z = param_at(*zero, row * groups + g);
            total += (z - 8.f * s) * xs[r * groups + g];
          }
        else total *= scale.data_ptr<float>()[row];
        yp[r * n + row] = total;
      }
    }
  });
  return finish(y, bias, x_in.scalar_type());
}

// int8 weights (N, K) with scale (N,) fp32 times x (M, K) fp32 rounded to int16 per block of 128.
at::Tensor gemv_q16(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& scale, int64_t isa,
                    const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kChar,
              "stablelm kernels: gemv_q16 takes contiguous int8 (N, K) weights");
  const int64_t n = weight.size(0), k = weight.size(1), m = x_in.size(0);
  check_x(x_in, k);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == n,
              "stablelm kernels: gemv_q16 needs a contiguous float32 scale per row");
  isa = resolve_isa(isa);
  const bool simd = isa >= kAvx2 && k % 16 == 0;
  const int64_t blocks = (k + kBlock16 - 1) / kBlock16;
  auto xq = at::empty({m, k}, at::kShort);
  auto d = at::empty({m, blocks}, at::kFloat);
  const float* xp = widened(x_in);
  int16_t* qp = xq.data_ptr<int16_t>();
  float* dp = d.data_ptr<float>();
  at::parallel_for(0, m, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * kBlock16, len = std::min(kBlock16, k - start);
        dp[r * blocks + b] = simd ? quantize16_avx2(xp + r * k + start, len, qp + r * k + start)
                                  : quantize16_scalar(xp + r * k + start, len, qp + r * k + start);
      }
  });
  auto y = at::empty({m, n}, at::kFloat);
  float* yp = y.data_ptr<float>();
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int8_t* wrow = w + row * k;
      if (simd) {
#define STABLELM_ROW(MR) [&](int64_t r) {                                                                    \
          if (isa == kAvx512) int8_q16_row_avx512<MR>(qp + r * k, dp + r * blocks, wrow, sp[row], yp + r * n + row, n, k); \
          else int8_q16_row_avx2<MR>(qp + r * k, dp + r * blocks, wrow, sp[row], yp + r * n + row, n, k);      \
        }
        over_rows(m, STABLELM_ROW(1), STABLELM_ROW(2), STABLELM_ROW(4));
#undef STABLELM_ROW
        continue;
      }
      for (int64_t r = 0; r < m; ++r) {
        float total = 0.f;
        for (int64_t b = 0; b < blocks; ++b) {
          int32_t dot = 0;
          for (int64_t i = b * kBlock16; i < std::min(k, (b + 1) * kBlock16); ++i) dot += int32_t(wrow[i]) * int32_t(qp[r * k + i]);
          total += dp[r * blocks + b] * float(dot);
        }
        yp[r * n + row] = sp[row] * total;
      }
    }
  });
  return finish(y, bias, x_in.scalar_type());
}

// x (M, K) times the checked weight `w` read as `kind`, plus the bias, in x's dtype (gemm and gemm_lossless).
at::Tensor gemm_rows(const at::Tensor& x_in, const PanelWeight& w, PanelKind kind, const float* out_scale,
                     const c10::optional<at::Tensor>& bias, int64_t isa) {
  const bool avx512 = resolve_isa(isa) == kAvx512;
  const int64_t m = x_in.size(0), n = w.n, k = w.k;
  // The packed activations live in this thread's buffer from call to call, as each worker's block of
  // products does: fresh pages cost more than the packing (first-touch faults run at ~1.3 GB/s on the VM of
  // the README), and a prompt's forward makes four products a layer.
  thread_local std::vector<float> packed;
  const int64_t strips = (m + kMr - 1) / kMr;
  if (packed.size() < size_t(strips * k * kMr)) packed.resize(strips * k * kMr);
  // The bias widened to fp32 here (what the GEMM adds anyway): one GEMM per weight kind and activation dtype,
  // not per bias dtype too (a third of the build's time went to those copies).
  std::vector<float> bias32;
  with_bias(bias, n, [&](const auto* b) {
    if (b) for (int64_t j = 0; j < n; ++j) bias32.push_back(float(b[j]));
  });
  const float* bp = bias.has_value() ? bias32.data() : nullptr;
  at::Tensor out = at::empty({m, n}, x_in.options());
  as_type(x_in.scalar_type(), [&](auto* type) {
    using X = std::remove_pointer_t<decltype(type)>;
    const X* xp = x_in.data_ptr<X>();
    X* op = out.data_ptr<X>();
    switch (kind) {
      case kPanelBF16: gemm_blocked<kPanelBF16>(xp, m, w, nullptr, bp, packed.data(), op, avx512); break;
      case kPanelF16: gemm_blocked<kPanelF16>(xp, m, w, nullptr, bp, packed.data(), op, avx512); break;
      case kPanelI8: gemm_blocked<kPanelI8>(xp, m, w, out_scale, bp, packed.data(), op, avx512); break;
      case kPanelI4: gemm_blocked<kPanelI4>(xp, m, w, nullptr, bp, packed.data(), op, avx512); break;
      default: gemm_blocked<kPanelLossless>(xp, m, w, nullptr, bp, packed.data(), op, avx512);
    }
  });
  return out;
}

// Prompt rows: x (M, K) fp32/bf16/fp16 times weight (N, K) bf16 / fp16 / int8 (scale (N,) fp32: outputs
// times scale) or packed int4 as gemv_int4 (scale and offset (N, K / group) fp32), plus the bias, in x's dtype.
at::Tensor gemm(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                const c10::optional<at::Tensor>& offset, int64_t group, int64_t isa,
                const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "stablelm kernels: weight must be contiguous (N, K)");
  const bool int4 = weight.scalar_type() == at::kByte;
  const int64_t n = weight.size(0), k = weight.size(1) * (int4 ? 2 : 1), m = x_in.size(0);
  check_x(x_in, k);
  TORCH_CHECK(resolve_isa(isa) >= kAvx2, "stablelm kernels: gemm needs AVX2 (the caller multiplies in torch below it)");
  PanelWeight w{weight.data_ptr(), n, k, nullptr, nullptr, group};
  const float* out_scale = nullptr;
  if (weight.scalar_type() == at::kChar) {
    TORCH_CHECK(scale.has_value() && scale->scalar_type() == at::kFloat && scale->numel() == n && scale->is_contiguous(),
                "stablelm kernels: int8 weights need a contiguous float32 scale per row");
    out_scale = scale->data_ptr<float>();
  } else if (int4) {
    TORCH_CHECK(group > 0 && group % 32 == 0 && k % group == 0,
                "stablelm kernels: group ", group, " must be a multiple of 32 dividing K");
    for (const auto* t : {&scale, &offset})
      TORCH_CHECK(t->has_value() && (*t)->scalar_type() == at::kFloat && (*t)->is_contiguous() &&
                      (*t)->numel() == n * (k / group),
                  "stablelm kernels: int4 scale and offset must be contiguous float32 (N, K / group)");
    w.scale = scale->data_ptr<float>();
    w.offset = offset->data_ptr<float>();
  }
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf || int4 ||
                  weight.scalar_type() == at::kChar,
              "stablelm kernels: weight dtype ", weight.scalar_type(), " has no prompt product");
  const PanelKind kind = weight.scalar_type() == at::kBFloat16 ? kPanelBF16
                         : weight.scalar_type() == at::kHalf   ? kPanelF16
                         : weight.scalar_type() == at::kChar   ? kPanelI8
                                                               : kPanelI4;
  return gemm_rows(x_in, w, kind, out_scale, bias, isa);
}

// The lossless bf16 weight of gemv_lossless, checked: the tensors lossless_pack returns.
Lossless lossless_of(const at::Tensor& values, const at::Tensor& table, const at::Tensor& tail,
                     const at::Tensor& starts, const at::Tensor& columns, const at::Tensor& exceptions) {
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == at::kByte && values.is_contiguous() &&
                  values.size(1) % 96 == 0,
              "stablelm kernels: lossless values must be contiguous (N, K64 / 64 * 96) uint8");
  const int64_t n = values.size(0), k64 = values.size(1) / 96 * 64;
  TORCH_CHECK(table.scalar_type() == at::kByte && table.is_contiguous() && table.numel() == n * 16,
              "stablelm kernels: lossless table must be contiguous (N, 16) uint8");
  TORCH_CHECK(tail.dim() == 2 && tail.size(0) == n && tail.size(1) < 64 && tail.scalar_type() == at::kBFloat16 &&
                  tail.is_contiguous(),
              "stablelm kernels: lossless tail must be contiguous (N, K % 64) bfloat16");
  TORCH_CHECK(starts.scalar_type() == at::kLong && starts.is_contiguous() && starts.numel() == n + 1 &&
                  columns.scalar_type() == at::kInt && columns.is_contiguous() &&
                  exceptions.scalar_type() == at::kBFloat16 && exceptions.is_contiguous() &&
                  columns.numel() == exceptions.numel(),
              "stablelm kernels: lossless exceptions need starts (N + 1,) int64, columns int32 and bfloat16 values");
  const int64_t* sp = starts.data_ptr<int64_t>();
  TORCH_CHECK(sp[0] == 0 && sp[n] == columns.numel(), "stablelm kernels: lossless starts must run from 0 to ",
              columns.numel());
  return Lossless{values.data_ptr<uint8_t>(), table.data_ptr<uint8_t>(),
                  reinterpret_cast<const uint16_t*>(tail.data_ptr()), sp, columns.data_ptr<int32_t>(),
                  reinterpret_cast<const uint16_t*>(exceptions.data_ptr()), n, k64 + tail.size(1), k64};
}

// One chunk's 64 inputs (bf16 bits, in input order) encoded into its 96 bytes; the exceptions recorded at e
// (columns from col0, ascending).
void ll_encode_scalar(const uint16_t* w, const int8_t* code, uint8_t* chunk, int64_t col0, int32_t* columns,
                      uint16_t* exceptions, int64_t& e) {
  uint8_t stored[64];
  for (int i = 0; i < 64; ++i) {
    const int8_t found = code[w[i] >> 8];
    const int s = kPosition[i];
    if (found < 0) {
      columns[e] = int32_t(col0 + i), exceptions[e++] = w[i];
      stored[s] = 0, chunk[32 + s] = 0;
    } else {
      stored[s] = uint8_t(found), chunk[32 + s] = uint8_t(w[i] & 0xFF);
    }
  }
  for (int t = 0; t < 32; ++t) chunk[t] = uint8_t(stored[t] | stored[32 + t] << 4);
}

// The same at AVX2, for a chunk without exceptions (false, having written nothing, for one with any). Per half
// of 32 inputs: 64-bit groups reordered [0, 2, 1, 3], then bytes packed in lane, put the inputs in storage
// order (positions 0-15: inputs 0-3, 8-11, 16-19, 24-27), and each high byte is compared with the 16 entries.
AVX2 bool ll_encode_avx2(const uint16_t* w, const uint8_t* table, uint8_t* chunk) {
  const __m256i byte = _mm256_set1_epi16(0xFF);
  __m256i codes[2], lows[2];
  for (int h = 0; h < 2; ++h) {
    const __m256i v0 = _mm256_permute4x64_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h)), 0xD8);
    const __m256i v1 =
        _mm256_permute4x64_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h + 16)), 0xD8);
    const __m256i high = _mm256_packus_epi16(_mm256_srli_epi16(v0, 8), _mm256_srli_epi16(v1, 8));
    __m256i code = _mm256_setzero_si256(), found = _mm256_setzero_si256();
    for (int c = 0; c < 16; ++c) {
      const __m256i eq = _mm256_cmpeq_epi8(high, _mm256_set1_epi8(char(table[c])));
      code = _mm256_or_si256(code, _mm256_and_si256(eq, _mm256_set1_epi8(char(c))));
      found = _mm256_or_si256(found, eq);
    }
    if (_mm256_movemask_epi8(found) != -1) return false;
    codes[h] = code;
    lows[h] = _mm256_packus_epi16(_mm256_and_si256(v0, byte), _mm256_and_si256(v1, byte));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(chunk), _mm256_or_si256(codes[0], _mm256_slli_epi16(codes[1], 4)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(chunk + 32), lows[0]);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(chunk + 64), lows[1]);
  return true;
}

// bf16 (N, K) -> the lossless layout above: values, table, tail, starts, columns, exceptions. Each row's
// table holds 0x00, then its 15 commonest other high bytes (most first, ties to the smaller byte).
std::vector<at::Tensor> lossless_pack(const at::Tensor& weight, int64_t isa) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "stablelm kernels: lossless_pack takes a contiguous (N, K) bfloat16 weight");
  isa = resolve_isa(isa);
  const int64_t n = weight.size(0), k = weight.size(1), k64 = k - k % 64;
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  at::Tensor values = at::empty({n, k64 / 64 * 96}, at::kByte), table = at::empty({n, 16}, at::kByte);
  at::Tensor tail = at::empty({n, k - k64}, at::kBFloat16), starts = at::empty({n + 1}, at::kLong);
  uint8_t *vp = values.data_ptr<uint8_t>(), *tp = table.data_ptr<uint8_t>();
  uint16_t* tailp = reinterpret_cast<uint16_t*>(tail.data_ptr());
  int64_t* sp = starts.data_ptr<int64_t>();
  // One pass over the weight: each row's histogram, table and chunks while the row is in cache. Its
  // exceptions go to its block's lists (blocks of 64 rows, in row order), copied into place at the end.
  constexpr int64_t kRows = 64;
  const int64_t nblocks = (n + kRows - 1) / kRows;
  std::vector<std::vector<int32_t>> block_columns(nblocks);
  std::vector<std::vector<uint16_t>> block_values(nblocks);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk)
      for (int64_t row = blk * kRows; row < std::min(n, (blk + 1) * kRows); ++row) {
        const uint16_t* w = bits + row * k;
        // Eight histograms in turn, fed from 8-byte loads: a row's high bytes repeat, and one counter's
        // increments would wait on each other through memory (4.0 cycles a weight where four took 8.8).
        uint32_t counts[8][256] = {};
        int64_t count[256];
        int64_t i = 0;
        for (; i + 8 <= k64; i += 8) {
          uint64_t lo, hi;
          std::memcpy(&lo, w + i, 8);
          std::memcpy(&hi, w + i + 4, 8);
          for (int j = 0; j < 4; ++j) ++counts[j][(lo >> (16 * j + 8)) & 0xFF], ++counts[4 + j][(hi >> (16 * j + 8)) & 0xFF];
        }
        for (; i < k64; ++i) ++counts[0][w[i] >> 8];
        for (int b = 0; b < 256; ++b) {
          count[b] = 0;
          for (int j = 0; j < 8; ++j) count[b] += counts[j][b];
        }
        // The 15 commonest bytes other than 0x00 (most first, ties to the smaller), then unused bytes in order.
        int order[255], used = 0;
        for (int b = 1; b < 256; ++b)
          if (count[b]) order[used++] = b;
        std::sort(order, order + used, [&](int a, int b) { return count[a] != count[b] ? count[a] > count[b] : a < b; });
        for (int b = 1; b < 256 && used < 15; ++b)
          if (!count[b]) order[used++] = b;
        int8_t code[256];  // each high byte's code, or -1 (an exception)
        std::fill(code, code + 256, int8_t(-1));
        tp[row * 16] = 0, code[0] = 0;
        for (int c = 1; c < 16; ++c) tp[row * 16 + c] = uint8_t(order[c - 1]), code[order[c - 1]] = int8_t(c);
        int64_t missing = 0;
        for (int b = 0; b < 256; ++b) missing += code[b] < 0 ? count[b] : 0;
        sp[row + 1] = missing;
        std::vector<int32_t>& cols = block_columns[blk];
        std::vector<uint16_t>& vals = block_values[blk];
        int64_t e = int64_t(cols.size());
        cols.resize(e + missing), vals.resize(e + missing);
        for (int64_t c = 0; c < k64 / 64; ++c) {  // chunks in order: the exceptions ascend
          uint8_t* chunk = vp + row * (k64 / 64 * 96) + c * 96;
          if (!(isa >= kAvx2 && ll_encode_avx2(w + c * 64, tp + row * 16, chunk)))
            ll_encode_scalar(w + c * 64, code, chunk, c * 64, cols.data(), vals.data(), e);
        }
        std::memcpy(tailp + row * (k - k64), w + k64, (k - k64) * 2);
      }
  });
  sp[0] = 0;
  for (int64_t row = 0; row < n; ++row) sp[row + 1] += sp[row];
  at::Tensor columns = at::empty({sp[n]}, at::kInt), exceptions = at::empty({sp[n]}, at::kBFloat16);
  int32_t* cp = columns.data_ptr<int32_t>();
  uint16_t* ep = reinterpret_cast<uint16_t*>(exceptions.data_ptr());
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t at = sp[blk * kRows];
    std::copy(block_columns[blk].begin(), block_columns[blk].end(), cp + at);
    std::copy(block_values[blk].begin(), block_values[blk].end(), ep + at);
  }
  return {values, table, tail, starts, columns, exceptions};
}

// The lossless weight back as (N, K) bf16 (the same bits) or fp32 in `out`.
void lossless_unpack(const at::Tensor& values, const at::Tensor& table, const at::Tensor& tail,
                     const at::Tensor& starts, const at::Tensor& columns, const at::Tensor& exceptions,
                     const at::Tensor& out) {
  const Lossless w = lossless_of(values, table, tail, starts, columns, exceptions);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == w.n && out.size(1) == w.k && out.is_contiguous() &&
                  (out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kFloat),
              "stablelm kernels: lossless_unpack writes a contiguous (", w.n, ", ", w.k, ") bfloat16 or float32 tensor");
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  at::parallel_for(0, w.n, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> row_bits(w.k);
    for (int64_t row = begin; row < end; ++row) {
      ll_decode_bits(w, row, 0, w.k, row_bits.data());
      if (bf16) std::memcpy(static_cast<uint16_t*>(out.data_ptr()) + row * w.k, row_bits.data(), w.k * 2);
      else
        for (int64_t i = 0; i < w.k; ++i) out.data_ptr<float>()[row * w.k + i] = bf16_bits_to_float(row_bits[i]);
    }
  });
}

// x (M, K) fp32 / bf16 / fp16 times a lossless bf16 weight, plus the bias, in x's dtype.
at::Tensor gemv_lossless(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& table,
                         const at::Tensor& tail, const at::Tensor& starts, const at::Tensor& columns,
                         const at::Tensor& exceptions, int64_t isa, const c10::optional<at::Tensor>& bias) {
  const Lossless w = lossless_of(values, table, tail, starts, columns, exceptions);
  const int64_t n = w.n, k = w.k, m = x_in.size(0);
  check_x(x_in, k);
  const float* xp = widened(x_in);
  isa = resolve_isa(isa);
  auto y = at::empty({m, n}, x_in.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  at::Tensor swizzled;  // AVX-512: the activations in the decoded order
  const float* sw = nullptr;
  if (isa == kAvx512) {
    swizzled = at::empty({m, k}, at::kFloat);
    sw = swizzled.data_ptr<float>();
    for (int64_t r = 0; r < m; ++r) ll_swizzle(xp + r * k, w.k64, swizzled.data_ptr<float>() + r * k);
  }
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    if (isa < kAvx2) return ll_rows_scalar(xp, m, w, yp, begin, end, n);
    // Blocks of 16 weight rows against each chunk of (up to 4) activation rows in turn, as rows_simd does:
    // the chunk stays in L1 across the block (per weight row, chunk after chunk: 8 rows took 3x 4 rows' time).
    for (int64_t b = begin; b < end; b += 16) {
      const int64_t e = std::min(b + 16, end);
#define STABLELM_ROW(MR) [&](int64_t r) {                                                                    \
        for (int64_t row = b; row < e; ++row) {                                                              \
          if (isa == kAvx512) ll_row_avx512<MR>(sw + r * k, xp + r * k, k, w, row, yp + r * n, n); \
          else ll_row_avx2<MR>(xp + r * k, k, w, row, yp + r * n, n);                                        \
        }                                                                                                    \
      }
      over_rows(m, STABLELM_ROW(1), STABLELM_ROW(2), STABLELM_ROW(4));
#undef STABLELM_ROW
    }
  });
  return finish(y, bias, x_in.scalar_type());
}

// Prompt rows against a lossless bf16 weight: the GEMM, each panel decoded as it is packed.
at::Tensor gemm_lossless(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& table,
                         const at::Tensor& tail, const at::Tensor& starts, const at::Tensor& columns,
                         const at::Tensor& exceptions, int64_t isa, const c10::optional<at::Tensor>& bias) {
  const Lossless w = lossless_of(values, table, tail, starts, columns, exceptions);
  check_x(x_in, w.k);
  TORCH_CHECK(resolve_isa(isa) >= kAvx2, "stablelm kernels: gemm needs AVX2 (the caller multiplies in torch below it)");
  return gemm_rows(x_in, PanelWeight{nullptr, w.n, w.k, nullptr, nullptr, 0, &w}, kPanelLossless, nullptr, bias, isa);
}

int64_t isa_level() { return best_isa(); }

}  // namespace

TORCH_LIBRARY(stablelm_kernels, m) {
  m.def("gemv(Tensor x, Tensor weight, Tensor? scale, int isa, Tensor? bias=None) -> Tensor", gemv);
  m.def("gemv_int4(Tensor x, Tensor packed, Tensor scale, Tensor offset, int group, int isa) -> Tensor", gemv_int4);
  m.def("gemv_q8(Tensor x, Tensor weight, Tensor scale, Tensor? zero, int group, int isa, Tensor? bias=None) -> Tensor", gemv_q8);
  m.def("gemv_q16(Tensor x, Tensor weight, Tensor scale, int isa, Tensor? bias=None) -> Tensor", gemv_q16);
  m.def("gemm(Tensor x, Tensor weight, Tensor? scale, Tensor? offset, int group, int isa, Tensor? bias=None) -> Tensor", gemm);
  m.def("gemv_lossless(Tensor x, Tensor values, Tensor table, Tensor tail, Tensor starts, Tensor columns, Tensor exceptions, int isa, Tensor? bias=None) -> Tensor", gemv_lossless);
  m.def("gemm_lossless(Tensor x, Tensor values, Tensor table, Tensor tail, Tensor starts, Tensor columns, Tensor exceptions, int isa, Tensor? bias=None) -> Tensor", gemm_lossless);
  m.def("lossless_pack(Tensor weight, int isa=-1) -> Tensor[]", lossless_pack);
  m.def("lossless_unpack(Tensor values, Tensor table, Tensor tail, Tensor starts, Tensor columns, Tensor exceptions, Tensor(a!) out) -> ()", lossless_unpack);
  m.def("isa_level() -> int", isa_level);
}
