// The LSTM recurrence on x86-64 CPUs (AVX2 + FMA) as two XLA FFI custom calls: forward and backward.
//
// Why a custom call: XLA:CPU runs the recurrence as one small dot per step ([B, H] x [H, 4H]) followed by
// separate elementwise ops, and each dot call starts from the plain row-major weight. Here the recurrent
// weight is packed once per call into 16-column panels that the register-blocked microkernel streams,
// the gate nonlinearities are fused behind the matmul, and the work of each step is split by hidden unit
// between threads (OpenMP) with one barrier per step. This is the design of oneDNN's RNN primitive, which
// torch.nn.LSTM uses on CPU. The input projection is fused into each step's matmul ([x_t, h] @ [W_ih;
// W_hh]); [dW_ih; dW_hh] is one blocked GEMM over all steps (WeightGradientImpl); dx and db stay in XLA.
//
// Semantics are those of `lstm_attn.lstm._forward_scan` / `_layer_bwd` (its reference), gate order
// (i, f, g, o), no projection (LSTMP), float32 only:
//   forward, step t in scan order (t runs backwards when `reverse`):
//     h, c = carry; if resets[t, b]: h, c = 0, 0          (c_prev[t] keeps the value before the reset)
//     z = xw[t] + b + h @ W_hh;  i, f, o = sigmoid(z_i, z_f, z_o);  g = tanh(z_g)
//     c' = f * c + i * g;  h' = o * tanh(c');  if not mask[t, b]: h', c' = carry (a padded step)
//   outputs hs[t] = h' (the carry after the step), hT, cT and, for the backward pass, the activated gates
//   and c_prev. (The caller never sets a reset at a padded step: lstm() masks resets with seq_lengths.)
//   backward: the reverse of the above; outputs dz [T, B, 4H] (gradient of the pre-activations, written
//   over the gates), dh0, dc0. The caller forms dW_hh, dW_ih, dx and db from dz with large matmuls.
//
// Shapes: x [T, B, F], w_ih [F, 4H]; gates/dz [T, B, 4H] with 4H columns gate-major (column q * H + u
// is gate q of unit u); w_hh [H, 4H]; h, c [B, H]; mask, resets [T, B] (uint8). H must be a multiple of 16.

#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 16;  // columns per packed weight panel: two AVX2 registers
constexpr int kRows = 6;    // rows per microkernel call: 6 x 16 accumulators = 12 registers

// ---------------------------------------------------------------------------------------------------
// Vector math. exp: Cephes' range reduction and degree-5 polynomial (~1 ulp on [-87, 88]); tanh: the
// rational approximation XLA:CPU and Eigen use (a few ulp); sigmoid(x) = 1 / (1 + exp(-x)).

inline __m256 Exp(__m256 x) {
  // Bound first: min/max return their second operand when either is NaN, so NaN in x passes through.
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

// 1 / x from the 12-bit hardware estimate and one Newton step (~1 ulp); vdivps has 4x the throughput cost.
inline __m256 Reciprocal(__m256 x) {
  const __m256 r = _mm256_rcp_ps(x);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, _mm256_set1_ps(2.0f)));
}

