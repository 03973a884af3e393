#include "dense_kernels.h"

#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <cstring>

#include "fedslice/common/threading.h"
#include "simd.h"

namespace fedslice::internal {
namespace {

// Below this many multiply-adds a kernel runs on the calling thread. Splitting a layer's
// outputs across cores costs a fork/join and moves its weights between the cores' caches;
// measured on the MLP at batch 10 (1.5M multiply-adds in its largest layer), one thread
// is faster.
constexpr int64_t kParallelWork = int64_t{1} << 21;

int ThreadsFor(int64_t work) {
  return work >= kParallelWork && !omp_in_parallel() ? NumThreads() : 1;
}

// [begin, end) of `n` items for thread t of `threads`, in blocks of `block`.
void Split(int64_t n, int64_t block, int t, int threads, int64_t* begin, int64_t* end) {
  const int64_t blocks = (n + block - 1) / block;
  *begin = std::min(n, blocks * t / threads * block);
  *end = std::min(n, blocks * (t + 1) / threads * block);
}

// --- forward: RB rows x OB outputs of dot products over `in`.
template <int RB, int OB>
void DotBlock(const float* x, int64_t in, const float* w, const float* bias, int64_t out,
              float* y) {
  Packet acc[RB][OB];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < OB; ++c) acc[r][c] = pset1<Packet>(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= in; i += kLanes) {
    Packet wv[OB];
    for (int c = 0; c < OB; ++c) wv[c] = ploadu<Packet>(w + c * in + i);
    for (int r = 0; r < RB; ++r) {
      const Packet xv = ploadu<Packet>(x + r * in + i);
      for (int c = 0; c < OB; ++c) acc[r][c] = pmadd(xv, wv[c], acc[r][c]);
    }
  }
  if (i < in) {
    // The last in % kLanes elements, as zero-padded packets.
    const size_t tail = static_cast<size_t>(in - i);
    Packet wv[OB];
    for (int c = 0; c < OB; ++c) wv[c] = PartialLoad(w + c * in + i, tail);
    for (int r = 0; r < RB; ++r) {
      const Packet xv = PartialLoad(x + r * in + i, tail);
      for (int c = 0; c < OB; ++c) acc[r][c] = pmadd(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int c = 0; c < OB; ++c) y[r * out + c] = predux(acc[r][c]) + bias[c];
  }
}

template <int OB>
void DotRows(const float* x, int64_t rows, int64_t in, const float* w, const float* bias,
             int64_t out, float* y) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) DotBlock<4, OB>(x + r * in, in, w, bias, out, y + r * out);
  switch (rows - r) {
    case 3: DotBlock<3, OB>(x + r * in, in, w, bias, out, y + r * out); break;
    case 2: DotBlock<2, OB>(x + r * in, in, w, bias, out, y + r * out); break;
    case 1: DotBlock<1, OB>(x + r * in, in, w, bias, out, y + r * out); break;
    default: break;
  }
}

// --- axpy form: acc[r][p] += a(r, k) * b_k[p-th packet], over k in [0, depth).
// out_row(r) = sum_k coef[r * coef_rs + k * coef_ks] * src[k * src_ld + p * kLanes].
template <int RB, int NP>
void AxpyBlock(const float* coef, int64_t coef_rs, int64_t coef_ks, const float* src,
               int64_t src_ld, int64_t depth, float* dst, int64_t dst_ld) {
  Packet acc[RB][NP];
  for (int r = 0; r < RB; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p] = pset1<Packet>(0.0f);
  for (int64_t k = 0; k < depth; ++k) {
    Packet sv[NP];
    for (int p = 0; p < NP; ++p) sv[p] = ploadu<Packet>(src + k * src_ld + p * kLanes);
    for (int r = 0; r < RB; ++r) {
      const Packet a = pset1<Packet>(coef[r * coef_rs + k * coef_ks]);
      for (int p = 0; p < NP; ++p) acc[r][p] = pmadd(a, sv[p], acc[r][p]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int p = 0; p < NP; ++p) pstoreu(dst + r * dst_ld + p * kLanes, acc[r][p]);
}

// AxpyBlock<RB, 1> for the last cols < kLanes columns.
template <int RB>
void AxpyBlockPartial(const float* coef, int64_t coef_rs, int64_t coef_ks, const float* src,
                      int64_t src_ld, int64_t depth, size_t cols, float* dst, int64_t dst_ld) {
  Packet acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = pset1<Packet>(0.0f);
  for (int64_t k = 0; k < depth; ++k) {
    const Packet sv = PartialLoad(src + k * src_ld, cols);
    for (int r = 0; r < RB; ++r) acc[r] = pmadd(pset1<Packet>(coef[r * coef_rs + k * coef_ks]), sv, acc[r]);
  }
  for (int r = 0; r < RB; ++r) PartialStore(dst + r * dst_ld, acc[r], cols);
}

void AxpyTail(const float* coef, int64_t coef_rs, int64_t coef_ks, int64_t rows,
              const float* src, int64_t src_ld, int64_t depth, int64_t cols, float* dst,
              int64_t dst_ld) {
  const auto n = static_cast<size_t>(cols);
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    AxpyBlockPartial<4>(coef + r * coef_rs, coef_rs, coef_ks, src, src_ld, depth, n,
                        dst + r * dst_ld, dst_ld);
  }
  for (; r < rows; ++r) {
    AxpyBlockPartial<1>(coef + r * coef_rs, coef_rs, coef_ks, src, src_ld, depth, n,
                        dst + r * dst_ld, dst_ld);
  }
}

template <int NP>
void AxpyRows(const float* coef, int64_t coef_rs, int64_t coef_ks, int64_t rows,
              const float* src, int64_t src_ld, int64_t depth, float* dst, int64_t dst_ld) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    AxpyBlock<4, NP>(coef + r * coef_rs, coef_rs, coef_ks, src, src_ld, depth, dst + r * dst_ld,
                     dst_ld);
  }
  const float* c = coef + r * coef_rs;
  float* d = dst + r * dst_ld;
  switch (rows - r) {
    case 3: AxpyBlock<3, NP>(c, coef_rs, coef_ks, src, src_ld, depth, d, dst_ld); break;
    case 2: AxpyBlock<2, NP>(c, coef_rs, coef_ks, src, src_ld, depth, d, dst_ld); break;
    case 1: AxpyBlock<1, NP>(c, coef_rs, coef_ks, src, src_ld, depth, d, dst_ld); break;
    default: break;
  }
}

