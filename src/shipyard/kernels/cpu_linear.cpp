// shipyard's native CPU linear kernels: y = x @ W^T + b for the few rows of a decode step.
//
// Built at run time by shipyard/kernels/native.py (x86-64 with AVX2, FMA and F16C, any C++17
// compiler) and registered as PyTorch operators, so the traced decode step calls them with no
// Python in between.
//
// float32 (linear_f32): the weights are packed once, by blocks of 16 output features:
// packed[block][k][16] (zero padded past N). One pass streams each block once and keeps
// 16 columns x up to 6 rows of accumulators in registers, so the weights are read from memory
// once per call whatever the number of rows: at one row this is bound by memory bandwidth
// (~2x MKL's sgemm on the same weights, which repacks them on every call), at 16 rows by the
// FMA units. Every output is acc = 0; for k in 0..K-1 in order: acc = fma(x[m,k], w[n,k], acc);
// then + bias[n]. The order does not depend on the number of rows, the row's position in the
// batch or the thread count, so a row's result is the same whatever else is in the batch
// (bitwise).
//
// int8 (linear_i8, dynamic int8 x int8; numerics below, before its code): each row's
// activations are quantized to 8 bits with the row's own scale and multiplied with the int8
// weights exactly in int32, so a row's result is likewise independent of the batch.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t BW = 16;           // output features per packed block
constexpr int64_t MAX_TILE_ROWS = 6; // rows of accumulators kept in registers
constexpr int64_t PANEL_ROWS = 48;   // rows multiplied with a block while it is in cache

struct F32Weights {
  const float *w;
  int64_t K;
  int64_t first_block = 0;  // the block w points at (a one-block scratch copy: its index)
  inline void load(int64_t block, int64_t k, __m256 &lo, __m256 &hi) const {
    const float *p = w + ((block - first_block) * K + k) * BW;
    lo = _mm256_loadu_ps(p);
    hi = _mm256_loadu_ps(p + 8);
  }
  inline const void *block_start(int64_t block) const {
    return w + (block - first_block) * K * BW;
  }
  static constexpr int64_t bytes_per_k = BW * 4;
};

// R rows x C blocks of 16 columns; prefetch: a block to pull into L2 while this one computes.
template <int R, int C, typename W>
void tile(const float *x, int64_t ldx, const W &wt, int64_t block0, const float *scale,
          const float *bias, float *y, int64_t ldy, int64_t N, const char *prefetch) {
  __m256 acc[R][C][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; r++)
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) {
      acc[r][c][0] = _mm256_setzero_ps();
      acc[r][c][1] = _mm256_setzero_ps();
    }
  const int64_t K = wt.K;
  for (int64_t k = 0; k < K; k++) {
    if (prefetch != nullptr && (k * W::bytes_per_k) % 64 == 0)
      _mm_prefetch(prefetch + k * W::bytes_per_k, _MM_HINT_T1);
    __m256 wv[C][2];
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) wt.load(block0 + c, k, wv[c][0], wv[c][1]);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
      const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);
#pragma GCC unroll 8
      for (int c = 0; c < C; c++) {
        acc[r][c][0] = _mm256_fmadd_ps(xv, wv[c][0], acc[r][c][0]);
        acc[r][c][1] = _mm256_fmadd_ps(xv, wv[c][1], acc[r][c][1]);
      }
    }
  }
  alignas(32) float out[BW];
#pragma GCC unroll 8
  for (int r = 0; r < R; r++)
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) {
      _mm256_store_ps(out, acc[r][c][0]);
      _mm256_store_ps(out + 8, acc[r][c][1]);
      const int64_t n0 = (block0 + c) * BW;
      const int64_t width = N - n0 < BW ? N - n0 : BW;
      float *row = y + r * ldy + n0;
      for (int64_t j = 0; j < width; j++) {
        float v = out[j];
        if (scale != nullptr) v *= scale[n0 + j];
        if (bias != nullptr) v += bias[n0 + j];
        row[j] = v;
      }
    }
}

// Blocks [block_begin, block_end) of every row.
template <typename W>
void run_blocks(const float *x, int64_t M, const W &wt, const float *scale, const float *bias,
                float *y, int64_t N, int64_t block_begin, int64_t block_end);

