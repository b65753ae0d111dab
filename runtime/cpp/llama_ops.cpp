// ExecuTorch's two LLM custom ops that a SPHINX .pte decoder calls, for runners built against the
// ExecuTorch pip wheel: `llama::update_cache.out` and `llama::custom_sdpa.out`.
//
// The wheel registers ExecuTorch's own kernels for them only from libcustom_ops_aot_lib.so, a
// Python extension linked against libtorch: no use to a C++ runner on a board or a phone. These
// are the same ops by schema and semantics (extension/llm/custom_ops in ExecuTorch's sources),
// for what our export emits: fp32, batch 1 or more, a [B, S, kv_heads, head_dim] cache, causal
// attention from a start position, grouped-query heads. They register themselves at load time,
// like every ExecuTorch kernel library. A runner built from ExecuTorch's sources links its
// custom_ops library instead (README.md: Android) and leaves this file out.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

namespace {

using executorch::aten::optional;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

// The hot loops, built for AVX2 + FMA as well as the baseline on x86-64 (picked at load time);
// on aarch64 NEON is the baseline already.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPHINX_VECTOR_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define SPHINX_VECTOR_CLONES
#endif

bool contiguous_float(const Tensor& t, int64_t dims) {
  return t.scalar_type() == ScalarType::Float && t.dim() == dims &&
         executorch::runtime::tensor_is_default_dim_order(t) && executorch::runtime::tensor_is_contiguous(t);
}

// value [B, T, H_kv, D] written into cache [B, S, H_kv, D] at positions start_pos .. start_pos + T - 1.
Tensor& update_cache_out(KernelRuntimeContext& ctx, const Tensor& value, Tensor& cache, const int64_t start_pos,
                         Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, contiguous_float(value, 4) && contiguous_float(cache, 4), InvalidArgument, out,
                      "update_cache: value and cache must be contiguous 4-D fp32 tensors");
  const int64_t B = value.size(0), T = value.size(1), row = value.size(2) * value.size(3), S = cache.size(1);
  ET_KERNEL_CHECK_MSG(ctx, cache.size(0) == B && cache.size(2) * cache.size(3) == row, InvalidArgument, out,
                      "update_cache: value and cache shapes differ outside the sequence axis");
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && start_pos + T <= S, InvalidArgument, out,
                      "update_cache: positions %lld..%lld are outside the cache's %lld", (long long)start_pos,
                      (long long)(start_pos + T - 1), (long long)S);
  const float* src = value.const_data_ptr<float>();
  float* dst = cache.mutable_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(dst + (b * S + start_pos) * row, src + b * T * row, sizeof(float) * T * row);
  return out;  // the op's result is a placeholder; the cache is what it writes
}

SPHINX_VECTOR_CLONES
float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent sums: the compiler vectorises these
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

SPHINX_VECTOR_CLONES
void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// One query row against keys 0 .. n_keys - 1 of one KV head (rows `stride` floats apart).
void attend_row(const float* q, const float* k, const float* v, int64_t n_keys, int64_t stride, int64_t D,
                float scale, float* scores, float* out) {
  float max_score = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n_keys; ++j) {
    scores[j] = dot(q, k + j * stride, D) * scale;
    max_score = std::max(max_score, scores[j]);
  }
  float total = 0;
  for (int64_t j = 0; j < n_keys; ++j) {
    scores[j] = std::exp(scores[j] - max_score);
    total += scores[j];
  }
  std::memset(out, 0, sizeof(float) * D);
  for (int64_t j = 0; j < n_keys; ++j) axpy(scores[j] / total, v + j * stride, out, D);
}

// q [B, T, H, D] at positions start_pos .. start_pos + T - 1 over caches k, v [B, S, H_kv, D];
// query t sees keys 0 .. start_pos + t (causal) or 0 .. start_pos + T - 1; out [B, T, H, D].
Tensor& custom_sdpa_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                        const int64_t start_pos, const optional<Tensor>& attn_mask, const double dropout_p,
                        const bool is_causal, const optional<double> scale, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, !attn_mask.has_value() && dropout_p == 0.0, InvalidArgument, out,
                      "custom_sdpa: this kernel takes no attention mask and no dropout");
  // A dynamic-shape program hands over `out` at its upper bound: it takes the query's shape.
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::resize_tensor(out, q.sizes()) == Error::Ok, InvalidArgument, out,
                      "custom_sdpa: cannot resize the output to the query's shape");
  ET_KERNEL_CHECK_MSG(ctx, contiguous_float(q, 4) && contiguous_float(k, 4) && contiguous_float(v, 4) &&
                               contiguous_float(out, 4), InvalidArgument, out,
                      "custom_sdpa: query, caches and output must be contiguous 4-D fp32 tensors");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t S = k.size(1), H_kv = k.size(2);
  ET_KERNEL_CHECK_MSG(ctx, k.size(0) == B && k.size(3) == D && H_kv > 0 && H % H_kv == 0 &&
                               executorch::runtime::tensors_have_same_shape(k, v), InvalidArgument, out,
                      "custom_sdpa: shapes do not match (query [B, T, H, D], caches [B, S, H_kv, D])");
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && start_pos + T <= S, InvalidArgument, out,
                      "custom_sdpa: positions %lld..%lld are outside the cache's %lld", (long long)start_pos,
                      (long long)(start_pos + T - 1), (long long)S);
  const float factor = scale.has_value() ? static_cast<float>(scale.value()) : 1.0f / std::sqrt(float(D));
  const float *qp = q.const_data_ptr<float>(), *kp = k.const_data_ptr<float>(), *vp = v.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t group = H / H_kv, stride = H_kv * D;
  // One work item per (batch, query position, head); the cost of an item grows with its position.
  const bool ok = executorch::extension::parallel_for(0, B * T * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(start_pos + T);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (T * H), t = item / H % T, h = item % H;
      const int64_t n_keys = is_causal ? start_pos + t + 1 : start_pos + T;
      const int64_t kv_offset = b * S * stride + (h / group) * D;
      const int64_t q_offset = ((b * T + t) * H + h) * D;
      attend_row(qp + q_offset, kp + kv_offset, vp + kv_offset, n_keys, stride, D, factor, scores.data(),
                 op + q_offset);
    }
  });
  ET_KERNEL_CHECK_MSG(ctx, ok, Internal, out, "custom_sdpa: the thread pool failed");
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(llama, "update_cache.out", update_cache_out);
EXECUTORCH_LIBRARY(llama, "custom_sdpa.out", custom_sdpa_out);
