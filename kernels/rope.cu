// Rotary position embedding (HF's rotate-half convention), forward and backward in one kernel.
//
//   forward   out[i] = x[i] c[i] - x[i+h] s[i]        out[i+h] = x[i+h] c[i+h] + x[i] s[i+h]
//   backward dx[i] = g[i] c[i] + g[i+h] s[i+h]      dx[i+h]  = g[i+h] c[i+h] - g[i] s[i]
//
// with h = hd / 2. x [B, H, T, hd] may be any strided view whose last dim is contiguous (q and k come
// straight from a transposed projection, no copy); cos/sin [B|1, T, hd] are contiguous and broadcast
// over heads (and batch when their first dim is 1). The output [B, H, T, hd] is contiguous and
// preallocated by the caller in the dtype it wants (eager's: promote(x, cos) forward, x's backward).
// Each thread rotates one pair (i, i+h) in float32.
#include "common.cuh"

namespace ftcore {

template <typename T, typename C, typename O>
__global__ void rope_kernel(const T* __restrict__ x, int64_t sB, int64_t sH, int64_t sT,
                            const C* __restrict__ cos, const C* __restrict__ sin, int64_t cos_batch_stride,
                            O* __restrict__ out, int H, int Tn, int half, int64_t pairs, bool backward) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(p % half);
    int64_t rest = p / half;
    const int t = static_cast<int>(rest % Tn);
    rest /= Tn;
    const int h = static_cast<int>(rest % H);
    const int64_t b = rest / H;
    const T* xp = x + b * sB + h * sH + t * sT;
    const int64_t c_off = b * cos_batch_stride + static_cast<int64_t>(t) * 2 * half;
    const float x1 = static_cast<float>(xp[i]), x2 = static_cast<float>(xp[i + half]);
    const float c1 = static_cast<float>(cos[c_off + i]), c2 = static_cast<float>(cos[c_off + i + half]);
    const float s1 = static_cast<float>(sin[c_off + i]), s2 = static_cast<float>(sin[c_off + i + half]);
    float o1, o2;
    if (!backward) {
      o1 = x1 * c1 - x2 * s1;
      o2 = x2 * c2 + x1 * s2;
    } else {
      o1 = x1 * c1 + x2 * s2;
      o2 = x2 * c2 - x1 * s1;
    }
    O* op = out + ((b * H + h) * Tn + t) * 2 * half;
    op[i] = static_cast<O>(o1);
    op[i + half] = static_cast<O>(o2);
  }
}

void rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward, at::Tensor& out) {
  FTCORE_CHECK_CUDA(x);
  FTCORE_CHECK_CONTIGUOUS(cos);
  FTCORE_CHECK_CONTIGUOUS(sin);
  FTCORE_CHECK_CONTIGUOUS(out);
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "rope: x [B, H, T, hd] with a contiguous last dim");
  const int64_t B = x.size(0), H = x.size(1), Tn = x.size(2), hd = x.size(3);
  TORCH_CHECK(hd % 2 == 0, "rope: head_dim must be even");
  TORCH_CHECK(cos.dim() == 3 && (cos.size(0) == 1 || cos.size(0) == B) && cos.size(1) == Tn && cos.size(2) == hd,
              "rope: cos [B|1, T, hd]");
  TORCH_CHECK(sin.sizes() == cos.sizes() && sin.scalar_type() == cos.scalar_type(), "rope: sin must match cos");
  TORCH_CHECK(out.sizes() == x.sizes(), "rope: out must have x's shape");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() || cos.scalar_type() == at::kFloat,
              "rope: cos must have x's dtype or float32");
  const int64_t pairs = B * H * Tn * (hd / 2);
  if (pairs == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int threads = 256;
  const int blocks = grid_for(pairs, threads);
  const int64_t cos_batch_stride = cos.size(0) == 1 ? 0 : Tn * hd;
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rope", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "rope_out", [&] {
      using O = scalar_t;
      if (cos.scalar_type() == x.scalar_type()) {
        rope_kernel<T, T, O><<<blocks, threads, 0, stream>>>(
            x.data_ptr<T>(), x.stride(0), x.stride(1), x.stride(2), cos.data_ptr<T>(), sin.data_ptr<T>(),
            cos_batch_stride, out.data_ptr<O>(), static_cast<int>(H), static_cast<int>(Tn),
            static_cast<int>(hd / 2), pairs, backward);
      } else {
        rope_kernel<T, float, O><<<blocks, threads, 0, stream>>>(
            x.data_ptr<T>(), x.stride(0), x.stride(1), x.stride(2), cos.data_ptr<float>(), sin.data_ptr<float>(),
            cos_batch_stride, out.data_ptr<O>(), static_cast<int>(H), static_cast<int>(Tn),
            static_cast<int>(hd / 2), pairs, backward);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ftcore
