// spectral_reweight forward and backward (see residual_fast/ops/spectral_reweight.py).
//
//   y[n] = sum_u ((Z[n,u] . R_k + t_k) * lam_k) B_k     over the packed components k of unit u
//
// Forward: a block owns TN rows x TD columns of y; per unit it stages Z rows in shared
// memory, forms a TN x TK tile of coefficients in shared memory and multiplies it into
// per-thread fp32 accumulators. Backward: a block owns TN rows; per unit and chunk it
// recomputes the coefficients, forms gB = dY . B_k, writes a per-tile partial of dlam
// and accumulates dZ in shared memory. Coefficients never reach global memory.
#include "common.cuh"

namespace residual_fast {
namespace {

constexpr int TN = 16;   // rows per block
constexpr int TD = 128;  // output columns per block (forward) = threads per block
constexpr int TK = 32;   // packed components per chunk
constexpr int BWD_THREADS = 256;

template <typename T>
__global__ void spectral_fwd_kernel(const T* __restrict__ Z, const T* __restrict__ R, const T* __restrict__ t,
                                    const T* __restrict__ lam, const T* __restrict__ B,
                                    const int64_t* __restrict__ off, T* __restrict__ Y, int n, int U, int Q,
                                    int D) {
  extern __shared__ float smem[];
  float* zs = smem;            // TN x Q
  float* cs = smem + TN * Q;   // TN x TK
  const int n0 = blockIdx.x * TN;
  const int d = blockIdx.y * TD + threadIdx.x;
  float acc[TN];
#pragma unroll
  for (int r = 0; r < TN; ++r) acc[r] = 0.f;

  for (int u = 0; u < U; ++u) {
    for (int i = threadIdx.x; i < TN * Q; i += blockDim.x) {
      const int r = i / Q, q = i % Q;
      zs[i] = (n0 + r < n) ? to_float(Z[((int64_t)(n0 + r) * U + u) * Q + q]) : 0.f;
    }
    __syncthreads();
    const int64_t k0 = off[u], k1 = off[u + 1];
    for (int64_t kb = k0; kb < k1; kb += TK) {
      const int kc = (int)min((int64_t)TK, k1 - kb);
      for (int i = threadIdx.x; i < TN * TK; i += blockDim.x) {
        const int r = i / TK, kk = i % TK;
        float s = 0.f;
        if (kk < kc) {
          const int64_t k = kb + kk;
          s = to_float(t[k]);
          for (int q = 0; q < Q; ++q) s += zs[r * Q + q] * to_float(R[k * Q + q]);
          s *= to_float(lam[k]);
        }
        cs[i] = s;
      }
      __syncthreads();
      if (d < D) {
        for (int kk = 0; kk < kc; ++kk) {
          const float b = to_float(B[(kb + kk) * D + d]);
#pragma unroll
          for (int r = 0; r < TN; ++r) acc[r] += cs[r * TK + kk] * b;
        }
      }
      __syncthreads();
    }
  }
  if (d < D) {
#pragma unroll
    for (int r = 0; r < TN; ++r)
      if (n0 + r < n) Y[(int64_t)(n0 + r) * D + d] = from_float<T>(acc[r]);
  }
}

template <typename T>
__global__ void spectral_bwd_kernel(const T* __restrict__ G, const T* __restrict__ Z, const T* __restrict__ R,
                                    const T* __restrict__ t, const T* __restrict__ lam, const T* __restrict__ B,
                                    const int64_t* __restrict__ off, T* __restrict__ DZ,
                                    float* __restrict__ dlam_part, int n, int U, int Q, int D, int64_t K) {
  extern __shared__ float smem[];
  float* zs = smem;               // TN x Q
  float* dzs = zs + TN * Q;       // TN x Q
  float* cs = dzs + TN * Q;       // TN x TK
  float* gbs = cs + TN * TK;      // TN x TK
  const int n0 = blockIdx.x * TN;
  for (int u = 0; u < U; ++u) {
    for (int i = threadIdx.x; i < TN * Q; i += blockDim.x) {
      const int r = i / Q, q = i % Q;
      zs[i] = (n0 + r < n) ? to_float(Z[((int64_t)(n0 + r) * U + u) * Q + q]) : 0.f;
      dzs[i] = 0.f;
    }
    __syncthreads();
    const int64_t k0 = off[u], k1 = off[u + 1];
    for (int64_t kb = k0; kb < k1; kb += TK) {
      const int kc = (int)min((int64_t)TK, k1 - kb);
      for (int i = threadIdx.x; i < TN * TK; i += blockDim.x) {
        const int r = i / TK, kk = i % TK;
        float c = 0.f, g = 0.f;
        if (kk < kc && n0 + r < n) {
          const int64_t k = kb + kk;
          c = to_float(t[k]);
          for (int q = 0; q < Q; ++q) c += zs[r * Q + q] * to_float(R[k * Q + q]);
          const T* grow = G + (int64_t)(n0 + r) * D;
          const T* brow = B + k * D;
          for (int dd = 0; dd < D; ++dd) g += to_float(grow[dd]) * to_float(brow[dd]);
        }
        cs[i] = c;
        gbs[i] = g;
      }
      __syncthreads();
      for (int kk = threadIdx.x; kk < kc; kk += blockDim.x) {
        float s = 0.f;
        for (int r = 0; r < TN; ++r) s += gbs[r * TK + kk] * cs[r * TK + kk];
        dlam_part[(int64_t)blockIdx.x * K + kb + kk] = s;
      }
      for (int i = threadIdx.x; i < TN * Q; i += blockDim.x) {
        const int r = i / Q, q = i % Q;
        float s = 0.f;
        for (int kk = 0; kk < kc; ++kk)
          s += gbs[r * TK + kk] * to_float(lam[kb + kk]) * to_float(R[(kb + kk) * Q + q]);
        dzs[i] += s;
      }
      __syncthreads();
    }
    for (int i = threadIdx.x; i < TN * Q; i += blockDim.x) {
      const int r = i / Q, q = i % Q;
      if (n0 + r < n) DZ[((int64_t)(n0 + r) * U + u) * Q + q] = from_float<T>(dzs[i]);
    }
    __syncthreads();
  }
}

template <typename T>
void launch_fwd(const void* Z, const void* R, const void* t, const void* lam, const void* B, const int64_t* off,
                void* Y, int n, int U, int Q, int D, cudaStream_t stream) {
  dim3 grid((n + TN - 1) / TN, (D + TD - 1) / TD);
  size_t smem = sizeof(float) * (TN * Q + TN * TK);
  spectral_fwd_kernel<T><<<grid, TD, smem, stream>>>((const T*)Z, (const T*)R, (const T*)t, (const T*)lam,
                                                     (const T*)B, off, (T*)Y, n, U, Q, D);
}

template <typename T>
void launch_bwd(const void* G, const void* Z, const void* R, const void* t, const void* lam, const void* B,
                const int64_t* off, void* DZ, float* dlam_part, int n, int U, int Q, int D, int64_t K,
                cudaStream_t stream) {
  dim3 grid((n + TN - 1) / TN);
  size_t smem = sizeof(float) * (2 * TN * Q + 2 * TN * TK);
  spectral_bwd_kernel<T><<<grid, BWD_THREADS, smem, stream>>>(
      (const T*)G, (const T*)Z, (const T*)R, (const T*)t, (const T*)lam, (const T*)B, off, (T*)DZ, dlam_part, n, U,
      Q, D, K);
}

}  // namespace

int spectral_reweight_rows_per_block() { return TN; }

cudaError_t spectral_reweight_forward_launch(int dtype, const void* Z, const void* R, const void* t, const void* lam,
                                             const void* B, const int64_t* off, void* Y, int n, int U, int Q, int D,
                                             cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: launch_fwd<float>(Z, R, t, lam, B, off, Y, n, U, Q, D, stream); break;
    case kFloat16: launch_fwd<__half>(Z, R, t, lam, B, off, Y, n, U, Q, D, stream); break;
    case kBFloat16: launch_fwd<__nv_bfloat16>(Z, R, t, lam, B, off, Y, n, U, Q, D, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t spectral_reweight_backward_launch(int dtype, const void* G, const void* Z, const void* R, const void* t,
                                              const void* lam, const void* B, const int64_t* off, void* DZ,
                                              float* dlam_part, int n, int U, int Q, int D, int64_t K,
                                              cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: launch_bwd<float>(G, Z, R, t, lam, B, off, DZ, dlam_part, n, U, Q, D, K, stream); break;
    case kFloat16: launch_bwd<__half>(G, Z, R, t, lam, B, off, DZ, dlam_part, n, U, Q, D, K, stream); break;
    case kBFloat16: launch_bwd<__nv_bfloat16>(G, Z, R, t, lam, B, off, DZ, dlam_part, n, U, Q, D, K, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace residual_fast
