// Softmax attention for short sequences on the CPU: one (sample, head) at a time, in cache.
//
// Inputs are the projections exactly as nn.Linear wrote them: the queries (B, Nq, H * D) and the
// keys and values (B, N, 2 * H * D), which may be one fused (B, N, 3 * H * D) tensor (Nq = N) or
// two (the CLS-only last block: Nq = 1). The forward reads each head's q, k and v in place,
// computes S = scale q k^T, P = softmax(S) and o = P v, writes o straight into the (B, Nq, H * D)
// layout the output projection reads, and keeps P (B, H, Nq, N) for the backward. The backward
// writes dq, dk and dv straight into gradients of the projections' layouts, so nothing is
// zero-filled, stacked or copied. The matrix products are MKL's sgemm, which libtorch_cpu exports
// on x86-64; each runs on one thread, the (sample, head) pairs are spread over torch's threads.
//
// torch's flash-attention kernel at these sizes (65 tokens, heads of 16 to 64) recomputes P in
// the backward and needs its outputs moved between layouts; benchmarks/RESULTS.md has the timings.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
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

// Row-wise softmax of the rows x cols scores, in place. One clone per instruction set, chosen
// when the library loads.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void softmax_rows(float* scores, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = scores + i * cols;
    float top = row[0];
    for (int64_t j = 1; j < cols; ++j) top = std::max(top, row[j]);
    float total = 0.f;
    for (int64_t j = 0; j < cols; ++j) {
      row[j] = std::exp(row[j] - top);
      total += row[j];
    }
    const float inverse = 1.f / total;
    for (int64_t j = 0; j < cols; ++j) row[j] *= inverse;
  }
}

// dS = P * (dP - rowsum(P * dP)), the gradient through the softmax, in place of dP.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void softmax_backward_rows(const float* probs, float* grad, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* p = probs + i * cols;
    float* g = grad + i * cols;
    float dot = 0.f;
    for (int64_t j = 0; j < cols; ++j) dot += p[j] * g[j];
    for (int64_t j = 0; j < cols; ++j) g[j] = p[j] * (g[j] - dot);
  }
}

// Where one head's q, k and v rows start, and how far apart they lie.
struct Layout {
  int64_t batch, queries, tokens, heads, dim;
  int64_t q_row, q_batch;    // strides of the queries' tensor, in floats
  int64_t kv_row, kv_batch;  // strides of the keys' and values' tensor
  int64_t q_offset, k_offset, v_offset;  // first column of head 0's q, k and v

  Layout(const torch::Tensor& q_source, const torch::Tensor& kv_source, int64_t heads_,
         bool fused) {
    batch = q_source.size(0);
    queries = q_source.size(1);
    tokens = kv_source.size(1);
    heads = heads_;
    const int64_t width = kv_source.size(2) / (fused ? 3 : 2);
    dim = width / heads;
    q_row = q_source.size(2);
    q_batch = queries * q_row;
    kv_row = kv_source.size(2);
    kv_batch = tokens * kv_row;
    q_offset = 0;
    k_offset = fused ? width : 0;
    v_offset = k_offset + width;
  }

  // Where the index-th (sample, head) pair's q, k and v start, in floats from their tensors'
  // starts, and where its output starts in the (B, Nq, H * D) output.
  std::array<int64_t, 4> starts(int64_t index) const {
    const int64_t b = index / heads, h = index % heads;
    return {b * q_batch + q_offset + h * dim, b * kv_batch + k_offset + h * dim,
            b * kv_batch + v_offset + h * dim, (b * queries * heads + h) * dim};
  }
};

void check_source(const torch::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == torch::kFloat32 &&
                  tensor.dim() == 3 && tensor.is_contiguous(),
              "cpu_attention expects ", name,
              " as a contiguous float32 CPU tensor (B, N, width), got ", tensor.sizes(), " ",
              tensor.scalar_type());
}