template <typename W>
void run_blocks(const float *x, int64_t M, const W &wt, const float *scale, const float *bias,
                float *y, int64_t N, int64_t block_begin, int64_t block_end) {
  const int64_t K = wt.K;
  if (M == 1) {  // four blocks at once: 8 independent accumulators hide the FMA latency
    int64_t b = block_begin;
    for (; b + 4 <= block_end; b += 4) tile<1, 4>(x, K, wt, b, scale, bias, y, N, N, nullptr);
    for (; b < block_end; b++) tile<1, 1>(x, K, wt, b, scale, bias, y, N, N, nullptr);
    return;
  }
  for (int64_t b = block_begin; b < block_end; b++) {
    // the first pass over a block streams it from memory; the next block is prefetched into
    // L2 meanwhile, the other row tiles reread this one from cache
    const char *next = (b + 1 < block_end)
                           ? static_cast<const char *>(wt.block_start(b + 1))
                           : nullptr;
    int64_t m = 0;
    for (; m + 6 <= M; m += 6, next = nullptr)
      tile<6, 1>(x + m * K, K, wt, b, scale, bias, y + m * N, N, N, next);
    const int64_t rest = M - m;
    const float *xr = x + m * K;
    float *yr = y + m * N;
    switch (rest) {
      case 5: tile<5, 1>(xr, K, wt, b, scale, bias, yr, N, N, next); break;
      case 4: tile<4, 1>(xr, K, wt, b, scale, bias, yr, N, N, next); break;
      case 3: tile<3, 1>(xr, K, wt, b, scale, bias, yr, N, N, next); break;
      case 2: tile<2, 1>(xr, K, wt, b, scale, bias, yr, N, N, next); break;
      case 1: tile<1, 1>(xr, K, wt, b, scale, bias, yr, N, N, next); break;
      default: break;
    }
  }
}

// All rows, the blocks split over PyTorch's intra-op threads (in groups of 4: the one-row
// tile's width) when the product is large enough to pay for it.
template <typename W>
void run(const float *x, int64_t M, const W &wt, const float *scale, const float *bias,
         float *y, int64_t N) {
  const int64_t blocks = (N + BW - 1) / BW;
  const int64_t groups = (blocks + 3) / 4;
  const int64_t work_per_group = 4 * BW * wt.K * M;
  const int64_t grain = work_per_group >= (1 << 18) ? 1 : (1 << 18) / work_per_group;
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    const int64_t b1 = g1 * 4 < blocks ? g1 * 4 : blocks;
    // panels of rows, so the rows a block is multiplied with stay in cache (a long prompt)
    for (int64_t m0 = 0; m0 < M; m0 += PANEL_ROWS) {
      const int64_t rows = M - m0 < PANEL_ROWS ? M - m0 : PANEL_ROWS;
      run_blocks(x + m0 * wt.K, rows, wt, scale, bias, y + m0 * N, N, g0 * 4, b1);
    }
  });
}

void check_input(const at::Tensor &x, int64_t K, const c10::optional<at::Tensor> &bias,
                 int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "shipyard native linear: x must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "shipyard native linear: x has ", x.size(-1),
              " features, the weight ", K);
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == N,
                "shipyard native linear: bias must be a contiguous float32 (", N, ",)");
}

std::vector<int64_t> out_shape(const at::Tensor &x, int64_t N) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  return sizes;
}

// (N, K) float32 -> packed (ceil(N/16), K, 16), zero padded.
at::Tensor pack_weight(const at::Tensor &weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu() && weight.scalar_type() == at::kFloat,
              "shipyard pack_weight: a 2-D float32 CPU weight (out, in)");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), blocks = (N + BW - 1) / BW;
  at::Tensor packed = at::zeros({blocks, K, BW}, w.options());
  const float *src = w.data_ptr<float>();
  float *dst = packed.data_ptr<float>();
  for (int64_t n = 0; n < N; n++)
    for (int64_t k = 0; k < K; k++) dst[((n / BW) * K + k) * BW + n % BW] = src[n * K + k];
  return packed;
}

// y = x @ weight^T + bias from the packed float32 weight; more than max_rows rows (a long
// prompt: a large matrix product) go to PyTorch's own linear on `weight`.
at::Tensor linear_f32(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &packed,
                      const c10::optional<at::Tensor> &bias, int64_t max_rows) {
  const int64_t N = weight.size(0), K = weight.size(1);
  check_input(x, K, bias, N);
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
                  packed.dim() == 3 && packed.size(0) == (N + BW - 1) / BW &&
                  packed.size(1) == K && packed.size(2) == BW,
              "shipyard linear_f32: the packed weight does not match the weight");
  const int64_t M = x.numel() / K;
  if (M > max_rows) return at::linear(x, weight, bias);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  const float *b = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  run(xc.data_ptr<float>(), M, F32Weights{packed.data_ptr<float>(), K}, nullptr, b,
      y.data_ptr<float>(), N);
  return y;
}

// ---------------------------------------------------------------------------------------------
// Dynamic int8 x int8 linear for the few rows of a decode step (AVX2, no VNNI needed):
// y = x @ (q * scale)^T + bias with the activations quantized per row at run time.
//
// Numerics, all exact except the two float steps named:
//   per row m: amax = max_k |x[m,k]|, s_m = amax / 127 (float division),
//              xq[m,k] = clamp(round_half_even(x[m,k] / s_m), -127, 127)   (float division)
//   acc[m,n] = sum_k xq[m,k] * q[n,k] in int32, exact (|acc| <= 127*127*K < 2^31 for
//              K < 133,000), in an order that cannot matter (integer addition)
//   y[m,n]   = fma(float(acc[m,n]), s_m * scale[n], bias[n])   (or float(acc) * (s_m*scale[n]))
// Each output depends only on its own row of x, so a row's result is the same whatever else is
// in the batch and whatever the thread count (bitwise). A row of zeros gives y = bias; a row
// holding an inf or NaN gives a row of NaN (s_m = NaN).
//
// The product uses vpmaddubsw (unsigned 8 bit x signed 8 bit, adjacent pairs summed to 16 bits
// with saturation) with the sign trick: |xq| is the unsigned operand and q with xq's sign
// (vpsignb) the signed one, so each pair sum is at most 2*127*127 = 32258 < 32767 and never
// saturates (q = -128 would break this: pack_int8 refuses it). vpmaddwd with ones then sums the
// pairs into int32: one int32 lane = 4 consecutive k of one output column.
//
// Weights are packed once, by blocks of 16 output columns and groups of 4 k:
// packed[block][kq][col 0..15][k 4kq..4kq+3] (zero padded past N and K), stored as a
// (ceil(N/16), 4*ceil(K/4), 16) int8 tensor; one group is 64 bytes = two 32-byte vectors
// (columns 0-7, 8-15). The activations of all rows are quantized once per call into a buffer
// xbuf[m][kq] = {4 bytes |xq|, 4 bytes xq} (zero padded), each 4-byte word broadcast to a register.

