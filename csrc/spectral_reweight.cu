// Re-weighting GEMMs of spectral_reweight on tensor cores (WMMA; see gemm.cuh), with the coefficients
// c = Z_u R_u^T + t (n x K, fp32) given:
//   forward   y (n x D) = (c * lam) @ B          the lambda scaling is the A-operand prologue;
//   backward  gb = dY @ B^T (n x K), epilogue    dlam += colsum(c * gb) (fp32 atomics) and, if asked,
//             dc = gb * lam (fp32).
// B, y and dY are in the compute type T; c, lam, dlam, dc are fp32. All strides are arguments.
#include "gemm.cuh"

namespace residual_fast {
namespace {

struct Mat {  // a strided matrix view
  const void* p;
  int64_t rows, cols, s0, s1;
};

template <typename T> struct Load {  // x[r, c] as float, 0 outside
  Mat m;
  __device__ float operator()(int64_t r, int64_t c) const {
    return (r < m.rows && c < m.cols) ? to_float(((const T*)m.p)[r * m.s0 + c * m.s1]) : 0.f;
  }
};
template <typename T> struct LoadT {  // x[c, r] as float (the transposed operand)
  Mat m;
  __device__ float operator()(int64_t r, int64_t c) const {
    return (c < m.rows && r < m.cols) ? to_float(((const T*)m.p)[c * m.s0 + r * m.s1]) : 0.f;
  }
};
struct LoadScaled {  // c[r, k] * lam[k]: the diagonal prologue, in fp32 before rounding to T
  Mat c;
  const float* lam;
  __device__ float operator()(int64_t r, int64_t k) const {
    return (r < c.rows && k < c.cols) ? ((const float*)c.p)[r * c.s0 + k * c.s1] * lam[k] : 0.f;
  }
};

template <typename T>
__global__ void __launch_bounds__(THREADS) reweight_forward_kernel(Mat c, const float* __restrict__ lam, Mat b,
                                                                   T* __restrict__ y, int64_t s_yn, int64_t s_yd) {
  __shared__ Stage<T> st;
  __shared__ __align__(32) float out[BM][BN + 4];
  const int64_t row0 = (int64_t)blockIdx.y * BM, col0 = (int64_t)blockIdx.x * BN;
  gemm_tile<T>(row0, col0, c.cols, LoadScaled{c, lam}, Load<T>{b}, st, out);
  for (int i = threadIdx.x; i < BM * BN; i += THREADS) {
    const int64_t r = row0 + i / BN, d = col0 + i % BN;
    if (r < c.rows && d < b.cols) y[r * s_yn + d * s_yd] = from_float<T>(out[i / BN][i % BN]);
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) reweight_backward_kernel(Mat g, Mat b, Mat c, const float* __restrict__ lam,
                                                                    float* __restrict__ dlam, float* __restrict__ dc,
                                                                    int64_t s_dcn, int64_t s_dck) {
  __shared__ Stage<T> st;
  __shared__ __align__(32) float out[BM][BN + 4];
  const int64_t row0 = (int64_t)blockIdx.y * BM, k0 = (int64_t)blockIdx.x * BN;
  gemm_tile<T, true>(row0, k0, g.cols, Load<T>{g}, LoadT<T>{b}, st, out);  // B^T: d is contiguous
  const float* cp = (const float*)c.p;
  // dlam: two threads per column, each summing half of the tile's rows, one atomic per thread
  const int col = threadIdx.x % BN, half = threadIdx.x / BN;
  const int64_t k = k0 + col;
  if (k < c.cols) {
    float s = 0.f;
    for (int i = half * (BM / 2); i < (half + 1) * (BM / 2); ++i) {
      const int64_t r = row0 + i;
      if (r < c.rows) s += out[i][col] * cp[r * c.s0 + k * c.s1];
    }
    atomicAdd(dlam + k, s);
  }
  if (dc == nullptr) return;
  for (int i = threadIdx.x; i < BM * BN; i += THREADS) {
    const int64_t r = row0 + i / BN, kk = k0 + i % BN;
    if (r < c.rows && kk < c.cols) dc[r * s_dcn + kk * s_dck] = out[i / BN][i % BN] * lam[kk];
  }
}

template <typename T>
cudaError_t forward(const void* c, int64_t s_cn, int64_t s_ck, const float* lam, const void* B, int64_t s_bk,
                    int64_t s_bd, void* y, int64_t s_yn, int64_t s_yd, int64_t n, int64_t K, int64_t D,
                    cudaStream_t stream) {
  const dim3 grid((unsigned)((D + BN - 1) / BN), (unsigned)((n + BM - 1) / BM));
  reweight_forward_kernel<T><<<grid, THREADS, 0, stream>>>(Mat{c, n, K, s_cn, s_ck}, lam, Mat{B, K, D, s_bk, s_bd},
                                                           (T*)y, s_yn, s_yd);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward(const void* G, int64_t s_gn, int64_t s_gd, const void* B, int64_t s_bk, int64_t s_bd,
                     const void* c, int64_t s_cn, int64_t s_ck, const float* lam, float* dlam, float* dc,
                     int64_t s_dcn, int64_t s_dck, int64_t n, int64_t K, int64_t D, cudaStream_t stream) {
  const dim3 grid((unsigned)((K + BN - 1) / BN), (unsigned)((n + BM - 1) / BM));
  reweight_backward_kernel<T><<<grid, THREADS, 0, stream>>>(Mat{G, n, D, s_gn, s_gd}, Mat{B, K, D, s_bk, s_bd},
                                                            Mat{c, n, K, s_cn, s_ck}, lam, dlam, dc, s_dcn, s_dck);
  return cudaGetLastError();
}

}  // namespace

cudaError_t reweight_forward_launch(int dtype, const void* c, int64_t s_cn, int64_t s_ck, const float* lam,
                                    const void* B, int64_t s_bk, int64_t s_bd, void* y, int64_t s_yn, int64_t s_yd,
                                    int64_t n, int64_t K, int64_t D, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: return forward<float>(c, s_cn, s_ck, lam, B, s_bk, s_bd, y, s_yn, s_yd, n, K, D, stream);
    case kFloat16: return forward<__half>(c, s_cn, s_ck, lam, B, s_bk, s_bd, y, s_yn, s_yd, n, K, D, stream);
    case kBFloat16:
      return forward<__nv_bfloat16>(c, s_cn, s_ck, lam, B, s_bk, s_bd, y, s_yn, s_yd, n, K, D, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t reweight_backward_launch(int dtype, const void* G, int64_t s_gn, int64_t s_gd, const void* B,
                                     int64_t s_bk, int64_t s_bd, const void* c, int64_t s_cn, int64_t s_ck,
                                     const float* lam, float* dlam, float* dc, int64_t s_dcn, int64_t s_dck,
                                     int64_t n, int64_t K, int64_t D, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32:
      return backward<float>(G, s_gn, s_gd, B, s_bk, s_bd, c, s_cn, s_ck, lam, dlam, dc, s_dcn, s_dck, n, K, D,
                             stream);
    case kFloat16:
      return backward<__half>(G, s_gn, s_gd, B, s_bk, s_bd, c, s_cn, s_ck, lam, dlam, dc, s_dcn, s_dck, n, K, D,
                              stream);
    case kBFloat16:
      return backward<__nv_bfloat16>(G, s_gn, s_gd, B, s_bk, s_bd, c, s_cn, s_ck, lam, dlam, dc, s_dcn, s_dck, n,
                                     K, D, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace residual_fast