// dst[r, cols c0..c1) = sum_k coef(r, k) * src[k, c] for all `rows`, in 4-packet strips.
void AxpyColumns(const float* coef, int64_t coef_rs, int64_t coef_ks, int64_t rows,
                 const float* src, int64_t src_ld, int64_t depth, int64_t c0, int64_t c1,
                 float* dst, int64_t dst_ld) {
  int64_t c = c0;
  for (; c + 4 * kLanes <= c1; c += 4 * kLanes) {
    AxpyRows<4>(coef, coef_rs, coef_ks, rows, src + c, src_ld, depth, dst + c, dst_ld);
  }
  for (; c + kLanes <= c1; c += kLanes) {
    AxpyRows<1>(coef, coef_rs, coef_ks, rows, src + c, src_ld, depth, dst + c, dst_ld);
  }
  if (c < c1) AxpyTail(coef, coef_rs, coef_ks, rows, src + c, src_ld, depth, c1 - c, dst + c, dst_ld);
}

}  // namespace

void DenseForward(const float* x, int64_t rows, int64_t in, const float* w, const float* bias,
                  int64_t out, float* y) {
  const int threads = ThreadsFor(rows * in * out);
#pragma omp parallel num_threads(threads)
  {
    int64_t o0, o1;
    Split(out, 4, omp_get_thread_num(), omp_get_num_threads(), &o0, &o1);
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4) DotRows<4>(x, rows, in, w + o * in, bias + o, out, y + o);
    for (; o < o1; ++o) DotRows<1>(x, rows, in, w + o * in, bias + o, out, y + o);
  }
}

void DenseWeightGrad(const float* g, const float* x, int64_t rows, int64_t in, int64_t out,
                     float* dw, float* db) {
  const int threads = ThreadsFor(rows * in * out);
  // dw row o = sum_r g[r, o] * x row r: "rows" of the axpy are the outputs o, the depth is r.
#pragma omp parallel num_threads(threads)
  {
    int64_t o0, o1;
    Split(out, 4, omp_get_thread_num(), omp_get_num_threads(), &o0, &o1);
    if (o1 > o0) {
      AxpyColumns(g + o0, /*coef_rs=*/1, /*coef_ks=*/out, o1 - o0, x, in, rows, 0, in,
                  dw + o0 * in, in);
      for (int64_t o = o0; o < o1; ++o) {
        float s = 0.0f;
        for (int64_t r = 0; r < rows; ++r) s += g[r * out + o];
        db[o] = s;
      }
    }
  }
}

void DenseInputGrad(const float* g, const float* w, int64_t rows, int64_t in, int64_t out,
                    float* dx) {
  const int threads = ThreadsFor(rows * in * out);
  // dx row r = sum_o g[r, o] * w row o; threads split the columns i.
#pragma omp parallel num_threads(threads)
  {
    int64_t c0, c1;
    Split(in, 4 * kLanes, omp_get_thread_num(), omp_get_num_threads(), &c0, &c1);
    if (c1 > c0) AxpyColumns(g, /*coef_rs=*/out, /*coef_ks=*/1, rows, w, in, out, c0, c1, dx, in);
  }
}

}  // namespace fedslice::internal
