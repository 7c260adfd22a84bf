// Python bindings of ftcore's CUDA kernels; ftcore/model/ops.py wraps them in torch.autograd.Functions.
#include <torch/extension.h>

#include <vector>

namespace ftcore {
std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& w, double eps);
std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& rstd);
void rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward, at::Tensor& out);
at::Tensor swiglu_fwd(const at::Tensor& g, const at::Tensor& u);
std::vector<at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u);
}  // namespace ftcore

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_fwd", &ftcore::rms_norm_fwd, "RMSNorm forward: (y [N, D], rstd [N] float32)");
  m.def("rms_norm_bwd", &ftcore::rms_norm_bwd, "RMSNorm backward: (dx [N, D], dw partial sums [blocks, D])");
  m.def("rope", &ftcore::rope, "rotate-half RoPE of x [B, H, T, hd] into out (backward=True: the transpose)");
  m.def("swiglu_fwd", &ftcore::swiglu_fwd, "silu(g) * u");
  m.def("swiglu_bwd", &ftcore::swiglu_bwd, "(dg, du) of silu(g) * u");
}
