// Fused inference readout: acc (n, D) += r (n, w) . M (w, D), optionally followed by the
// final LayerNorm epilogue  y = (acc + v1) / s + (mu / s) v2 + c [+ out].
// r is a strided view (the pooled row of each image), M, acc, v1, v2, c, s, mu are fp32.
#include "common.cuh"

namespace residual_fast {
namespace {

constexpr int TN = 16;   // rows per block
constexpr int TD = 128;  // columns per block = threads per block
constexpr int TW = 32;   // reduction chunk

template <typename T>
__global__ void readout_kernel(float* __restrict__ acc, const T* __restrict__ r, int64_t r_stride,
                               const float* __restrict__ M, int n, int W, int D, bool final_, const float* s,
                               const float* mu, const float* v1, const float* v2, const float* c, const T* out,
                               T* y) {
  __shared__ float rs[TN][TW];
  const int n0 = blockIdx.x * TN;
  const int d = blockIdx.y * TD + threadIdx.x;
  float a[TN];
#pragma unroll
  for (int i = 0; i < TN; ++i) a[i] = (d < D && n0 + i < n) ? acc[(int64_t)(n0 + i) * D + d] : 0.f;
  for (int w0 = 0; w0 < W; w0 += TW) {
    for (int i = threadIdx.x; i < TN * TW; i += blockDim.x) {
      const int row = i / TW, col = i % TW;
      rs[row][col] = (n0 + row < n && w0 + col < W) ? to_float(r[(int64_t)(n0 + row) * r_stride + w0 + col]) : 0.f;
    }
    __syncthreads();
    if (d < D) {
      const int wc = min(TW, W - w0);
      for (int k = 0; k < wc; ++k) {
        const float m = M[(int64_t)(w0 + k) * D + d];
#pragma unroll
        for (int i = 0; i < TN; ++i) a[i] += rs[i][k] * m;
      }
    }
    __syncthreads();
  }
  if (d >= D) return;
#pragma unroll
  for (int i = 0; i < TN; ++i) {
    const int row = n0 + i;
    if (row >= n) continue;
    if (!final_) {
      acc[(int64_t)row * D + d] = a[i];
    } else {
      float v = (a[i] + v1[d]) / s[row] + (mu[row] / s[row]) * v2[d] + c[d];
      if (out != nullptr) v += to_float(out[(int64_t)row * D + d]);
      y[(int64_t)row * D + d] = from_float<T>(v);
    }
  }
}

template <typename T>
void launch(float* acc, const void* r, int64_t r_stride, const float* M, int n, int W, int D, bool final_,
            const float* s, const float* mu, const float* v1, const float* v2, const float* c, const void* out,
            void* y, cudaStream_t stream) {
  dim3 grid((n + TN - 1) / TN, (D + TD - 1) / TD);
  readout_kernel<T><<<grid, TD, 0, stream>>>(acc, (const T*)r, r_stride, M, n, W, D, final_, s, mu, v1, v2, c,
                                            (const T*)out, (T*)y);
}

}  // namespace

cudaError_t readout_launch(int dtype, float* acc, const void* r, int64_t r_stride, const float* M, int n, int W,
                           int D, bool final_, const float* s, const float* mu, const float* v1, const float* v2,
                           const float* c, const void* out, void* y, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: launch<float>(acc, r, r_stride, M, n, W, D, final_, s, mu, v1, v2, c, out, y, stream); break;
    case kFloat16: launch<__half>(acc, r, r_stride, M, n, W, D, final_, s, mu, v1, v2, c, out, y, stream); break;
    case kBFloat16:
      launch<__nv_bfloat16>(acc, r, r_stride, M, n, W, D, final_, s, mu, v1, v2, c, out, y, stream);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace residual_fast
