// One tensor-core GEMM tile loop (WMMA, CUDA toolkit) shared by the re-weighting and readout kernels.
//
// A block of 4 warps owns a BM x BN tile of  A (M x K) @ B (K x N);  operands are staged through shared
// memory in the compute type T (half / bfloat16 natively; float as 3xTF32: x = hi + lo, with
// a_hi b_hi + a_hi b_lo + a_lo b_hi, close to fp32 accuracy on tensor cores). Loaders are functors
// (so prologues such as the lambda scaling happen while staging) and the fp32 tile ends in shared
// memory for a fused epilogue. Every index is 64-bit; any strides. Static shared memory < 48 KB, so
// no cudaFuncSetAttribute is needed.
#pragma once
#include <mma.h>

#include "common.cuh"

namespace residual_fast {

constexpr int BM = 64, BN = 64, BK = 16, THREADS = 128;

template <typename T> struct Frag;  // WMMA operand fragments for compute type T
template <> struct Frag<__half> {
  static constexpr int KS = 16;
  using A = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major>;
  using B = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __half, nvcuda::wmma::row_major>;
};
template <> struct Frag<__nv_bfloat16> {
  static constexpr int KS = 16;
  using A = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major>;
  using B = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major>;
};
template <> struct Frag<float> {
  static constexpr int KS = 8;
  using A = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8, nvcuda::wmma::precision::tf32,
                                   nvcuda::wmma::row_major>;
  using B = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 8, nvcuda::wmma::precision::tf32,
                                   nvcuda::wmma::row_major>;
};
template <typename T> using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, Frag<T>::KS, float>;

template <typename T> struct Stage {
  static constexpr int PAD = 16 / (int)sizeof(T) * 2;  // keeps rows 32-byte aligned, staggers banks
  __align__(32) T a[BM][BK + PAD];
  __align__(32) T b[BK][BN + PAD];
};

template <typename T> __device__ __forceinline__ T cvt(float x) { return from_float<T>(x); }

template <typename F> __device__ __forceinline__ void split_tf32(F& hi, F& lo) {
#pragma unroll
  for (int i = 0; i < hi.num_elements; ++i) {
    const float x = hi.x[i];
    hi.x[i] = nvcuda::wmma::__float_to_tf32(x);
    lo.x[i] = nvcuda::wmma::__float_to_tf32(x - hi.x[i]);
  }
}

template <typename T, int KDIM> struct Mma;
template <typename T> struct Mma<T, 16> {  // half types: one mma per k-step
  template <int LDA, int LDB>
  __device__ static void step(Acc<T> (&acc)[2][2], const T* a, const T* b) {
    typename Frag<T>::A fa[2];
    typename Frag<T>::B fb[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) nvcuda::wmma::load_matrix_sync(fa[i], a + i * 16 * LDA, LDA);
#pragma unroll
    for (int j = 0; j < 2; ++j) nvcuda::wmma::load_matrix_sync(fb[j], b + j * 16, LDB);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
  }
};
template <> struct Mma<float, 8> {  // 3xTF32
  template <int LDA, int LDB>
  __device__ static void step(Acc<float> (&acc)[2][2], const float* a, const float* b) {
    typename Frag<float>::A ah[2], al[2];
    typename Frag<float>::B bh[2], bl[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      nvcuda::wmma::load_matrix_sync(ah[i], a + i * 16 * LDA, LDA);
      split_tf32(ah[i], al[i]);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      nvcuda::wmma::load_matrix_sync(bh[j], b + j * 16, LDB);
      split_tf32(bh[j], bl[j]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        nvcuda::wmma::mma_sync(acc[i][j], al[i], bh[j], acc[i][j]);
        nvcuda::wmma::mma_sync(acc[i][j], ah[i], bl[j], acc[i][j]);
        nvcuda::wmma::mma_sync(acc[i][j], ah[i], bh[j], acc[i][j]);
      }
  }
};

// C tile (fp32, BM x (BN + 4), in `out`) = sum_k loadA(row, k) * loadB(k, col) over k < K.
// loadA(r, k) / loadB(k, c) return floats (0 outside the matrix); they see global row/column indices.
// B_K_CONTIGUOUS: B is stored with k contiguous (a transposed operand): stage it k-fastest so that
// neighbouring threads read neighbouring addresses.
template <typename T, bool B_K_CONTIGUOUS = false, typename LoadA, typename LoadB>
__device__ void gemm_tile(int64_t row0, int64_t col0, int64_t K, const LoadA& loadA, const LoadB& loadB,
                          Stage<T>& st, float (*out)[BN + 4]) {
  constexpr int LDA = BK + Stage<T>::PAD, LDB = BN + Stage<T>::PAD, KS = Frag<T>::KS;
  const int warp = threadIdx.x / 32, wr = warp / 2, wc = warp % 2;  // 2 x 2 warps, 32 x 32 each
  Acc<T> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += BK) {
#pragma unroll 2
    for (int i = threadIdx.x; i < BM * BK; i += THREADS) {
      const int r = i / BK, k = i % BK;
      st.a[r][k] = cvt<T>(loadA(row0 + r, k0 + k));
    }
#pragma unroll 2
    for (int i = threadIdx.x; i < BK * BN; i += THREADS) {
      const int k = B_K_CONTIGUOUS ? i % BK : i / BN, c = B_K_CONTIGUOUS ? i / BK : i % BN;
      st.b[k][c] = cvt<T>(loadB(k0 + k, col0 + c));
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < BK; ks += KS)
      Mma<T, KS>::template step<LDA, LDB>(acc, &st.a[wr * 32][ks], &st.b[ks][wc * 32]);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(&out[wr * 32 + i * 16][wc * 32 + j * 16], acc[i][j], BN + 4,
                                      nvcuda::wmma::mem_row_major);
  __syncthreads();
}

}  // namespace residual_fast