Layout checked_layout(const torch::Tensor& q_source, const torch::Tensor& kv_source,
                      int64_t heads, bool fused) {
  check_source(q_source, "the queries");
  check_source(kv_source, "the keys and values");
  const int64_t parts = fused ? 3 : 2;
  TORCH_CHECK(heads > 0 && kv_source.size(1) > 0 && kv_source.size(2) % (parts * heads) == 0 &&
                  q_source.size(0) == kv_source.size(0) &&
                  (fused ? q_source.is_same(kv_source)
                         : q_source.size(2) * 2 == kv_source.size(2)),
              "cpu_attention: queries ", q_source.sizes(), " and keys/values ", kv_source.sizes(),
              " do not fit ", heads, " heads", fused ? " of one fused projection" : "");
  return Layout(q_source, kv_source, heads, fused);
}

std::vector<torch::Tensor> forward(const torch::Tensor& q_source, const torch::Tensor& kv_source,
                                   const Layout& layout, double scale, bool keep_weights) {
  const int64_t batch = layout.batch, queries = layout.queries, tokens = layout.tokens;
  const int64_t heads = layout.heads, dim = layout.dim;
  const auto options = q_source.options();
  auto out = torch::empty({batch, queries, heads * dim}, options);
  auto probs = keep_weights ? torch::empty({batch, heads, queries, tokens}, options)
                            : torch::empty({0}, options);
  const float* q_data = q_source.data_ptr<float>();
  const float* kv_data = kv_source.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  float* probs_data = probs.data_ptr<float>();
  const int nq = queries, n = tokens, d = dim, ld_q = layout.q_row, ld_kv = layout.kv_row;
  const int ld_out = heads * dim;
  const float alpha = static_cast<float>(scale);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(keep_weights ? 0 : queries * tokens);
    for (int64_t index = begin; index < end; ++index) {
      const auto [q_at, k_at, v_at, out_at] = layout.starts(index);
      float* p = keep_weights ? probs_data + index * queries * tokens : scratch.data();
      gemm('N', 'T', nq, n, d, alpha, q_data + q_at, ld_q, kv_data + k_at, ld_kv, 0.f, p, n);
      softmax_rows(p, queries, tokens);
      gemm('N', 'N', nq, d, n, 1.f, p, n, kv_data + v_at, ld_kv, 0.f, out_data + out_at, ld_out);
    }
  });
  return {out, probs};
}

// Fills grad_q and grad_kv, which have the layouts of q_source and kv_source (the same tensor
// when the projection is fused).
void backward(const torch::Tensor& grad_out, const torch::Tensor& q_source,
              const torch::Tensor& kv_source, const torch::Tensor& probs, const Layout& layout,
              double scale, torch::Tensor& grad_q, torch::Tensor& grad_kv) {
  const int64_t batch = layout.batch, queries = layout.queries, tokens = layout.tokens;
  const int64_t heads = layout.heads, dim = layout.dim;
  TORCH_CHECK(probs.is_contiguous() &&
                  probs.sizes() == torch::IntArrayRef({batch, heads, queries, tokens}),
              "cpu_attention: attention weights of shape ", probs.sizes(), " do not match ",
              q_source.sizes(), " and ", kv_source.sizes());
  const auto grad = grad_out.contiguous();
  TORCH_CHECK(grad.scalar_type() == torch::kFloat32 &&
                  grad.numel() == batch * queries * heads * dim,
              "cpu_attention: output gradient of shape ", grad_out.sizes(), " does not match ",
              q_source.sizes());
  const float* q_data = q_source.data_ptr<float>();
  const float* kv_data = kv_source.data_ptr<float>();
  const float* grad_data = grad.data_ptr<float>();
  const float* probs_data = probs.data_ptr<float>();
  float* grad_q_data = grad_q.data_ptr<float>();
  float* grad_kv_data = grad_kv.data_ptr<float>();
  const int nq = queries, n = tokens, d = dim, ld_q = layout.q_row, ld_kv = layout.kv_row;
  const int ld_out = heads * dim;
  const float alpha = static_cast<float>(scale);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(queries * tokens);
    float* grad_scores = scratch.data();
    for (int64_t index = begin; index < end; ++index) {
      const auto [q_at, k_at, v_at, out_at] = layout.starts(index);
      const float* q = q_data + q_at;
      const float* k = kv_data + k_at;
      const float* v = kv_data + v_at;
      float* dq = grad_q_data + q_at;
      float* dk = grad_kv_data + k_at;
      float* dv = grad_kv_data + v_at;
      const float* dout = grad_data + out_at;
      const float* p = probs_data + index * queries * tokens;
      gemm('T', 'N', n, d, nq, 1.f, p, n, dout, ld_out, 0.f, dv, ld_kv);           // dv = P^T do
      gemm('N', 'T', nq, n, d, 1.f, dout, ld_out, v, ld_kv, 0.f, grad_scores, n);  // dP = do v^T
      softmax_backward_rows(p, grad_scores, queries, tokens);                     // dS
      gemm('N', 'N', nq, d, n, alpha, grad_scores, n, k, ld_kv, 0.f, dq, ld_q);    // dq = s dS k
      gemm('T', 'N', n, d, nq, alpha, grad_scores, n, q, ld_q, 0.f, dk, ld_kv);    // dk = s dS^T q
    }
  });
}

}  // namespace