constexpr int64_t K_CHUNK = 256;  // groups of 4 k per chunk of a block (several rows)
constexpr int64_t Q8_PREFETCH = 16;  // groups of 4 k (64-byte lines of a block) read ahead

// (N, K) int8 in [-127, 127] -> packed (ceil(N/16), 4*ceil(K/4), 16), layout above.
at::Tensor pack_int8(const at::Tensor &weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu() && weight.scalar_type() == at::kChar,
              "shipyard pack_int8: a 2-D int8 CPU weight (out, in)");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t blocks = (N + BW - 1) / BW, KQ = (K + 3) / 4;
  const int8_t *src = w.data_ptr<int8_t>();
  for (int64_t i = 0; i < N * K; i++)
    TORCH_CHECK(src[i] != -128, "shipyard pack_int8: weights must lie in [-127, 127] (found -128)");
  at::Tensor packed = at::zeros({blocks, 4 * KQ, BW}, w.options());
  int8_t *dst = packed.data_ptr<int8_t>();
  for (int64_t n = 0; n < N; n++)
    for (int64_t k = 0; k < K; k++)
      dst[((n / BW) * KQ + k / 4) * (4 * BW) + (n % BW) * 4 + k % 4] = src[n * K + k];
  return packed;
}

// One row of K floats -> out[kq] = {|xq| x4, xq x4} for kq < 2*ceil(K/8) (zero past K); returns
// s (0 for a row of zeros, or when amax/127 underflows to 0: xq = 0; NaN when the row holds an
// inf or NaN: xq = 0, so every output of the row is NaN).
float quantize_row(const float *x, int64_t K, int8_t *out) {
  // amax on the bit patterns with the sign cleared: for non-negative floats the integer order is
  // the float order, and NaN patterns sort above inf, so one integer max finds both
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
  __m256i mx = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    mx = _mm256_max_epu32(
        mx, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(x + k)),
                             magnitude));
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i *>(lanes), mx);
  uint32_t bits = 0;
  for (int j = 0; j < 8; j++) bits = lanes[j] > bits ? lanes[j] : bits;
  for (; k < K; k++) {
    uint32_t b;
    std::memcpy(&b, x + k, 4);
    b &= 0x7fffffffu;
    bits = b > bits ? b : bits;
  }
  const int64_t chunks = (K + 7) / 8;  // 8 floats -> 2 groups of 4 k -> 16 bytes
  float amax;
  std::memcpy(&amax, &bits, 4);
  const float s = amax / 127.f;
  if (bits >= 0x7f800000u || !(s > 0.f)) {
    std::memset(out, 0, static_cast<size_t>(chunks * 16));
    return bits >= 0x7f800000u ? std::numeric_limits<float>::quiet_NaN() : 0.f;
  }
  const __m256 sv = _mm256_set1_ps(s);
  const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  for (int64_t c = 0; c < chunks; c++) {
    __m256 v;
    if (8 * c + 8 <= K) {
      v = _mm256_loadu_ps(x + 8 * c);
    } else {  // the tail, zero padded: same arithmetic, xq = 0 past K
      alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t j = 8 * c; j < K; j++) tail[j - 8 * c] = x[j];
      v = _mm256_load_ps(tail);
    }
    v = _mm256_round_ps(_mm256_div_ps(v, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i q = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
    const __m256i a = _mm256_abs_epi32(q);
    // per 128-bit lane: packs_epi32 -> |q0..3|, q0..3 (16 bit); packs_epi16 -> the same in 8 bit
    const __m256i p16 = _mm256_packs_epi32(a, q);
    const __m256i p8 = _mm256_packs_epi16(p16, p16);
    const __m128i two = _mm_unpacklo_epi64(_mm256_castsi256_si128(p8),
                                           _mm256_extracti128_si256(p8, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i *>(out + 16 * c), two);
  }
  return s;
}

// R rows x C blocks of 16 columns, over all K. xq: the first row's buffer (ldx bytes per row),
// w: the first block's packed weights (KQ groups of 64 bytes per block).
// Only k groups [kq0, kq1) when given `part` (R rows of C*16 int32, ldp apart): the sums of the
// groups before kq0 are read from it, and unless kq1 == KQ the sums are written back there
// instead of finishing the outputs (integer sums: splitting K changes nothing).
template <int R, int C>
void tile_q8(const int8_t *xq, int64_t ldx, const float *s, const int8_t *w, int64_t KQ,
             const float *scale, const float *bias, float *y, int64_t ldy, int64_t N, int64_t n0,
             int64_t kq0 = 0, int64_t kq1 = -1, int32_t *part = nullptr, int64_t ldp = 0) {
  if (kq1 < 0) kq1 = KQ;
  __m256i acc[R][C][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; r++)
#pragma GCC unroll 8
    for (int c = 0; c < C; c++)
#pragma GCC unroll 2
      for (int h = 0; h < 2; h++)
        acc[r][c][h] = kq0 == 0 ? _mm256_setzero_si256()
                                : _mm256_loadu_si256(reinterpret_cast<const __m256i *>(
                                      part + r * ldp + c * BW + 8 * h));
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t kq = kq0; kq < kq1; kq++) {
    __m256i wv[C][2];
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) {
      const int8_t *p = w + (c * KQ + kq) * 64;
      // the weights come from memory (or L3) once per call: ask for them Q8_PREFETCH groups
      // ahead (past this block's end: the next block's start, which comes next)
      _mm_prefetch(reinterpret_cast<const char *>(p + Q8_PREFETCH * 64), _MM_HINT_T0);
      wv[c][0] = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p));
      wv[c][1] = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p + 32));
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
      int32_t words[2];
      std::memcpy(words, xq + r * ldx + kq * 8, 8);
      const __m256i ax = _mm256_set1_epi32(words[0]);  // |xq| of 4 k, in every lane
      const __m256i sx = _mm256_set1_epi32(words[1]);  // xq of the same 4 k (its signs)
