// RMSNorm forward and backward, one row [D] per block, the row kept in registers.
//
//   forward:  r = rsqrt(mean(x^2) + eps);  n = T(x * r);  y = O(w * n)       (T: x's dtype, O: promote(T, W))
//   backward: g = dy * w;  xhat = x * r;  dx = r * (g - xhat * mean(g * xhat));  dw = sum_rows(dy * n)
//
// This is ftcore.ops.rms_norm_eager step for step (normalize in float32, cast to x's dtype, then scale),
// so a bf16 model gives the same rounding as the eager path. dw is summed per block into
// dw_partial [blocks, D] (float32) and reduced over blocks by the caller: no atomics, deterministic.
#include "common.cuh"

namespace ftcore {

constexpr int kRowVals = 8;  // values per thread: rows up to 8 x 1024 = 8192 wide

inline int rms_norm_threads(int64_t D) {
  const int64_t per = (D + kRowVals - 1) / kRowVals;
  return static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, (per + 31) / 32 * 32)));
}

template <typename T, typename W, typename O>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ w, O* __restrict__ y,
                                    float* __restrict__ rstd, int D, float eps) {
  __shared__ float shared[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * D;
  float v[kRowVals];
  float squares = 0.f;
#pragma unroll
  for (int k = 0; k < kRowVals; ++k) {
    const int c = threadIdx.x + k * blockDim.x;
    v[k] = c < D ? static_cast<float>(x[base + c]) : 0.f;
    squares += v[k] * v[k];
  }
  const float r = rsqrtf(block_sum(squares, shared) / D + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
#pragma unroll
  for (int k = 0; k < kRowVals; ++k) {
    const int c = threadIdx.x + k * blockDim.x;
    if (c < D) {
      const float n = static_cast<float>(static_cast<T>(v[k] * r));
      y[base + c] = static_cast<O>(static_cast<float>(w[c]) * n);
    }
  }
}

template <typename T, typename W, typename O>
__global__ void rms_norm_bwd_kernel(const O* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ w,
                                    const float* __restrict__ rstd, T* __restrict__ dx,
                                    float* __restrict__ dw_partial, int64_t N, int D) {
  __shared__ float shared[32];
  float dw[kRowVals];
#pragma unroll
  for (int k = 0; k < kRowVals; ++k) dw[k] = 0.f;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t base = row * D;
    const float r = rstd[row];
    float g[kRowVals], xhat[kRowVals];
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < kRowVals; ++k) {
      const int c = threadIdx.x + k * blockDim.x;
      g[k] = 0.f;
      xhat[k] = 0.f;
      if (c < D) {
        const float d = static_cast<float>(dy[base + c]);
        xhat[k] = static_cast<float>(x[base + c]) * r;
        g[k] = d * static_cast<float>(w[c]);
        dw[k] += d * static_cast<float>(static_cast<T>(xhat[k]));
      }
      dot += g[k] * xhat[k];
    }
    const float mean_dot = block_sum(dot, shared) / D;
#pragma unroll
    for (int k = 0; k < kRowVals; ++k) {
      const int c = threadIdx.x + k * blockDim.x;
      if (c < D) dx[base + c] = static_cast<T>(r * (g[k] - xhat[k] * mean_dot));
    }
  }
#pragma unroll
  for (int k = 0; k < kRowVals; ++k) {
    const int c = threadIdx.x + k * blockDim.x;
    if (c < D) dw_partial[static_cast<int64_t>(blockIdx.x) * D + c] = dw[k];
  }
}

// Calls f with (T, W, O) as types: x's dtype, the weight's (x's or float32) and their promotion.
#define FTCORE_DISPATCH_NORM(x_type, w_type, NAME, ...)                                                  \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_type, NAME, [&] {                          \
    using T = scalar_t;                                                                                   \
    if (w_type == x_type) {                                                                               \
      using W = T;                                                                                        \
      using O = T;                                                                                        \
      __VA_ARGS__();                                                                                      \
    } else {                                                                                              \
      TORCH_CHECK(w_type == at::kFloat, NAME ": weight must have x's dtype or float32");                  \
      using W = float;                                                                                    \
      using O = float;                                                                                    \
      __VA_ARGS__();                                                                                      \
    }                                                                                                     \
  })

std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& w, double eps) {
  FTCORE_CHECK_CUDA(x);
  FTCORE_CHECK_CONTIGUOUS(x);
  FTCORE_CHECK_CONTIGUOUS(w);
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1), "rms_norm_fwd: x [N, D], w [D]");
  const int64_t N = x.size(0), D = x.size(1);
  TORCH_CHECK(D <= kRowVals * 1024, "rms_norm_fwd: rows wider than 8192 are not supported");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto y = at::empty_like(x, x.options().dtype(c10::promoteTypes(x.scalar_type(), w.scalar_type())));
  auto rstd = at::empty({N}, x.options().dtype(at::kFloat));
  if (N == 0) return {y, rstd};
  const int threads = rms_norm_threads(D);
  const cudaStream_t stream = current_stream();
  FTCORE_DISPATCH_NORM(x.scalar_type(), w.scalar_type(), "rms_norm_fwd", [&] {
    rms_norm_fwd_kernel<T, W, O><<<N, threads, 0, stream>>>(
        x.data_ptr<T>(), w.data_ptr<W>(), y.data_ptr<O>(), rstd.data_ptr<float>(), static_cast<int>(D),
        static_cast<float>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, rstd};
}

std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& rstd) {
  FTCORE_CHECK_CUDA(dy);
  FTCORE_CHECK_CONTIGUOUS(dy);
  FTCORE_CHECK_CONTIGUOUS(x);
  FTCORE_CHECK_CONTIGUOUS(w);
  TORCH_CHECK(dy.sizes() == x.sizes(), "rms_norm_bwd: dy and x differ in shape");
  TORCH_CHECK(dy.scalar_type() == c10::promoteTypes(x.scalar_type(), w.scalar_type()),
              "rms_norm_bwd: dy must have the forward output's dtype");
  const int64_t N = x.size(0), D = x.size(1);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto dx = at::empty_like(x);
  const int threads = rms_norm_threads(D);
  const int blocks = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(N, sm_count() * 4)));
  auto dw_partial = at::zeros({blocks, D}, x.options().dtype(at::kFloat));
  if (N == 0) return {dx, dw_partial};
  const cudaStream_t stream = current_stream();
  FTCORE_DISPATCH_NORM(x.scalar_type(), w.scalar_type(), "rms_norm_bwd", [&] {
    rms_norm_bwd_kernel<T, W, O><<<blocks, threads, 0, stream>>>(
        dy.data_ptr<O>(), x.data_ptr<T>(), w.data_ptr<W>(), rstd.data_ptr<float>(), dx.data_ptr<T>(),
        dw_partial.data_ptr<float>(), N, static_cast<int>(D));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dw_partial};
}

}  // namespace ftcore