// Self-attention of a fused projection (B, N, 3 * H * D) -> output (B, N, H * D), and the
// attention weights (B, H, N, N) if kept for the backward (an empty tensor otherwise: each
// thread then reuses one buffer).
std::vector<torch::Tensor> fused_forward(const torch::Tensor& qkv, int64_t heads, double scale,
                                         bool keep_weights) {
  return forward(qkv, qkv, checked_layout(qkv, qkv, heads, true), scale, keep_weights);
}

// The gradient of the fused projection from that of the output.
torch::Tensor fused_backward(const torch::Tensor& grad_out, const torch::Tensor& qkv,
                             const torch::Tensor& probs, int64_t heads, double scale) {
  const Layout layout = checked_layout(qkv, qkv, heads, true);
  auto grad_qkv = torch::empty_like(qkv);
  backward(grad_out, qkv, qkv, probs, layout, scale, grad_qkv, grad_qkv);
  return grad_qkv;
}

// Queries (B, Nq, H * D) attending over keys and values (B, N, 2 * H * D) -> (B, Nq, H * D),
// and the weights (B, H, Nq, N) if kept.
std::vector<torch::Tensor> split_forward(const torch::Tensor& q, const torch::Tensor& kv,
                                         int64_t heads, double scale, bool keep_weights) {
  return forward(q, kv, checked_layout(q, kv, heads, false), scale, keep_weights);
}

// The gradients of the queries' and the keys' and values' projections.
std::vector<torch::Tensor> split_backward(const torch::Tensor& grad_out, const torch::Tensor& q,
                                          const torch::Tensor& kv, const torch::Tensor& probs,
                                          int64_t heads, double scale) {
  const Layout layout = checked_layout(q, kv, heads, false);
  auto grad_q = torch::empty_like(q);
  auto grad_kv = torch::empty_like(kv);
  backward(grad_out, q, kv, probs, layout, scale, grad_q, grad_kv);
  return {grad_q, grad_kv};
}

// Each call lets go of Python's interpreter lock while it computes, as torch's own operators do,
// so that other Python threads (decoding, loading) go on meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("fused_forward", &fused_forward, py::call_guard<py::gil_scoped_release>(),
             "(qkv, heads, scale, keep_weights) -> (out, weights or an empty tensor)");
  module.def("fused_backward", &fused_backward, py::call_guard<py::gil_scoped_release>(),
             "(grad_out, qkv, weights, heads, scale) -> grad_qkv");
  module.def("split_forward", &split_forward, py::call_guard<py::gil_scoped_release>(),
             "(q, kv, heads, scale, keep_weights) -> (out, weights or an empty tensor)");
  module.def("split_backward", &split_backward, py::call_guard<py::gil_scoped_release>(),
             "(grad_out, q, kv, weights, heads, scale) -> (grad_q, grad_kv)");
}
