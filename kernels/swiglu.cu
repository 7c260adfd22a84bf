// SwiGLU: y = silu(g) * u, elementwise, forward and backward (float32 math, one rounding per output).
//
//   sig = 1 / (1 + exp(-g));  y = g * sig * u
//   dg = dy * u * sig * (1 + g * (1 - sig));  du = dy * g * sig
//
// The backward recomputes sig from g, so the forward keeps g and u only (eager autograd also keeps
// silu(g): one [tokens, intermediate] activation per layer less).
#include "common.cuh"

namespace ftcore {

template <typename T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ y, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float a = static_cast<float>(g[i]);
    y[i] = static_cast<T>(a / (1.f + expf(-a)) * static_cast<float>(u[i]));
  }
}

template <typename T>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ g, const T* __restrict__ u,
                                  T* __restrict__ dg, T* __restrict__ du, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float a = static_cast<float>(g[i]), d = static_cast<float>(dy[i]);
    const float sig = 1.f / (1.f + expf(-a));
    du[i] = static_cast<T>(d * a * sig);
    dg[i] = static_cast<T>(d * static_cast<float>(u[i]) * sig * (1.f + a * (1.f - sig)));
  }
}

static void check_same(const at::Tensor& a, const at::Tensor& b, const char* what) {
  FTCORE_CHECK_CUDA(a);
  FTCORE_CHECK_CONTIGUOUS(a);
  FTCORE_CHECK_CONTIGUOUS(b);
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), what, ": operands differ in shape or dtype");
}

at::Tensor swiglu_fwd(const at::Tensor& g, const at::Tensor& u) {
  check_same(g, u, "swiglu_fwd");
  const c10::cuda::OptionalCUDAGuard guard(g.device());
  auto y = at::empty_like(g);
  const int64_t n = g.numel();
  if (n == 0) return y;
  const int threads = 256;
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "swiglu_fwd", [&] {
    swiglu_fwd_kernel<scalar_t><<<grid_for(n, threads), threads, 0, stream>>>(
        g.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

std::vector<at::Tensor> swiglu_bwd(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u) {
  check_same(g, u, "swiglu_bwd");
  check_same(dy, g, "swiglu_bwd");
  const c10::cuda::OptionalCUDAGuard guard(g.device());
  auto dg = at::empty_like(g), du = at::empty_like(u);
  const int64_t n = g.numel();
  if (n == 0) return {dg, du};
  const int threads = 256;
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "swiglu_bwd", [&] {
    swiglu_bwd_kernel<scalar_t><<<grid_for(n, threads), threads, 0, stream>>>(
        dy.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), dg.data_ptr<scalar_t>(),
        du.data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dg, du};
}

}  // namespace ftcore
