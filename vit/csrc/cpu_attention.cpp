// Softmax attention for short sequences on the CPU: one (sample, head) at a time, in cache.
//
// Input is the fused projection (B, N, 3, H, D) exactly as nn.Linear wrote it. The forward reads
// each head's q, k and v in place, computes S = scale q k^T, P = softmax(S) and o = P v, writes o
// straight into the (B, N, H * D) layout the output projection reads, and keeps P (B, H, N, N)
// for the backward. The backward writes dq, dk and dv straight into one (B, N, 3, H, D) gradient,
// the layout of the projection's output, so nothing is zero-filled, stacked or copied. The matrix
// products are MKL's sgemm, which libtorch_cpu exports on x86-64; each runs on one thread, the
// (sample, head) pairs are spread over torch's threads.
//
// torch's flash-attention kernel at these sizes (65 tokens, heads of 16 to 64) recomputes P in
// the backward and needs its outputs moved between layouts; benchmarks/RESULTS.md has the timings.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c, const int* ldc);

namespace {

// Row-major C = alpha op(A) op(B) + beta C, as column-major BLAS computes C^T = op(B)^T op(A)^T.
void gemm(char trans_a, char trans_b, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&trans_b, &trans_a, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// Row-wise softmax of the n x n scores, in place. One clone per instruction set, chosen at load.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void softmax_rows(float* scores, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float* row = scores + i * n;
    float top = row[0];
    for (int64_t j = 1; j < n; ++j) top = std::max(top, row[j]);
    float total = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      row[j] = std::exp(row[j] - top);
      total += row[j];
    }
    const float inverse = 1.f / total;
    for (int64_t j = 0; j < n; ++j) row[j] *= inverse;
  }
}

// dS = P * (dP - rowsum(P * dP)), the gradient through the softmax, in place of dP.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void softmax_backward_rows(const float* probs, float* grad, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float* p = probs + i * n;
    float* g = grad + i * n;
    float dot = 0.f;
    for (int64_t j = 0; j < n; ++j) dot += p[j] * g[j];
    for (int64_t j = 0; j < n; ++j) g[j] = p[j] * (g[j] - dot);
  }
}

void check_qkv(const torch::Tensor& qkv) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == torch::kFloat32 && qkv.dim() == 5 &&
                  qkv.size(2) == 3 && qkv.is_contiguous(),
              "cpu_attention expects a contiguous float32 CPU tensor of shape (B, N, 3, H, D), got ",
              qkv.sizes(), " ", qkv.scalar_type());
}

}  // namespace

// (B, N, 3, H, D) -> output (B, N, H * D), and the attention weights (B, H, N, N) if kept for
// the backward (an empty tensor otherwise: each thread then reuses one N x N buffer).
std::vector<torch::Tensor> attention_forward(const torch::Tensor& qkv, double scale,
                                             bool keep_weights) {
  check_qkv(qkv);
  const int64_t batch = qkv.size(0), tokens = qkv.size(1), heads = qkv.size(3), dim = qkv.size(4);
  auto out = torch::empty({batch, tokens, heads * dim}, qkv.options());
  auto probs = keep_weights ? torch::empty({batch, heads, tokens, tokens}, qkv.options())
                            : torch::empty({0}, qkv.options());
  const float* qkv_data = qkv.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  float* probs_data = probs.data_ptr<float>();
  const int n = tokens, d = dim, ld_qkv = 3 * heads * dim, ld_out = heads * dim;
  const float alpha = static_cast<float>(scale);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(keep_weights ? 0 : tokens * tokens);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / heads, h = index % heads;
      const float* q = qkv_data + b * tokens * ld_qkv + h * dim;
      const float* k = q + heads * dim;
      const float* v = k + heads * dim;
      float* p = keep_weights ? probs_data + index * tokens * tokens : scratch.data();
      gemm('N', 'T', n, n, d, alpha, q, ld_qkv, k, ld_qkv, 0.f, p, n);
      softmax_rows(p, tokens);
      gemm('N', 'N', n, d, n, 1.f, p, n, v, ld_qkv, 0.f, out_data + b * tokens * ld_out + h * dim,
           ld_out);
    }
  });
  return {out, probs};
}

// The gradient of the (B, N, 3, H, D) input from that of the (B, N, H * D) output.
torch::Tensor attention_backward(const torch::Tensor& grad_out, const torch::Tensor& qkv,
                                 const torch::Tensor& probs, double scale) {
  check_qkv(qkv);
  const int64_t batch = qkv.size(0), tokens = qkv.size(1), heads = qkv.size(3), dim = qkv.size(4);
  TORCH_CHECK(probs.is_contiguous() && probs.sizes() == torch::IntArrayRef({batch, heads, tokens, tokens}),
              "cpu_attention: attention weights of shape ", probs.sizes(), " do not match ", qkv.sizes());
  const auto grad = grad_out.contiguous();
  TORCH_CHECK(grad.scalar_type() == torch::kFloat32 && grad.numel() == batch * tokens * heads * dim,
              "cpu_attention: output gradient of shape ", grad_out.sizes(), " does not match ", qkv.sizes());
  auto grad_qkv = torch::empty_like(qkv);
  const float* qkv_data = qkv.data_ptr<float>();
  const float* grad_data = grad.data_ptr<float>();
  const float* probs_data = probs.data_ptr<float>();
  float* grad_qkv_data = grad_qkv.data_ptr<float>();
  const int n = tokens, d = dim, ld_qkv = 3 * heads * dim, ld_out = heads * dim;
  const float alpha = static_cast<float>(scale);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(tokens * tokens);
    float* grad_scores = scratch.data();
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / heads, h = index % heads;
      const int64_t offset = b * tokens * ld_qkv + h * dim;
      const float* q = qkv_data + offset;
      const float* k = q + heads * dim;
      const float* v = k + heads * dim;
      float* dq = grad_qkv_data + offset;
      float* dk = dq + heads * dim;
      float* dv = dk + heads * dim;
      const float* dout = grad_data + b * tokens * ld_out + h * dim;
      const float* p = probs_data + index * tokens * tokens;
      gemm('T', 'N', n, d, n, 1.f, p, n, dout, ld_out, 0.f, dv, ld_qkv);            // dv = P^T do
      gemm('N', 'T', n, n, d, 1.f, dout, ld_out, v, ld_qkv, 0.f, grad_scores, n);  // dP = do v^T
      softmax_backward_rows(p, grad_scores, tokens);                              // dS
      gemm('N', 'N', n, d, n, alpha, grad_scores, n, k, ld_qkv, 0.f, dq, ld_qkv);  // dq = s dS k
      gemm('T', 'N', n, d, n, alpha, grad_scores, n, q, ld_qkv, 0.f, dk, ld_qkv);  // dk = s dS^T q
    }
  });
  return grad_qkv;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("forward", &attention_forward,
             "attention forward: (qkv, scale, keep_weights) -> (out, probs or an empty tensor)");
  module.def("backward", &attention_backward, "attention backward: (grad_out, qkv, probs, scale) -> grad_qkv");
}