#pragma GCC unroll 8
      for (int c = 0; c < C; c++)
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
          const __m256i pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[c][h], sx));
          acc[r][c][h] = _mm256_add_epi32(acc[r][c][h], _mm256_madd_epi16(pairs, ones));
        }
    }
  }
  if (kq1 < KQ) {
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
      for (int c = 0; c < C; c++)
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++)
          _mm256_storeu_si256(reinterpret_cast<__m256i *>(part + r * ldp + c * BW + 8 * h),
                              acc[r][c][h]);
    return;
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; r++) {
    const __m256 sr = _mm256_set1_ps(s[r]);
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) {
      const int64_t n = n0 + c * BW;
      const int64_t width = N - n < BW ? N - n : BW;
      // the last block of a layer whose N is not a multiple of 16: scale and bias from a padded
      // copy, the result through a scratch row (same arithmetic)
      alignas(32) float sc_pad[BW], b_pad[BW], out[BW];
      const float *sc = scale + n, *b = bias != nullptr ? bias + n : nullptr;
      float *dst = y + r * ldy + n;
      if (width < BW) {
        for (int64_t j = 0; j < BW; j++) {
          sc_pad[j] = j < width ? scale[n + j] : 0.f;
          b_pad[j] = (j < width && bias != nullptr) ? bias[n + j] : 0.f;
        }
        sc = sc_pad;
        b = bias != nullptr ? b_pad : nullptr;
        dst = out;
      }
#pragma GCC unroll 2
      for (int h = 0; h < 2; h++) {
        const __m256 f = _mm256_cvtepi32_ps(acc[r][c][h]);  // exact below 2^24, else rounded
        const __m256 m = _mm256_mul_ps(sr, _mm256_loadu_ps(sc + 8 * h));
        const __m256 v = b != nullptr ? _mm256_fmadd_ps(f, m, _mm256_loadu_ps(b + 8 * h))
                                      : _mm256_mul_ps(f, m);
        _mm256_storeu_ps(dst + 8 * h, v);
      }
      if (width < BW)
        for (int64_t j = 0; j < width; j++) y[r * ldy + n + j] = out[j];
    }
  }
}

