// torch + pybind11 side of the CUDA kernels: checks, allocation, stream, dtype dispatch.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace residual_fast {
cudaError_t reweight_forward_launch(int dtype, const void* c, int64_t s_cn, int64_t s_ck, const float* lam,
                                    const void* B, int64_t s_bk, int64_t s_bd, void* y, int64_t s_yn, int64_t s_yd,
                                    int64_t n, int64_t K, int64_t D, cudaStream_t stream);
cudaError_t reweight_backward_launch(int dtype, const void* G, int64_t s_gn, int64_t s_gd, const void* B,
                                     int64_t s_bk, int64_t s_bd, const void* c, int64_t s_cn, int64_t s_ck,
                                     const float* lam, float* dlam, float* dc, int64_t s_dcn, int64_t s_dck,
                                     int64_t n, int64_t K, int64_t D, cudaStream_t stream);
cudaError_t readout_launch(int dtype, float* acc, int64_t s_an, int64_t s_ad, const void* r, int64_t s_rn,
                           int64_t s_rw, const float* M, int64_t s_mw, int64_t s_md, int64_t n, int64_t W, int64_t D,
                           bool final_, const float* s, const float* mu, const float* v1, const float* v2,
                           const float* c, const void* out, int64_t s_on, int64_t s_od, void* y, int64_t s_yn,
                           int64_t s_yd, cudaStream_t stream);
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

void check_on_cuda(const torch::Tensor& x, const char* name) { TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor"); }

void check_launch(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "CUDA launch failed: ", cudaGetErrorString(err)); }

void check_reweight(const torch::Tensor& c, const torch::Tensor& lam, const torch::Tensor& B) {
  check_on_cuda(c, "c"); check_cuda(lam, "lam"); check_on_cuda(B, "B");
  TORCH_CHECK(c.dim() == 2 && B.dim() == 2 && B.size(0) == c.size(1) && lam.numel() == c.size(1),
              "expected c (n, K), lam (K,), B (K, D)");
  TORCH_CHECK(c.scalar_type() == torch::kFloat && lam.scalar_type() == torch::kFloat, "c and lam must be float32");
}

// y (n, D) in B's dtype = (c * lam) @ B; any strides for c and B.
torch::Tensor reweight_forward(torch::Tensor c, torch::Tensor lam, torch::Tensor B) {
  check_reweight(c, lam, B);
  const c10::cuda::CUDAGuard guard(c.device());
  auto y = torch::empty({c.size(0), B.size(1)}, B.options());
  if (y.numel() == 0) return y;
  check_launch(residual_fast::reweight_forward_launch(
      dtype_code(B), c.data_ptr(), c.stride(0), c.stride(1), lam.data_ptr<float>(), B.data_ptr(), B.stride(0),
      B.stride(1), y.data_ptr(), y.stride(0), y.stride(1), c.size(0), c.size(1), B.size(1),
      c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

// (dc = (grad @ B^T) * lam or None, dlam = colsum(c * (grad @ B^T))), both fp32.
std::tuple<std::optional<torch::Tensor>, torch::Tensor> reweight_backward(torch::Tensor grad, torch::Tensor c,
                                                                          torch::Tensor lam, torch::Tensor B,
                                                                          bool need_dc) {
  check_reweight(c, lam, B);
  check_on_cuda(grad, "grad");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == c.size(0) && grad.size(1) == B.size(1) &&
              grad.scalar_type() == B.scalar_type(), "grad must be (n, D) in B's dtype");
  const c10::cuda::CUDAGuard guard(c.device());
  auto dlam = torch::zeros({c.size(1)}, c.options());
  std::optional<torch::Tensor> dc;
  if (need_dc) dc = torch::empty_like(c, at::MemoryFormat::Contiguous);
  if (c.numel() == 0) return {dc, dlam};
  check_launch(residual_fast::reweight_backward_launch(
      dtype_code(B), grad.data_ptr(), grad.stride(0), grad.stride(1), B.data_ptr(), B.stride(0), B.stride(1),
      c.data_ptr(), c.stride(0), c.stride(1), lam.data_ptr<float>(), dlam.data_ptr<float>(),
      dc ? dc->data_ptr<float>() : nullptr, dc ? dc->stride(0) : 0, dc ? dc->stride(1) : 0, c.size(0), c.size(1),
      B.size(1), c10::cuda::getCurrentCUDAStream().stream()));
  return {dc, dlam};
}

// acc (n, D) fp32 += r (n, W) @ M (W, D) fp32; with final, returns the epilogue y in out's dtype.
std::optional<torch::Tensor> readout(torch::Tensor acc, torch::Tensor r, torch::Tensor M, bool final_,
                                     std::optional<torch::Tensor> s, std::optional<torch::Tensor> mu,
                                     std::optional<torch::Tensor> v1, std::optional<torch::Tensor> v2,
                                     std::optional<torch::Tensor> c, std::optional<torch::Tensor> out) {
  check_on_cuda(acc, "acc"); check_on_cuda(M, "M"); check_on_cuda(r, "r");
  TORCH_CHECK(r.dim() == 2 && acc.dim() == 2 && M.dim() == 2, "acc, r and M must be matrices");
  TORCH_CHECK(acc.scalar_type() == torch::kFloat && M.scalar_type() == torch::kFloat, "acc and M must be float32");
  TORCH_CHECK(M.size(0) == r.size(1) && M.size(1) == acc.size(1) && acc.size(0) == r.size(0), "shape mismatch");
  const c10::cuda::CUDAGuard guard(acc.device());
  const int64_t n = r.size(0), W = r.size(1), D = M.size(1);
  std::optional<torch::Tensor> y;
  const float *ps = nullptr, *pmu = nullptr, *pv1 = nullptr, *pv2 = nullptr, *pc = nullptr;
  const void* pout = nullptr;
  int64_t s_on = 0, s_od = 0;
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
      check_on_cuda(*out, "out");
      TORCH_CHECK(out->scalar_type() == r.scalar_type(), "out must share r's dtype");
      pout = out->data_ptr();
      s_on = out->stride(0);
      s_od = out->stride(1);
    }
    y = torch::empty({n, D}, r.options());
    py = y->data_ptr();
  }
  if (n > 0) {
    check_launch(residual_fast::readout_launch(
        dtype_code(r), acc.data_ptr<float>(), acc.stride(0), acc.stride(1), r.data_ptr(), r.stride(0), r.stride(1),
        M.data_ptr<float>(), M.stride(0), M.stride(1), n, W, D, final_, ps, pmu, pv1, pv2, pc, pout, s_on, s_od, py,
        y ? y->stride(0) : 0, y ? y->stride(1) : 0, c10::cuda::getCurrentCUDAStream().stream()));
  }
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "residual_fast CUDA kernels";
  m.def("reweight_forward", &reweight_forward, "(c * lam) @ B on tensor cores (CUDA)");
  m.def("reweight_backward", &reweight_backward, "dc and dlam of reweight_forward on tensor cores (CUDA)");
  m.def("readout", &readout, "fused readout accumulate / epilogue (CUDA)");
}