inline __m256 Sigmoid(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return Reciprocal(_mm256_add_ps(one, Exp(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

inline __m256 Tanh(__m256 x) {
  const __m256 bound = _mm256_set1_ps(7.90531110763549805f);
  x = _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), bound), _mm256_min_ps(bound, x));  // NaN passes
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-2.76076847742355e-16f);
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.00018790482477e-13f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-8.60467152213735e-11f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(5.12229709037114e-08f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(1.48572235717979e-05f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(6.37261928875436e-04f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(4.89352455891786e-03f));
  p = _mm256_mul_ps(p, x);
  __m256 q = _mm256_set1_ps(1.19825839466702e-06f);
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(1.18534705686654e-04f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(2.26843463243900e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(4.89352518554385e-03f));
  return _mm256_mul_ps(p, Reciprocal(q));
}

// Rows of a [rows, 8] slice where a uint8 flag is set, as an all-ones lane mask.
inline __m256 Flag(uint8_t flag) { return _mm256_castsi256_ps(_mm256_set1_epi32(flag ? -1 : 0)); }

// ---------------------------------------------------------------------------------------------------
// C[rows, 16] += A[rows, K] @ P[K, 16], A row-major with stride lda, P one packed panel (k-major), C with
// stride ldc. The accumulators stay in registers for the whole K loop.

template <int R>
inline void Microkernel(int k_size, const float* a, int64_t lda, const float* panel, float* c, int64_t ldc) {
  __m256 lo[R], hi[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    lo[r] = _mm256_loadu_ps(c + r * ldc);
    hi[r] = _mm256_loadu_ps(c + r * ldc + 8);
  }
  for (int k = 0; k < k_size; ++k) {
    const __m256 b_lo = _mm256_load_ps(panel + k * kPanel);
    const __m256 b_hi = _mm256_load_ps(panel + k * kPanel + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 a_rk = _mm256_broadcast_ss(a + r * lda + k);
      lo[r] = _mm256_fmadd_ps(a_rk, b_lo, lo[r]);
      hi[r] = _mm256_fmadd_ps(a_rk, b_hi, hi[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(c + r * ldc, lo[r]);
    _mm256_storeu_ps(c + r * ldc + 8, hi[r]);
  }
}

// C[rows, 16] += A[rows, K] @ P for any number of rows, in near-equal blocks of at most kRows: with 32
// rows, 6+6+5+5+5+5 rather than 6 * 5 + 2 (a 2-row block has 4 accumulators, too few to hide the FMA
// latency; 5 rows have 10).
inline void PanelMatmul(int rows, int k_size, const float* a, int64_t lda, const float* panel, float* c,
                        int64_t ldc) {
  const int blocks = (rows + kRows - 1) / kRows;
  for (int block = 0, r = 0; block < blocks; ++block) {
    const int size = rows / blocks + (block < rows % blocks ? 1 : 0);
    const float* a_r = a + r * lda;
    float* c_r = c + r * ldc;
    switch (size) {
      case 6: Microkernel<6>(k_size, a_r, lda, panel, c_r, ldc); break;
      case 5: Microkernel<5>(k_size, a_r, lda, panel, c_r, ldc); break;
      case 4: Microkernel<4>(k_size, a_r, lda, panel, c_r, ldc); break;
      case 3: Microkernel<3>(k_size, a_r, lda, panel, c_r, ldc); break;
      case 2: Microkernel<2>(k_size, a_r, lda, panel, c_r, ldc); break;
      case 1: Microkernel<1>(k_size, a_r, lda, panel, c_r, ldc); break;
      default: break;
    }
    r += size;
  }
}

// 32-byte aligned scratch, kept per calling thread across calls: a fresh multi-MB allocation per call
// would be page-faulted in every time (see lstm.py's docstring).
float* Scratch(int slot, size_t floats) {
  struct Buffer {
    float* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffers[3];
  Buffer& buffer = buffers[slot];
  if (buffer.size < floats) {
    std::free(buffer.data);
    buffer.size = (floats + 7) / 8 * 8;
    buffer.data = static_cast<float*>(std::aligned_alloc(32, buffer.size * sizeof(float)));
  }
  return buffer.data;
}

// Asks for transparent huge pages on the 2 MiB-aligned interior of a buffer this call is about to fill.
// XLA hands a fresh (never touched) output buffer to every call; filling it from several threads costs
// one contended page fault per 4 KiB, 10k of them for the forward's residuals at B=32 T=128 H=512, where
// huge pages take one per 2 MiB. Only advice: where THP is off it does nothing.
void AdviseHugePages(void* data, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

int NumThreads(int64_t hidden) {
  int threads = omp_get_max_threads();
  if (const char* env = std::getenv("LSTM_ATTN_CPU_THREADS")) threads = std::max(1, std::atoi(env));
  // Each thread owns whole 16-unit panels; keep at least two panels per thread.
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, hidden / (2 * kPanel))));
}

// The units [begin, end) (multiples of 16) that thread `index` of `threads` owns.
void OwnedUnits(int64_t hidden, int threads, int index, int64_t* begin, int64_t* end) {
  const int64_t panels = hidden / kPanel;
  *begin = panels * index / threads * kPanel;
  *end = panels * (index + 1) / threads * kPanel;
}

// ---------------------------------------------------------------------------------------------------
// Forward.

ffi::Error LstmForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_ih, ffi::Buffer<ffi::F32> bias,
                           ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                           ffi::Buffer<ffi::U8> mask, ffi::Buffer<ffi::U8> resets, bool reverse,
                           ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> h_final,
                           ffi::ResultBuffer<ffi::F32> c_final, ffi::ResultBuffer<ffi::F32> gates,
                           ffi::ResultBuffer<ffi::F32> c_prev) {
  const auto x_dims = x.dimensions(), w_dims = w_hh.dimensions();
  if (x_dims.size() != 3 || w_dims.size() != 2 || w_dims[1] != 4 * w_dims[0] || w_dims[0] % kPanel != 0)
    return ffi::Error::InvalidArgument("lstm_cpu forward: x must be [T, B, F] and w_hh [H, 4H], H % 16 == 0");
  const int64_t steps = x_dims[0], batch = x_dims[1], features = x_dims[2];
  const int64_t hidden = w_dims[0], gates4 = 4 * hidden, depth = features + hidden;
  const bool keep = gates->element_count() == static_cast<size_t>(steps * batch * gates4);
  const float* x_seq = x.typed_data();
  const float* w_in = w_ih.typed_data();
  const float* b = bias.typed_data();
  const float* w = w_hh.typed_data();
  const uint8_t* valid = mask.typed_data();
  const uint8_t* reset = resets.typed_data();
  float* out_h = hs->typed_data();
  float* out_gates = keep ? gates->typed_data() : nullptr;
  float* out_c_prev = keep ? c_prev->typed_data() : nullptr;

  // Packed [W_ih; W_hh] ([F + H, 4H]): the input projection is fused into each step's matmul, so
  // z = [x_t, h] @ [W_ih; W_hh] with K = F + H. For each block of 8 units u..u+7, panel 2j holds columns
  // (i, f) of those units and panel 2j+1 columns (g, o): [H / 8 * 2 panels][F + H rows][16].
  float* packed = Scratch(0, static_cast<size_t>(depth * gates4));
  AdviseHugePages(out_h, sizeof(float) * steps * batch * hidden);
  if (keep) {
    AdviseHugePages(out_gates, sizeof(float) * steps * batch * gates4);
    AdviseHugePages(out_c_prev, sizeof(float) * steps * batch * hidden);
  }
  const int threads = NumThreads(hidden);
  float* cell = Scratch(1, static_cast<size_t>(batch * hidden));  // [B, H]: the carried c
  std::memcpy(cell, c0.typed_data(), sizeof(float) * batch * hidden);

#pragma omp parallel num_threads(threads)
  {
    // Split by the team OpenMP actually started (OMP_THREAD_LIMIT or OMP_DYNAMIC may give fewer).
    const int me = omp_get_thread_num(), team = omp_get_num_threads();
    int64_t u_begin, u_end;
    OwnedUnits(hidden, team, me, &u_begin, &u_end);
    for (int64_t u = u_begin; u < u_end; u += 8) {
      float* dst = packed + (u / 8) * 2 * depth * kPanel;
      for (int64_t k = 0; k < depth; ++k) {
        const float* row = k < features ? w_in + k * gates4 : w + (k - features) * gates4;
        for (int q = 0; q < 4; ++q)
          std::memcpy(dst + (q / 2) * depth * kPanel + k * kPanel + (q % 2) * 8, row + q * hidden + u,
                      8 * sizeof(float));
      }
    }
  // Per-thread tiles: the pre-activations of one 8-unit block [B, 32] and, at a step with resets, a
    // copy of the carried h with those rows zeroed [B, H].
    std::vector<float> tile(batch * 32), h_reset(batch * hidden);
#pragma omp barrier
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = reverse ? steps - 1 - s : s;
      const int64_t t_before = reverse ? t + 1 : t - 1;
      const float* h_carry = s == 0 ? h0.typed_data() : out_h + t_before * batch * hidden;
      const uint8_t* valid_t = valid + t * batch;
      const uint8_t* reset_t = reset + t * batch;
      const float* h_read = h_carry;  // [B, H]: what the recurrent matmul reads
      bool any_reset = false;
      for (int64_t r = 0; r < batch; ++r) any_reset |= reset_t[r] != 0;
      if (any_reset) {
        for (int64_t r = 0; r < batch; ++r) {
          if (reset_t[r]) std::memset(h_reset.data() + r * hidden, 0, sizeof(float) * hidden);
          else std::memcpy(h_reset.data() + r * hidden, h_carry + r * hidden, sizeof(float) * hidden);
        }
        h_read = h_reset.data();
      }
      const float* x_t = x_seq + t * batch * features;  // [B, F]
      float* h_out = out_h + t * batch * hidden;
      for (int64_t u = u_begin; u < u_end; u += 8) {
        for (int64_t r = 0; r < batch; ++r)
          for (int q = 0; q < 4; ++q) _mm256_storeu_ps(tile.data() + r * 32 + q * 8, _mm256_loadu_ps(b + q * hidden + u));
        for (int half = 0; half < 2; ++half) {  // panels (i, f) and (g, o) of these 8 units
          const float* panel = packed + ((u / 8) * 2 + half) * depth * kPanel;
          float* tile_half = tile.data() + 16 * half;
          PanelMatmul(static_cast<int>(batch), static_cast<int>(features), x_t, features, panel, tile_half, 32);
          PanelMatmul(static_cast<int>(batch), static_cast<int>(hidden), h_read, hidden, panel + features * kPanel,
                      tile_half, 32);
        }
        for (int64_t r = 0; r < batch; ++r) {
          const float* z = tile.data() + r * 32;
          const __m256 i = Sigmoid(_mm256_loadu_ps(z)), f = Sigmoid(_mm256_loadu_ps(z + 8));
          const __m256 g = Tanh(_mm256_loadu_ps(z + 16)), o = Sigmoid(_mm256_loadu_ps(z + 24));
          float* c_ru = cell + r * hidden + u;
          const __m256 c_before = _mm256_loadu_ps(c_ru);
          const __m256 c_read = _mm256_andnot_ps(Flag(reset_t[r]), c_before);
          const __m256 c_new = _mm256_fmadd_ps(f, c_read, _mm256_mul_ps(i, g));
          const __m256 h_new = _mm256_mul_ps(o, Tanh(c_new));
          const __m256 keep_row = Flag(valid_t[r]);
          _mm256_storeu_ps(h_out + r * hidden + u,
                           _mm256_blendv_ps(_mm256_loadu_ps(h_carry + r * hidden + u), h_new, keep_row));
          _mm256_storeu_ps(c_ru, _mm256_blendv_ps(c_before, c_new, keep_row));
          if (keep) {
            float* gate_ru = out_gates + (t * batch + r) * gates4 + u;
            _mm256_storeu_ps(gate_ru, i);
            _mm256_storeu_ps(gate_ru + hidden, f);
            _mm256_storeu_ps(gate_ru + 2 * hidden, g);
            _mm256_storeu_ps(gate_ru + 3 * hidden, o);
            _mm256_storeu_ps(out_c_prev + (t * batch + r) * hidden + u, c_before);
          }
        }
      }
#pragma omp barrier
    }
  }
  const int64_t t_last = reverse ? 0 : steps - 1;
  const float* h_last = steps == 0 ? h0.typed_data() : out_h + t_last * batch * hidden;
  std::memcpy(h_final->typed_data(), h_last, sizeof(float) * batch * hidden);
  std::memcpy(c_final->typed_data(), cell, sizeof(float) * batch * hidden);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------
// Backward.

ffi::Error LstmBackwardImpl(ffi::Buffer<ffi::F32> d_hs, ffi::Buffer<ffi::F32> gates,
                            ffi::Buffer<ffi::F32> c_prev, ffi::Buffer<ffi::F32> c_last,
                            ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> d_h_last,
                            ffi::Buffer<ffi::F32> d_c_last, ffi::Buffer<ffi::U8> mask,
                            ffi::Buffer<ffi::U8> resets, bool reverse, ffi::ResultBuffer<ffi::F32> dz,
                            ffi::ResultBuffer<ffi::F32> d_h0, ffi::ResultBuffer<ffi::F32> d_c0) {
  const auto dims = gates.dimensions();
  if (dims.size() != 3 || dims[2] % 4 != 0 || (dims[2] / 4) % kPanel != 0)
    return ffi::Error::InvalidArgument("lstm_cpu backward: gates must be [T, B, 4H] with H a multiple of 16");
  const int64_t steps = dims[0], batch = dims[1], gates4 = dims[2], hidden = gates4 / 4;
  const float* d_out = d_hs.typed_data();
  const float* act = gates.typed_data();
  const float* c_in = c_prev.typed_data();
  const float* w = w_hh.typed_data();
  const uint8_t* valid = mask.typed_data();
  const uint8_t* reset = resets.typed_data();
  float* out_dz = dz->typed_data();

  // Packed W_hh^T: panel p holds units 16p..16p+15 as columns, 4H rows: [H / 16][4H][16].
  float* packed = Scratch(0, static_cast<size_t>(hidden * gates4));
  float* dh = Scratch(1, static_cast<size_t>(batch * hidden));  // [B, H]: carried dL/dh
  float* dc = Scratch(2, static_cast<size_t>(batch * hidden));  // [B, H]: carried dL/dc
  std::memcpy(dh, d_h_last.typed_data(), sizeof(float) * batch * hidden);
  std::memcpy(dc, d_c_last.typed_data(), sizeof(float) * batch * hidden);
  const int threads = NumThreads(hidden);

#pragma omp parallel num_threads(threads)
  {
    // Split by the team OpenMP actually started (OMP_THREAD_LIMIT or OMP_DYNAMIC may give fewer).
    const int me = omp_get_thread_num(), team = omp_get_num_threads();
    int64_t u_begin, u_end;
    OwnedUnits(hidden, team, me, &u_begin, &u_end);
    for (int64_t u = u_begin; u < u_end; u += kPanel) {
      float* dst = packed + (u / kPanel) * gates4 * kPanel;
      for (int64_t k = 0; k < gates4; ++k)
        for (int j = 0; j < kPanel; ++j) dst[k * kPanel + j] = w[(u + j) * gates4 + k];
    }
#pragma omp barrier
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = reverse ? s : steps - 1 - s;  // forward time of this step, visited backwards
      const int64_t t_after = reverse ? t - 1 : t + 1;
      const float* c_after = s == 0 ? c_last.typed_data() : c_in + t_after * batch * hidden;  // c_t
      const uint8_t* valid_t = valid + t * batch;
      const uint8_t* reset_t = reset + t * batch;
      float* dz_t = out_dz + t * batch * gates4;
      for (int64_t r = 0; r < batch; ++r) {
        const __m256 keep_row = Flag(valid_t[r]), reset_row = Flag(reset_t[r]);
        for (int64_t u = u_begin; u < u_end; u += 8) {
          const float* g_ru = act + (t * batch + r) * gates4 + u;
          const __m256 i = _mm256_loadu_ps(g_ru), f = _mm256_loadu_ps(g_ru + hidden);
          const __m256 g = _mm256_loadu_ps(g_ru + 2 * hidden), o = _mm256_loadu_ps(g_ru + 3 * hidden);
          float* dh_ru = dh + r * hidden + u;
          float* dc_ru = dc + r * hidden + u;
          const __m256 dh_all = _mm256_add_ps(_mm256_loadu_ps(dh_ru), _mm256_loadu_ps(d_out + (t * batch + r) * hidden + u));
          const __m256 dc_all = _mm256_loadu_ps(dc_ru);
          const __m256 dh_in = _mm256_and_ps(keep_row, dh_all), dc_carry = _mm256_and_ps(keep_row, dc_all);
          const __m256 one = _mm256_set1_ps(1.0f);
          const __m256 tanh_c = Tanh(_mm256_loadu_ps(c_after + r * hidden + u));
          const __m256 dc_in = _mm256_fmadd_ps(_mm256_mul_ps(dh_in, o), _mm256_fnmadd_ps(tanh_c, tanh_c, one), dc_carry);
          const __m256 c_read = _mm256_andnot_ps(reset_row, _mm256_loadu_ps(c_in + (t * batch + r) * hidden + u));
          const __m256 dz_i = _mm256_mul_ps(_mm256_mul_ps(dc_in, g), _mm256_mul_ps(i, _mm256_sub_ps(one, i)));
          const __m256 dz_f = _mm256_mul_ps(_mm256_mul_ps(dc_in, c_read), _mm256_mul_ps(f, _mm256_sub_ps(one, f)));
          const __m256 dz_g = _mm256_mul_ps(_mm256_mul_ps(dc_in, i), _mm256_fnmadd_ps(g, g, one));
          const __m256 dz_o = _mm256_mul_ps(_mm256_mul_ps(dh_in, tanh_c), _mm256_mul_ps(o, _mm256_sub_ps(one, o)));
          // Exactly 0 at a padded step, whatever its gates hold (0 * NaN is NaN).
          float* dz_ru = dz_t + r * gates4 + u;
          _mm256_storeu_ps(dz_ru, _mm256_and_ps(keep_row, dz_i));
          _mm256_storeu_ps(dz_ru + hidden, _mm256_and_ps(keep_row, dz_f));
          _mm256_storeu_ps(dz_ru + 2 * hidden, _mm256_and_ps(keep_row, dz_g));
          _mm256_storeu_ps(dz_ru + 3 * hidden, _mm256_and_ps(keep_row, dz_o));
          // What flows to the step before, less the matmul: a padded step passes dh and dc through.
          const __m256 dc_before = _mm256_blendv_ps(dc_all, _mm256_mul_ps(dc_in, f), keep_row);
          _mm256_storeu_ps(dc_ru, _mm256_andnot_ps(reset_row, dc_before));
          _mm256_storeu_ps(dh_ru, _mm256_andnot_ps(keep_row, dh_all));
        }
      }
#pragma omp barrier
      // dh[:, own units] += dz_t @ W_hh^T[:, own units]; rows whose state was reset get nothing back.
      for (int64_t u = u_begin; u < u_end; u += kPanel)
        PanelMatmul(static_cast<int>(batch), static_cast<int>(gates4), dz_t, gates4,
                    packed + (u / kPanel) * gates4 * kPanel, dh + u, hidden);
      for (int64_t r = 0; r < batch; ++r)
        if (reset_t[r]) std::memset(dh + r * hidden + u_begin, 0, sizeof(float) * (u_end - u_begin));
    }
  }
  std::memcpy(d_h0->typed_data(), dh, sizeof(float) * batch * hidden);
  std::memcpy(d_c0->typed_data(), dc, sizeof(float) * batch * hidden);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------------
// The backward pass's large matmuls (dW = [x, h_prev]^T dz over all T * B rows, dx = dz W_ih^T), blocked
// as in GotoBLAS/BLIS: a [kKc, 16] panel of B stays in L1 across a [kMc, kKc] block of A packed in L2.
// XLA:CPU's dot ran these shapes at 75-95 GFLOP/s where this reaches more (BUILD_NOTES.md).

constexpr int kKc = 256;  // depth of a packed block
constexpr int kMc = 72;   // rows of a packed block of A (a multiple of kRows)

// C[6, 16] += Ap[K, 6] @ P[K, 16] with A packed k-major (6 floats per k).
inline void PackedMicrokernel(int k_size, const float* ap, const float* panel, float* c, int64_t ldc) {
  __m256 lo[kRows], hi[kRows];
#pragma GCC unroll 6
  for (int r = 0; r < kRows; ++r) {
    lo[r] = _mm256_loadu_ps(c + r * ldc);
    hi[r] = _mm256_loadu_ps(c + r * ldc + 8);
  }
  for (int k = 0; k < k_size; ++k) {
    const __m256 b_lo = _mm256_load_ps(panel + k * kPanel);
    const __m256 b_hi = _mm256_load_ps(panel + k * kPanel + 8);
#pragma GCC unroll 6
    for (int r = 0; r < kRows; ++r) {
      const __m256 a_rk = _mm256_broadcast_ss(ap + k * kRows + r);
      lo[r] = _mm256_fmadd_ps(a_rk, b_lo, lo[r]);
      hi[r] = _mm256_fmadd_ps(a_rk, b_hi, hi[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < kRows; ++r) {
    _mm256_storeu_ps(c + r * ldc, lo[r]);
    _mm256_storeu_ps(c + r * ldc + 8, hi[r]);
  }
}

// c[M, N] = A[M, K] @ B[K, N] (c overwritten; N a multiple of 16). The operands are read through their
// packing functions: pack_a(dst, i0, k0, kc) writes A[i0 : i0 + 6, k0 : k0 + kc] k-major ([kc][6], rows
// past M as zeros) and pack_b(dst, j0, k0, kc) writes B[k0 : k0 + kc, j0 : j0 + 16] ([kc][16]). Threads
// split the larger of M and N, so the operand they share is the smaller one (each thread packs it).
template <class PackA, class PackB>
void BlockedMatmul(int64_t m, int64_t n, int64_t k_total, PackA pack_a, PackB pack_b, float* c) {
  std::memset(c, 0, sizeof(float) * m * n);
  const int64_t panels = n / kPanel, row_blocks = (m + kRows - 1) / kRows;
  const bool split_rows = m >= n;
  const int threads = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(NumThreads(1 << 20), split_rows ? row_blocks : panels)));

#pragma omp parallel num_threads(threads)
  {
    // Split by the team OpenMP actually started (OMP_THREAD_LIMIT or OMP_DYNAMIC may give fewer).
    const int me = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t share = split_rows ? row_blocks : panels;
    const int64_t begin = share * me / team, end = share * (me + 1) / team;
    const int64_t rb_begin = split_rows ? begin : 0, rb_end = split_rows ? end : row_blocks;
    const int64_t p_begin = split_rows ? 0 : begin, p_end = split_rows ? panels : end;
    std::vector<float> b_pack_store((p_end - p_begin) * kKc * kPanel + 8);
    std::vector<float> a_pack((kMc / kRows) * kKc * kRows), tile(kRows * kPanel);
    float* b_pack = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(b_pack_store.data()) + 31) & ~uintptr_t{31});
    for (int64_t k0 = 0; k0 < k_total; k0 += kKc) {
      const int kc = static_cast<int>(std::min<int64_t>(kKc, k_total - k0));
      for (int64_t p = p_begin; p < p_end; ++p)  // pack B[k0 : k0 + kc, this thread's panels]
        pack_b(b_pack + (p - p_begin) * kKc * kPanel, p * kPanel, k0, kc);
      for (int64_t rb0 = rb_begin; rb0 < rb_end; rb0 += kMc / kRows) {
        const int64_t rb1 = std::min<int64_t>(rb_end, rb0 + kMc / kRows);
        for (int64_t rb = rb0; rb < rb1; ++rb)  // pack A[rows of rb, k0 : k0 + kc]
          pack_a(a_pack.data() + (rb - rb0) * kKc * kRows, rb * kRows, k0, kc);
        for (int64_t p = p_begin; p < p_end; ++p) {
          const float* panel = b_pack + (p - p_begin) * kKc * kPanel;
          for (int64_t rb = rb0; rb < rb1; ++rb) {
            const float* ap = a_pack.data() + (rb - rb0) * kKc * kRows;
            const int64_t rows = std::min<int64_t>(kRows, m - rb * kRows);
            float* c_tile = c + rb * kRows * n + p * kPanel;
            if (rows == kRows) {
              PackedMicrokernel(kc, ap, panel, c_tile, n);
            } else {  // the last rows: through a full-height tile
              for (int r = 0; r < kRows; ++r)
                for (int j = 0; j < kPanel; ++j) tile[r * kPanel + j] = r < rows ? c_tile[r * n + j] : 0.0f;
              PackedMicrokernel(kc, ap, panel, tile.data(), kPanel);
              for (int r = 0; r < rows; ++r)
                std::memcpy(c_tile + r * n, tile.data() + r * kPanel, sizeof(float) * kPanel);
            }
          }
        }
      }
    }
  }
}

// out[M, N] = op(A) @ op(B): op(A)(i, k) = a[i * K + k], or a[k * M + i] if transpose_a; op(B)(k, n) =
// b[k * N + n], or b[n * K + k] if transpose_b.
ffi::Error MatmulImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, bool transpose_a, bool transpose_b,
                      ffi::ResultBuffer<ffi::F32> out) {
  const auto a_dims = a.dimensions(), b_dims = b.dimensions();
  if (a_dims.size() != 2 || b_dims.size() != 2)
    return ffi::Error::InvalidArgument("lstm_cpu matmul: a and b must be matrices");
  const int64_t m = transpose_a ? a_dims[1] : a_dims[0], k_total = transpose_a ? a_dims[0] : a_dims[1];
  const int64_t n = transpose_b ? b_dims[0] : b_dims[1];
  if ((transpose_b ? b_dims[1] : b_dims[0]) != k_total || n % kPanel != 0)
    return ffi::Error::InvalidArgument("lstm_cpu matmul: inner dimensions differ or N % 16 != 0");
  const float* a_data = a.typed_data();
  const float* b_data = b.typed_data();
  auto pack_a = [=](float* dst, int64_t i0, int64_t k0, int kc) {
    for (int k = 0; k < kc; ++k)
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = i0 + r;
        dst[k * kRows + r] = i >= m ? 0.0f : transpose_a ? a_data[(k0 + k) * m + i] : a_data[i * k_total + k0 + k];
      }
  };
  auto pack_b = [=](float* dst, int64_t j0, int64_t k0, int kc) {
    for (int k = 0; k < kc; ++k)
      for (int j = 0; j < kPanel; ++j)
        dst[k * kPanel + j] = transpose_b ? b_data[(j0 + j) * k_total + k0 + k] : b_data[(k0 + k) * n + j0 + j];
  };
  BlockedMatmul(m, n, k_total, pack_a, pack_b, out->typed_data());
  return ffi::Error::Success();
}

// [dW_ih; dW_hh] [F + H, 4H] = [x, h_prev]^T @ dz over all T * B rows, where h_prev is the h each step's
// recurrent matmul read: the carry before the step (h0 at the first step in scan order), zero where the
// state was reset. Read in place from x [T, B, F], hs [T, B, H] and h0 [B, H]: no concatenated or shifted
// copy is made.
ffi::Error WeightGradientImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> hs, ffi::Buffer<ffi::F32> h0,
                              ffi::Buffer<ffi::U8> resets, ffi::Buffer<ffi::F32> dz, bool reverse,
                              ffi::ResultBuffer<ffi::F32> d_w) {
  const auto x_dims = x.dimensions(), h_dims = hs.dimensions(), z_dims = dz.dimensions();
  if (x_dims.size() != 3 || h_dims.size() != 3 || z_dims.size() != 3 || z_dims[2] % kPanel != 0)
    return ffi::Error::InvalidArgument("lstm_cpu weight gradient: x, hs, dz must be [T, B, *], 4H % 16 == 0");
  const int64_t steps = x_dims[0], batch = x_dims[1], features = x_dims[2], hidden = h_dims[2];
  const int64_t gates4 = z_dims[2];
  const float* x_data = x.typed_data();
  const float* h_data = hs.typed_data();
  const float* h_first = h0.typed_data();
  const uint8_t* reset = resets.typed_data();
  const float* dz_data = dz.typed_data();
  const int64_t depth = features + hidden;
  auto pack_a = [=](float* dst, int64_t i0, int64_t k0, int kc) {  // rows i0.. of [x, h_prev]^T
    for (int k = 0; k < kc; ++k) {
      const int64_t row_k = k0 + k, t = row_k / batch, row = row_k % batch;  // row_k = t * B + b
      const int64_t t_before = reverse ? t + 1 : t - 1;
      const float* x_row = x_data + row_k * features;
      const float* h_row = reset[row_k] ? nullptr
                           : (t_before < 0 || t_before >= steps) ? h_first + row * hidden
                                                                  : h_data + (t_before * batch + row) * hidden;
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = i0 + r;
        dst[k * kRows + r] = i < features ? x_row[i] : (i >= depth || h_row == nullptr) ? 0.0f : h_row[i - features];
      }
    }
  };
  auto pack_b = [=](float* dst, int64_t j0, int64_t k0, int kc) {
    for (int k = 0; k < kc; ++k) std::memcpy(dst + k * kPanel, dz_data + (k0 + k) * gates4 + j0, sizeof(float) * kPanel);
  };
  AdviseHugePages(d_w->typed_data(), sizeof(float) * depth * gates4);
  BlockedMatmul(depth, gates4, steps * batch, pack_a, pack_b, d_w->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmAttnLstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, B, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih [F, 4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b [4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh [H, 4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0 [B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c0 [B, H]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // mask [T, B]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // resets [T, B]
                                  .Attr<bool>("reverse")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // hs [T, B, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // hT [B, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // cT [B, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gates [T, B, 4H] (or [0])
                                  .Ret<ffi::Buffer<ffi::F32>>());  // c_prev [T, B, H] (or [0])

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmAttnLstmBackward, LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_hs [T, B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gates [T, B, 4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // c_prev [T, B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cT [B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh [H, 4H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_hT [B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_cT [B, H]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // mask [T, B]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // resets [T, B]
                                  .Attr<bool>("reverse")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dz [T, B, 4H]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d_h0 [B, H]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d_c0 [B, H]

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmAttnMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a [M, K] or [K, M]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b [K, N] or [N, K]
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmAttnWeightGradient, WeightGradientImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [T, B, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hs [T, B, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h0 [B, H]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // resets [T, B]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dz [T, B, 4H]
                                  .Attr<bool>("reverse")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // [dW_ih; dW_hh] [F + H, 4H]