// Rows [0, M) x blocks [b0, b1).
void run_blocks_q8(const int8_t *xq, int64_t ldx, const float *s, int64_t M, const int8_t *w,
                   int64_t KQ, const float *scale, const float *bias, float *y, int64_t N,
                   int64_t b0, int64_t b1) {
  const int64_t bstride = KQ * 64;
  if (M == 1) {  // four blocks at once: 8 accumulators, each activation word loaded once
    int64_t b = b0;
    for (; b + 4 <= b1; b += 4)
      tile_q8<1, 4>(xq, ldx, s, w + b * bstride, KQ, scale, bias, y, N, N, b * BW);
    for (; b < b1; b++)
      tile_q8<1, 1>(xq, ldx, s, w + b * bstride, KQ, scale, bias, y, N, N, b * BW);
    return;
  }
  // Several rows: two blocks at a time, in chunks of K_CHUNK groups of 4 k (a 32 KB slice of
  // the pair), each multiplied with every row (tiles of 2 rows x 32 columns: 8 accumulators,
  // each activation word loaded once for 4 vectors) while it is in L1, the partial int32 sums
  // kept in `part` between chunks. Measured against the float kernel's scheme (4 rows x 16
  // columns over all K with the next block prefetched): 4-15% faster, none slower.
  // A last odd block: tiles of 4 rows x 16 columns.
  std::vector<int32_t> part(static_cast<size_t>(2 * M * BW));
  for (int64_t b = b0; b < b1;) {
    const int8_t *wb = w + b * bstride;
    const int64_t n0 = b * BW;
    if (b + 1 < b1) {
      for (int64_t kq0 = 0; kq0 < KQ; kq0 += K_CHUNK) {
        const int64_t kq1 = kq0 + K_CHUNK < KQ ? kq0 + K_CHUNK : KQ;
        int64_t m = 0;
        for (; m + 2 <= M; m += 2)
          tile_q8<2, 2>(xq + m * ldx, ldx, s + m, wb, KQ, scale, bias, y + m * N, N, N, n0, kq0,
                        kq1, part.data() + m * 2 * BW, 2 * BW);
        if (m < M)
          tile_q8<1, 2>(xq + m * ldx, ldx, s + m, wb, KQ, scale, bias, y + m * N, N, N, n0, kq0,
                        kq1, part.data() + m * 2 * BW, 2 * BW);
      }
      b += 2;
      continue;
    }
    for (int64_t kq0 = 0; kq0 < KQ; kq0 += K_CHUNK) {
      const int64_t kq1 = kq0 + K_CHUNK < KQ ? kq0 + K_CHUNK : KQ;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4)
        tile_q8<4, 1>(xq + m * ldx, ldx, s + m, wb, KQ, scale, bias, y + m * N, N, N, n0, kq0,
                      kq1, part.data() + m * BW, BW);
      const int8_t *xr = xq + m * ldx;
      float *yr = y + m * N;
      int32_t *pr = part.data() + m * BW;
      switch (M - m) {
        case 3: tile_q8<3, 1>(xr, ldx, s + m, wb, KQ, scale, bias, yr, N, N, n0, kq0, kq1, pr, BW); break;
        case 2: tile_q8<2, 1>(xr, ldx, s + m, wb, KQ, scale, bias, yr, N, N, n0, kq0, kq1, pr, BW); break;
        case 1: tile_q8<1, 1>(xr, ldx, s + m, wb, KQ, scale, bias, yr, N, N, n0, kq0, kq1, pr, BW); break;
        default: break;
      }
    }
    b++;
  }
}

// y = dynamic-int8(x) @ (q * scale)^T + bias from pack_int8's packed weight (of a layer with
// in_features inputs) and the per-output scales (numerics at the top of this section).
at::Tensor linear_i8_native(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scale,
                     const c10::optional<at::Tensor> &bias, int64_t in_features) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 1 &&
                  scale.device().is_cpu(),
              "shipyard linear_i8: scale must be a contiguous float32 CPU (N,)");
  const int64_t N = scale.numel();
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.dim() == 3 &&
                  packed.size(0) == (N + BW - 1) / BW && packed.size(1) % 4 == 0 &&
                  packed.size(2) == BW && (in_features + 3) / 4 == packed.size(1) / 4,
              "shipyard linear_i8: the packed weight does not match the scales and in_features "
              "(pack it with pack_int8)");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1,
              "shipyard linear_i8: x must be a float32 CPU tensor");
  const int64_t K = x.size(-1), KQ = packed.size(1) / 4;
  TORCH_CHECK(K == in_features, "shipyard linear_i8: x has ", K, " features, the weight ",
              in_features);
  const float *b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == N && bias->device().is_cpu(),
                "shipyard linear_i8: bias must be a contiguous float32 (", N, ",)");
    b = bias->data_ptr<float>();
  }
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options());
  if (y.numel() == 0) return y;
  if (K == 0) {  // an empty sum: y = bias
    if (b != nullptr)
      y.copy_(bias->expand_as(y));
    else
      y.zero_();
    return y;
  }
  const int64_t M = x.numel() / K;
  const at::Tensor xc = x.contiguous();
  // the quantized rows: 16 bytes per 8 k (2 groups), so a row's tail chunk may fill one group
  // past KQ; the row stride keeps rows 32-byte aligned
  const int64_t ldx = ((K + 7) / 8 * 16 + 31) / 32 * 32;
  std::vector<int8_t> xbuf_storage(static_cast<size_t>(M * ldx + 64));
  int8_t *xbuf = reinterpret_cast<int8_t *>(
      (reinterpret_cast<uintptr_t>(xbuf_storage.data()) + 63) & ~static_cast<uintptr_t>(63));
  std::vector<float> s(static_cast<size_t>(M));
  const float *xp = xc.data_ptr<float>();
  at::parallel_for(0, M, K >= 4096 ? 1 : 4096 / (K + 1) + 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; m++)
      s[m] = quantize_row(xp + m * K, K, xbuf + m * ldx);
  });
  // the blocks split over PyTorch's intra-op threads, in groups of 4 (the one-row tile's width)
  const int8_t *w = packed.data_ptr<int8_t>();
  const float *sp = scale.data_ptr<float>();
  float *yp = y.data_ptr<float>();
  const int64_t blocks = packed.size(0), groups = (blocks + 3) / 4;
  const int64_t work_per_group = 4 * BW * 4 * KQ * M;
  const int64_t grain = work_per_group >= (1 << 18) ? 1 : (1 << 18) / work_per_group;
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    const int64_t b1 = g1 * 4 < blocks ? g1 * 4 : blocks;
    run_blocks_q8(xbuf, ldx, s.data(), M, w, KQ, sp, b, yp, N, g0 * 4, b1);
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// Attention of the new tokens of each row over its cached keys/values (a decode step: one token;
// a short prefill: a few, each with its own row of the mask):
// y[b,h,t] = softmax(scale * q[b,h,t] . k[b,g,s] over the allowed slots s) @ v[b,g,s], g = h / (H/G)
// (grouped-query attention). Slots whose mask is false are skipped, keys and values unread (the
// left padding of a batch, the cache's spare slots). Each (row, head) is computed alone, in slot
// order, so its result does not depend on the rest of the batch. A row with no allowed slot
// gives NaN, as a softmax over nothing does. Keys and values are float32 or float16 (a half-size
// cache: converted to float32 as they are loaded, F16C; all arithmetic stays float32). At 16
// rows the cache is most of what a decode step reads, and it comes from memory: the values of
// the next slots are requested during the keys' pass, so both streams are in flight at once.

