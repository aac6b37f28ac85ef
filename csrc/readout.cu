// Fused inference readout on tensor cores (WMMA 3xTF32; see gemm.cuh):
//   acc (n, D) fp32 += r (n, W) @ M (W, D) fp32, then optionally the final LayerNorm epilogue
//   y = (acc + v1) / s + (mu / s) v2 + c [+ out]   (written instead of acc, in r's dtype).
// r is any strided view (the pooled row of each image's tokens), acc/out/y strided too.
#include "gemm.cuh"

namespace residual_fast {
namespace {

template <typename T> struct LoadR {
  const T* p;
  int64_t rows, cols, s0, s1;
  __device__ float operator()(int64_t i, int64_t k) const {
    return (i < rows && k < cols) ? to_float(p[i * s0 + k * s1]) : 0.f;
  }
};
struct LoadM {
  const float* p;
  int64_t rows, cols, s0, s1;
  __device__ float operator()(int64_t k, int64_t d) const { return (k < rows && d < cols) ? p[k * s0 + d * s1] : 0.f; }
};

struct Epilogue {
  bool final_;
  const float *s, *mu, *v1, *v2, *c;
  int64_t s_on, s_od, s_yn, s_yd;
};

template <typename T>
__global__ void __launch_bounds__(THREADS) readout_kernel(float* __restrict__ acc, int64_t s_an, int64_t s_ad,
                                                          LoadR<T> r, LoadM m, Epilogue e, const T* out, T* y) {
  __shared__ Stage<float> st;
  __shared__ __align__(32) float tile[BM][BN + 4];
  const int64_t row0 = (int64_t)blockIdx.y * BM, col0 = (int64_t)blockIdx.x * BN;
  gemm_tile<float>(row0, col0, r.cols, r, m, st, tile);
  for (int i = threadIdx.x; i < BM * BN; i += THREADS) {
    const int64_t n = row0 + i / BN, d = col0 + i % BN;
    if (n >= r.rows || d >= m.cols) continue;
    const float a = tile[i / BN][i % BN] + acc[n * s_an + d * s_ad];
    if (!e.final_) {
      acc[n * s_an + d * s_ad] = a;
      continue;
    }
    float v = (a + e.v1[d]) / e.s[n] + (e.mu[n] / e.s[n]) * e.v2[d] + e.c[d];
    if (out != nullptr) v += to_float(out[n * e.s_on + d * e.s_od]);
    y[n * e.s_yn + d * e.s_yd] = from_float<T>(v);
  }
}

template <typename T>
cudaError_t launch(float* acc, int64_t s_an, int64_t s_ad, const void* r, int64_t s_rn, int64_t s_rw, const float* M,
                   int64_t s_mw, int64_t s_md, int64_t n, int64_t W, int64_t D, bool final_, const float* s,
                   const float* mu, const float* v1, const float* v2, const float* c, const void* out, int64_t s_on,
                   int64_t s_od, void* y, int64_t s_yn, int64_t s_yd, cudaStream_t stream) {
  const dim3 grid((unsigned)((D + BN - 1) / BN), (unsigned)((n + BM - 1) / BM));
  readout_kernel<T><<<grid, THREADS, 0, stream>>>(acc, s_an, s_ad, LoadR<T>{(const T*)r, n, W, s_rn, s_rw},
                                                  LoadM{M, W, D, s_mw, s_md},
                                                  Epilogue{final_, s, mu, v1, v2, c, s_on, s_od, s_yn, s_yd},
                                                  (const T*)out, (T*)y);
  return cudaGetLastError();
}

}  // namespace

cudaError_t readout_launch(int dtype, float* acc, int64_t s_an, int64_t s_ad, const void* r, int64_t s_rn,
                           int64_t s_rw, const float* M, int64_t s_mw, int64_t s_md, int64_t n, int64_t W, int64_t D,
                           bool final_, const float* s, const float* mu, const float* v1, const float* v2,
                           const float* c, const void* out, int64_t s_on, int64_t s_od, void* y, int64_t s_yn,
                           int64_t s_yd, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32:
      return launch<float>(acc, s_an, s_ad, r, s_rn, s_rw, M, s_mw, s_md, n, W, D, final_, s, mu, v1, v2, c, out,
                           s_on, s_od, y, s_yn, s_yd, stream);
    case kFloat16:
      return launch<__half>(acc, s_an, s_ad, r, s_rn, s_rw, M, s_mw, s_md, n, W, D, final_, s, mu, v1, v2, c, out,
                            s_on, s_od, y, s_yn, s_yd, stream);
    case kBFloat16:
      return launch<__nv_bfloat16>(acc, s_an, s_ad, r, s_rn, s_rw, M, s_mw, s_md, n, W, D, final_, s, mu, v1, v2, c,
                                   out, s_on, s_od, y, s_yn, s_yd, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace residual_fast
