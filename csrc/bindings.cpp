// torch + pybind11 side of the CUDA kernels: checks, allocation, stream, dtype dispatch.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace residual_fast {
cudaError_t spectral_reweight_forward_launch(int dtype, const void* Z, const void* R, const void* t, const void* lam,
                                             const void* B, const int64_t* off, void* Y, int n, int U, int Q, int D,
                                             cudaStream_t stream);
cudaError_t spectral_reweight_backward_launch(int dtype, const void* G, const void* Z, const void* R, const void* t,
                                              const void* lam, const void* B, const int64_t* off, void* DZ,
                                              float* dlam_part, int n, int U, int Q, int D, int64_t K,
                                              cudaStream_t stream);
int spectral_reweight_rows_per_block();
cudaError_t readout_launch(int dtype, float* acc, const void* r, int64_t r_stride, const float* M, int n, int W,
                           int D, bool final_, const float* s, const float* mu, const float* v1, const float* v2,
                           const float* c, const void* out, void* y, cudaStream_t stream);
}  // namespace residual_fast

namespace {

int dtype_code(const torch::Tensor& x) {
  switch (x.scalar_type()) {
    case torch::kFloat: return 0;
    case torch::kHalf: return 1;
    case torch::kBFloat16: return 2;
    default: TORCH_CHECK(false, "residual_fast CUDA kernels take float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return -1;
}

void check_cuda(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

void check_packed(const torch::Tensor& Z, const torch::Tensor& R, const torch::Tensor& t, const torch::Tensor& lam,
                  const torch::Tensor& B, const torch::Tensor& offsets) {
  check_cuda(Z, "Z"); check_cuda(R, "R"); check_cuda(t, "t"); check_cuda(lam, "lam"); check_cuda(B, "B");
  check_cuda(offsets, "offsets");
  TORCH_CHECK(Z.dim() == 3, "Z must be (n, U, q)");
  TORCH_CHECK(offsets.scalar_type() == torch::kLong && offsets.numel() == Z.size(1) + 1, "offsets must be int64 (U+1)");
  TORCH_CHECK(R.dim() == 2 && R.size(1) == Z.size(2), "R must be (K, q)");
  TORCH_CHECK(B.dim() == 2 && B.size(0) == R.size(0), "B must be (K, D)");
  TORCH_CHECK(t.numel() == R.size(0) && lam.numel() == R.size(0), "t and lam must have K entries");
  for (const auto* x : {&R, &t, &lam, &B})
    TORCH_CHECK(x->scalar_type() == Z.scalar_type(), "all floating inputs must share Z's dtype");
}

void check_launch(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "CUDA launch failed: ", cudaGetErrorString(err)); }

torch::Tensor spectral_reweight_forward(torch::Tensor Z, torch::Tensor R, torch::Tensor t, torch::Tensor lam,
                                        torch::Tensor B, torch::Tensor offsets) {
  check_packed(Z, R, t, lam, B, offsets);
  const c10::cuda::CUDAGuard guard(Z.device());
  auto Y = torch::empty({Z.size(0), B.size(1)}, Z.options());
  if (Z.size(0) == 0) return Y;
  check_launch(residual_fast::spectral_reweight_forward_launch(
      dtype_code(Z), Z.data_ptr(), R.data_ptr(), t.data_ptr(), lam.data_ptr(), B.data_ptr(),
      offsets.data_ptr<int64_t>(), Y.data_ptr(), (int)Z.size(0), (int)Z.size(1), (int)Z.size(2), (int)B.size(1),
      c10::cuda::getCurrentCUDAStream().stream()));
  return Y;
}

std::tuple<torch::Tensor, torch::Tensor> spectral_reweight_backward(torch::Tensor G, torch::Tensor Z, torch::Tensor R,
                                                                    torch::Tensor t, torch::Tensor lam,
                                                                    torch::Tensor B, torch::Tensor offsets) {
  check_packed(Z, R, t, lam, B, offsets);
  check_cuda(G, "grad");
  TORCH_CHECK(G.scalar_type() == Z.scalar_type() && G.size(0) == Z.size(0) && G.size(1) == B.size(1),
              "grad must be (n, D) in Z's dtype");
  const c10::cuda::CUDAGuard guard(Z.device());
  const int64_t tiles = (Z.size(0) + residual_fast::spectral_reweight_rows_per_block() - 1) /
                        residual_fast::spectral_reweight_rows_per_block();
  auto dZ = torch::empty_like(Z);
  auto part = torch::zeros({std::max<int64_t>(tiles, 1), R.size(0)}, Z.options().dtype(torch::kFloat));
  if (Z.size(0) > 0) {
    check_launch(residual_fast::spectral_reweight_backward_launch(
        dtype_code(Z), G.data_ptr(), Z.data_ptr(), R.data_ptr(), t.data_ptr(), lam.data_ptr(), B.data_ptr(),
        offsets.data_ptr<int64_t>(), dZ.data_ptr(), part.data_ptr<float>(), (int)Z.size(0), (int)Z.size(1),
        (int)Z.size(2), (int)B.size(1), R.size(0), c10::cuda::getCurrentCUDAStream().stream()));
  }
  return {dZ, part.sum(0)};
}

// acc (n, D) fp32 += r (n, W) @ M (W, D) fp32; with final, returns the epilogue y in out's dtype.
std::optional<torch::Tensor> readout(torch::Tensor acc, torch::Tensor r, torch::Tensor M, bool final_,
                                     std::optional<torch::Tensor> s, std::optional<torch::Tensor> mu,
                                     std::optional<torch::Tensor> v1, std::optional<torch::Tensor> v2,
                                     std::optional<torch::Tensor> c, std::optional<torch::Tensor> out) {
  check_cuda(acc, "acc"); check_cuda(M, "M");
  TORCH_CHECK(r.is_cuda() && r.dim() == 2 && r.stride(1) == 1, "r must be a CUDA (n, W) tensor with unit column stride");
  TORCH_CHECK(acc.scalar_type() == torch::kFloat && M.scalar_type() == torch::kFloat, "acc and M must be float32");
  TORCH_CHECK(M.size(0) == r.size(1) && M.size(1) == acc.size(1) && acc.size(0) == r.size(0), "shape mismatch");
  const c10::cuda::CUDAGuard guard(acc.device());
  const int n = (int)r.size(0), W = (int)r.size(1), D = (int)M.size(1);
  std::optional<torch::Tensor> y;
  const float *ps = nullptr, *pmu = nullptr, *pv1 = nullptr, *pv2 = nullptr, *pc = nullptr;
  const void* pout = nullptr;
  void* py = nullptr;
  if (final_) {
    TORCH_CHECK(s && mu && v1 && v2 && c, "the final readout needs s, mu, v1, v2 and c");
    for (const auto* x : {&*s, &*mu, &*v1, &*v2, &*c}) {
      check_cuda(*x, "epilogue tensor");
      TORCH_CHECK(x->scalar_type() == torch::kFloat, "epilogue tensors must be float32");
    }
    ps = s->data_ptr<float>(); pmu = mu->data_ptr<float>(); pv1 = v1->data_ptr<float>();
    pv2 = v2->data_ptr<float>(); pc = c->data_ptr<float>();
    if (out) {
      check_cuda(*out, "out");
      TORCH_CHECK(out->scalar_type() == r.scalar_type(), "out must share r's dtype");
      pout = out->data_ptr();
    }
    y = torch::empty({n, D}, r.options());
    py = y->data_ptr();
  }
  if (n > 0) {
    check_launch(residual_fast::readout_launch(dtype_code(r), acc.data_ptr<float>(), r.data_ptr(), r.stride(0),
                                               M.data_ptr<float>(), n, W, D, final_, ps, pmu, pv1, pv2, pc, pout, py,
                                               c10::cuda::getCurrentCUDAStream().stream()));
  }
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "residual_fast CUDA kernels";
  m.def("spectral_reweight_forward", &spectral_reweight_forward, "spectral_reweight forward (CUDA)");
  m.def("spectral_reweight_backward", &spectral_reweight_backward, "spectral_reweight backward (CUDA)");
  m.def("readout", &readout, "fused readout accumulate / epilogue (CUDA)");
}