// Loads of 8 (or 1) cached floats from a float32 or a float16 (stored as uint16_t) cache.
inline __m256 load8(const float *p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t *p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
}
inline float load1(const float *p) { return *p; }
inline float load1(const uint16_t *p) { return _cvtsh_ss(*p); }

inline float hsum8(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

template <typename T>
inline float dot(const float *a, const T *b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(b + d), acc);
  float s = hsum8(acc);
  for (; d < D; d++) s += a[d] * load1(b + d);
  return s;
}

// Ask for the D elements at p (one request per 64-byte line).
template <typename T>
inline void prefetch_row(const T *p, int64_t D) {
  constexpr int64_t line = 64 / static_cast<int64_t>(sizeof(T));
  for (int64_t d = 0; d < D; d += line) _mm_prefetch(reinterpret_cast<const char *>(p + d), _MM_HINT_T0);
}

template <typename T>
inline void axpy(float a, const T *x, float *y, int64_t D) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(y + d, _mm256_fmadd_ps(av, load8(x + d), _mm256_loadu_ps(y + d)));
  for (; d < D; d++) y[d] += a * load1(x + d);
}

// exp(x) for 8 floats: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial (Cephes'
// coefficients), times 2^n; about 1 ulp, 0 below -87.3 (the softmax's far tail).
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.3f);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// One (row, head) with D = 8 * NV: the allowed slots `slot[0..n)`, four keys at a time (four
// independent sums; the keys and values 8 slots ahead requested meanwhile), then the softmax
// weights 8 at a time, then the values into NV registers. T: float or uint16_t (float16).
template <int NV, typename T>
void attend(const float *q, const T *k, int64_t ks, const T *v, int64_t vs,
            const int64_t *slot, int64_t n, float scale, float *w, float *out) {
  __m256 qv[NV];
#pragma GCC unroll 16
  for (int j = 0; j < NV; j++) qv[j] = _mm256_loadu_ps(q + 8 * j);
  for (int64_t t = 0; t < n && t < 8; t++) {  // the first slots (later ones: in the loop)
    prefetch_row(k + slot[t] * ks, 8 * NV);
    prefetch_row(v + slot[t] * vs, 8 * NV);
  }
  float best = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const T *k0 = k + slot[i] * ks, *k1 = k + slot[i + 1] * ks;
    const T *k2 = k + slot[i + 2] * ks, *k3 = k + slot[i + 3] * ks;
    if (i + 12 <= n) {
      for (int t = 8; t < 12; t++) {
        prefetch_row(k + slot[i + t] * ks, 8 * NV);
        prefetch_row(v + slot[i + t] * vs, 8 * NV);
      }
    }
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#pragma GCC unroll 16
    for (int j = 0; j < NV; j++) {
      a0 = _mm256_fmadd_ps(qv[j], load8(k0 + 8 * j), a0);
      a1 = _mm256_fmadd_ps(qv[j], load8(k1 + 8 * j), a1);
      a2 = _mm256_fmadd_ps(qv[j], load8(k2 + 8 * j), a2);
      a3 = _mm256_fmadd_ps(qv[j], load8(k3 + 8 * j), a3);
    }
    w[i] = hsum8(a0) * scale;
    w[i + 1] = hsum8(a1) * scale;
    w[i + 2] = hsum8(a2) * scale;
    w[i + 3] = hsum8(a3) * scale;
    for (int t = 0; t < 4; t++) best = w[i + t] > best ? w[i + t] : best;
  }
  for (; i < n; i++) {
    const T *kr = k + slot[i] * ks;
    __m256 a = _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int j = 0; j < NV; j++) a = _mm256_fmadd_ps(qv[j], load8(kr + 8 * j), a);
    w[i] = hsum8(a) * scale;
    best = w[i] > best ? w[i] : best;
  }
  if (n == 0 || best == -std::numeric_limits<float>::infinity()) {
    for (int64_t d = 0; d < 8 * NV; d++) out[d] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const __m256 bv = _mm256_set1_ps(best);
  i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(w + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(w + i), bv)));
  if (i < n) {
    alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t t = i; t < n; t++) tail[t - i] = w[t];
    _mm256_store_ps(tail, exp8(_mm256_sub_ps(_mm256_load_ps(tail), bv)));
    for (int64_t t = i; t < n; t++) w[t] = tail[t - i];
  }
  float total = 0.f;
  for (int64_t t = 0; t < n; t++) total += w[t];
  __m256 acc[NV];
#pragma GCC unroll 16
  for (int j = 0; j < NV; j++) acc[j] = _mm256_setzero_ps();
  for (int64_t t = 0; t < n; t++) {
    const T *vr = v + slot[t] * vs;
    const __m256 p = _mm256_set1_ps(w[t]);
#pragma GCC unroll 16
    for (int j = 0; j < NV; j++) acc[j] = _mm256_fmadd_ps(p, load8(vr + 8 * j), acc[j]);
  }
  const __m256 inv = _mm256_set1_ps(1.f / total);
#pragma GCC unroll 16
  for (int j = 0; j < NV; j++) _mm256_storeu_ps(out + 8 * j, _mm256_mul_ps(acc[j], inv));
}

// GELU, tanh approximation (GPT-2's): 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3),
// computed as x * sigmoid(2u) = x / (1 + exp(-2u)); within a few ulp of PyTorch's.
at::Tensor gelu_tanh(const at::Tensor &x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "shipyard gelu_tanh: a float32 CPU tensor");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const float *xp = xc.data_ptr<float>();
  float *yp = y.data_ptr<float>();
  const int64_t n = xc.numel();
  at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
    const __m256 c = _mm256_set1_ps(2.f * 0.7978845608028654f);
    const __m256 c3 = _mm256_set1_ps(0.044715f), one = _mm256_set1_ps(1.f);
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
      const __m256 v = _mm256_loadu_ps(xp + i);
      const __m256 u2 = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(c3, v), _mm256_mul_ps(v, v), v));
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), u2));  // exp(-2u)
      _mm256_storeu_ps(yp + i, _mm256_div_ps(v, _mm256_add_ps(one, e)));
    }
    for (; i < i1; i++) {
      const float v = xp[i];
      yp[i] = 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
  });
  return y;
}

// One call's (row, head, query) triples from i0 to i1; T: the cache's element type.
template <typename T>
void decode_attention_rows(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                           const bool *mp, int64_t m_b, int64_t m_t, int64_t m_s, float sc,
                           float *yp, int64_t i0, int64_t i1) {
  const int64_t H = q.size(1), Q = q.size(2), D = q.size(3), G = k.size(1), S = k.size(2);
  const int64_t group = H / G;
  const float *qp = q.data_ptr<float>();
  const T *kp = static_cast<const T *>(k.data_ptr()), *vp = static_cast<const T *>(v.data_ptr());
  const int64_t ks = k.stride(2), vs = v.stride(2);
  std::vector<float> scores(static_cast<size_t>(S));
  std::vector<int64_t> slots(static_cast<size_t>(S));
  for (int64_t i = i0; i < i1; i++) {
    const int64_t b = i / (H * Q), h = (i / Q) % H, t = i % Q, g = h / group;
    const float *qr = qp + b * q.stride(0) + h * q.stride(1) + t * q.stride(2);
    const T *kr = kp + b * k.stride(0) + g * k.stride(1);
    const T *vr = vp + b * v.stride(0) + g * v.stride(1);
    const bool *mr = mp != nullptr ? mp + b * m_b + t * m_t : nullptr;
    float *out = yp + i * D;
    if (D == 16 || D == 32 || D == 64 || D == 128) {
      int64_t n = 0;
      for (int64_t s = 0; s < S; s++)
        if (mr == nullptr || mr[s * m_s]) slots[n++] = s;
      switch (D) {
        case 16: attend<2>(qr, kr, ks, vr, vs, slots.data(), n, sc, scores.data(), out); break;
        case 32: attend<4>(qr, kr, ks, vr, vs, slots.data(), n, sc, scores.data(), out); break;
        case 64: attend<8>(qr, kr, ks, vr, vs, slots.data(), n, sc, scores.data(), out); break;
        default: attend<16>(qr, kr, ks, vr, vs, slots.data(), n, sc, scores.data(), out); break;
      }
      continue;
    }
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < S; s++) {
      if (mr != nullptr && !mr[s * m_s]) continue;
      // the cache is cold (every layer's keys and values of every row): ask for the keys a
      // few slots ahead, and for this slot's values, read in the second pass
      prefetch_row(kr + (s + 12) * ks, D);
      prefetch_row(vr + s * vs, D);
      const float x = dot(qr, kr + s * ks, D) * sc;
      scores[s] = x;
      if (x > best) best = x;
    }
    for (int64_t d = 0; d < D; d++) out[d] = 0.f;
    if (best == -std::numeric_limits<float>::infinity()) {  // nothing allowed (or all -inf)
      for (int64_t d = 0; d < D; d++) out[d] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    float total = 0.f;
    for (int64_t s = 0; s < S; s++) {
      if (mr != nullptr && !mr[s * m_s]) continue;
      const float p = std::exp(scores[s] - best);
      total += p;
      axpy(p, vr + s * vs, out, D);
    }
    const float inv = 1.f / total;
    for (int64_t d = 0; d < D; d++) out[d] *= inv;
  }
}

at::Tensor decode_attention(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                            const c10::optional<at::Tensor> &mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "shipyard decode_attention: q (B, H, T, D), k and v (B, G, S, D)");
  const bool half = k.scalar_type() == at::kHalf;
  TORCH_CHECK(q.scalar_type() == at::kFloat && v.scalar_type() == k.scalar_type() &&
                  (half || k.scalar_type() == at::kFloat) && q.device().is_cpu() &&
                  k.device().is_cpu() && v.device().is_cpu(),
              "shipyard decode_attention: float32 CPU q, float32 or float16 k and v");
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), D = q.size(3), G = k.size(1),
                S = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == G && v.size(2) == S &&
                  k.size(3) == D && v.size(3) == D && G > 0 && H % G == 0,
              "shipyard decode_attention: shapes do not match");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "shipyard decode_attention: the head dimension must be contiguous");
  const bool *mp = nullptr;
  int64_t m_b = 0, m_t = 0, m_s = 0;
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && m.size(1) == 1 &&
                    (m.size(2) == Q || m.size(2) == 1) && m.size(3) == S &&
                    (m.size(0) == B || m.size(0) == 1),
                "shipyard decode_attention: mask must be bool (B or 1, 1, T or 1, S)");
    mp = m.data_ptr<bool>();
    m_b = m.size(0) == 1 ? 0 : m.stride(0);
    m_t = m.size(2) == 1 ? 0 : m.stride(2);
    m_s = m.stride(3);
  }
  at::Tensor y = at::empty({B, H, Q, D}, q.options());
  float *yp = y.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t grain = S * D >= 4096 ? 1 : 4096 / (S * D + 1) + 1;
  at::parallel_for(0, B * H * Q, grain, [&](int64_t i0, int64_t i1) {
    if (half)
      decode_attention_rows<uint16_t>(q, k, v, mp, m_b, m_t, m_s, sc, yp, i0, i1);
    else
      decode_attention_rows<float>(q, k, v, mp, m_b, m_t, m_s, sc, yp, i0, i1);
  });
  return y;
}

// boxed: linear_i8(x, packed, scale, bias, in_features, fallback, max_rows). More than
// max_rows rows go to `fallback` when there is one: PyTorch's packed int8 GEMM
// (quantized::linear_dynamic: 7-bit activations with one scale per call, its AVX2 kernel needs
// no sign step), which is as fast or faster from ~10 rows where the weights come from memory.
void linear_i8_boxed(const c10::OperatorHandle &, torch::jit::Stack *stack) {
  const int64_t max_rows = stack->back().toInt();
  stack->pop_back();
  c10::IValue fallback = std::move(stack->back());
  stack->pop_back();
  const int64_t in_features = stack->back().toInt();
  stack->pop_back();
  c10::optional<at::Tensor> bias = stack->back().toOptional<at::Tensor>();
  stack->pop_back();
  const at::Tensor scale = stack->back().toTensor();
  stack->pop_back();
  const at::Tensor packed = stack->back().toTensor();
  stack->pop_back();
  const at::Tensor x = stack->back().toTensor();
  stack->pop_back();
  const int64_t M = in_features > 0 && x.size(-1) == in_features ? x.numel() / in_features : 0;
  if (M > max_rows && !fallback.isNone()) {
    static const auto gemm =
        c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_dynamic", "");
    torch::jit::Stack call{x.contiguous(), std::move(fallback), c10::IValue(true)};
    gemm.callBoxed(&call);
    stack->push_back(std::move(call[0]));
    return;
  }
  stack->push_back(linear_i8_native(x, packed, scale, bias, in_features));
}

}  // namespace

TORCH_LIBRARY(shipyard, m) {
  m.def("pack_weight(Tensor weight) -> Tensor");
  m.def("pack_int8(Tensor weight) -> Tensor");
  m.def("gelu_tanh(Tensor x) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  m.def("linear_f32(Tensor x, Tensor weight, Tensor packed, Tensor? bias, int max_rows) -> Tensor");
  m.def(
      "linear_i8(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int in_features, "
      "__torch__.torch.classes.quantized.LinearPackedParamsBase? fallback, int max_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(shipyard, CPU, m) {
  m.impl("pack_weight", pack_weight);
  m.impl("pack_int8", pack_int8);
  m.impl("gelu_tanh", gelu_tanh);
  m.impl("decode_attention", decode_attention);
  m.impl("linear_f32", linear_f32);
  m.impl("linear_i8", torch::CppFunction::makeFromBoxedFunction<&linear_i8_boxed>());
}
