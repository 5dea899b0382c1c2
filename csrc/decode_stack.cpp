// DecodeStack: the decoder layers of a Llama-family model run for one decode step in C++.
//
// Why: a 135M model's decode step is ~30 layers x 10 small ops. Issued from Python, each op
// pays argument parsing, wrapper code and the layer function's own bookkeeping: measured
// ~200 us per layer on a 2-core machine, a third of the step. This class holds the layer
// weights once (set at model load) and, per step, calls the same registered ops through the
// dispatcher in the same order as `LlamaModel.layer`, so its results are bit-identical to the
// Python loop (the reference, tested) and it runs on whatever device the ops have kernels
// for (CPU and CUDA alike). It owns no KV state: the Python cache computes the slots and
// page tables for every layer at once and passes them in.
//
// Per layer, with (x, delta) the residual stream carried as in `LlamaModel.layer`:
//   h = rms_norm(delta, attn_norm, eps, residual=x)   (x += delta; first layer: no delta)
//   qkv = qlinear(h, Wqkv, bqkv)                      [N, nq + 2 nk]
//   rope(q, k) in place; kv_append(k, v, pages, slots[l])
//   o = paged_decode_attention(q, pages, plan[l], hd^-0.5)
//   h = rms_norm(qlinear(o, Wo, bo), ffn_norm, eps, residual=x)
//   delta = qlinear(silu_mul(qlinear(h, Wgu)), Wdown)
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace fastadapt {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// A quantized linear as qlinear takes it.
struct QLinearWeight {
  Tensor qdata;
  OptTensor scales, zeros, bias;
  std::string fmt;
  int64_t in_features = 0, group_size = 0;
  int64_t out_features() const { return qdata.size(0); }
  bool defined() const { return qdata.defined(); }
};

struct LayerWeights {
  Tensor attn_norm, ffn_norm;
  QLinearWeight qkv, o, gate_up, down;  // gate_up: gate rows then up rows
};

// The registered ops, looked up once (typed handles skip the name lookup on every call).
struct Ops {
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, double, const OptTensor&)> rms_norm;
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                  const OptTensor&, c10::string_view, int64_t, int64_t,
                                  c10::string_view)>
      qlinear;
  c10::TypedOperatorHandle<void(Tensor&, Tensor&, const Tensor&, const Tensor&, bool)> rope;
  c10::TypedOperatorHandle<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                const Tensor&)>
      kv_append;
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, const Tensor&, const Tensor&,
                                                      double, const OptTensor&)>
      attention;
  c10::TypedOperatorHandle<Tensor(const Tensor&)> silu_mul;

  static const Ops& get() {
    static const Ops ops = [] {
      auto& d = c10::Dispatcher::singleton();
      return Ops{
          d.findSchemaOrThrow("fastadapt::rms_norm", "")
              .typed<Tensor(const Tensor&, const Tensor&, double, const OptTensor&)>(),
          d.findSchemaOrThrow("fastadapt::qlinear", "")
              .typed<Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                            const OptTensor&, c10::string_view, int64_t, int64_t,
                            c10::string_view)>(),
          d.findSchemaOrThrow("fastadapt::rope", "")
              .typed<void(Tensor&, Tensor&, const Tensor&, const Tensor&, bool)>(),
          d.findSchemaOrThrow("fastadapt::kv_append", "")
              .typed<void(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                          const Tensor&)>(),
          d.findSchemaOrThrow("fastadapt::paged_decode_attention", "")
              .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, const Tensor&, const Tensor&,
                                                double, const OptTensor&)>(),
          d.findSchemaOrThrow("fastadapt::silu_mul", "").typed<Tensor(const Tensor&)>(),
      };
    }();
    return ops;
  }
};

class DecodeStack : public torch::CustomClassHolder {
 public:
  DecodeStack(int64_t n_layers, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps)
      : n_heads_(n_heads), n_kv_heads_(n_kv_heads), head_dim_(head_dim), eps_(eps) {
    TORCH_CHECK(n_layers > 0 && n_heads > 0 && n_kv_heads > 0 && head_dim > 0 &&
                    n_heads % n_kv_heads == 0,
                "fastadapt DecodeStack: n_layers, n_heads, n_kv_heads, head_dim must be positive "
                "with n_heads a multiple of n_kv_heads; got ", n_layers, ", ", n_heads, ", ",
                n_kv_heads, ", ", head_dim);
    layers_.resize(n_layers);
  }

  void set_norms(int64_t layer, const Tensor& attn_norm, const Tensor& ffn_norm) {
    LayerWeights& L = at_layer(layer, "set_norms");
    L.attn_norm = attn_norm;
    L.ffn_norm = ffn_norm;
  }

  // which: "qkv" | "o" | "gate_up" | "down"
  void set_linear(int64_t layer, const std::string& which, const Tensor& qdata,
                  const OptTensor& scales, const OptTensor& zeros, const OptTensor& bias,
                  const std::string& fmt, int64_t in_features, int64_t group_size) {
    LayerWeights& L = at_layer(layer, "set_linear");
    QLinearWeight* w = which == "qkv" ? &L.qkv : which == "o" ? &L.o
                       : which == "gate_up" ? &L.gate_up : which == "down" ? &L.down : nullptr;
    TORCH_CHECK(w != nullptr, "fastadapt DecodeStack.set_linear: which must be qkv, o, gate_up "
                "or down, got '", which, "'");
    TORCH_CHECK(qdata.dim() == 2, "fastadapt DecodeStack.set_linear: qdata must be 2-D, got ",
                qdata.sizes());
    *w = QLinearWeight{qdata, scales, zeros, bias, fmt, in_features, group_size};
  }

  // One decode step of every layer for B sequences of T new tokens each (N = B * T rows).
  //   x, delta: [N, H] residual stream (delta: the embedding's "not yet added" part, None
  //             before the first layer); positions: [N] RoPE rows; cos_sin: the RoPE table
  //   slots:    [L, N, H_kv] int32 slot mapping of the new tokens in each layer
  //   k_pages, v_pages: L page pools; plans: 3 L tensors (page_indptr, page_indices, kv_lens)
  // Returns [x, delta] after the last layer (x + delta is the hidden state).
  std::vector<Tensor> step(Tensor x, const OptTensor& delta_in, const Tensor& positions,
                           const Tensor& cos_sin, const Tensor& slots,
                           const std::vector<Tensor>& k_pages, const std::vector<Tensor>& v_pages,
                           const std::vector<Tensor>& plans, int64_t batch,
                           const std::string& act_quant) {
    const int64_t L = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(static_cast<int64_t>(k_pages.size()) == L &&
                    static_cast<int64_t>(v_pages.size()) == L &&
                    static_cast<int64_t>(plans.size()) == 3 * L,
                "fastadapt DecodeStack.step: k_pages and v_pages need ", L, " pools and plans ",
                3 * L, " tensors; got ", k_pages.size(), ", ", v_pages.size(), ", ", plans.size());
    TORCH_CHECK(x.dim() == 2, "fastadapt DecodeStack.step: x must be [N, H], got ", x.sizes());
    const int64_t N = x.size(0);
    TORCH_CHECK(batch > 0 && N % batch == 0, "fastadapt DecodeStack.step: batch must divide the ",
                N, " rows of x, got ", batch);
    TORCH_CHECK(slots.dim() == 3 && slots.size(0) == L && slots.size(1) == N &&
                    slots.size(2) == n_kv_heads_,
                "fastadapt DecodeStack.step: slots must be [", L, ", ", N, ", ", n_kv_heads_,
                "], got ", slots.sizes());
    for (int64_t l = 0; l < L; ++l) {
      const LayerWeights& W = layers_[l];
      TORCH_CHECK(W.attn_norm.defined() && W.qkv.defined() && W.o.defined() &&
                      W.gate_up.defined() && W.down.defined(),
                  "fastadapt DecodeStack.step: layer ", l, " has no weights set");
    }
    const Ops& ops = Ops::get();
    const int64_t T = N / batch;
    const int64_t nq = n_heads_ * head_dim_, nk = n_kv_heads_ * head_dim_;
    const double scale = std::pow(static_cast<double>(head_dim_), -0.5);
    // decode rows take the model's activation quantisation, as LlamaModel._mm does
    const c10::string_view aq = N == 1 ? c10::string_view(act_quant) : c10::string_view("none");
    auto mm = [&](const Tensor& a, const QLinearWeight& w) {
      return ops.qlinear.call(a, w.qdata, w.scales, w.zeros, w.bias, w.fmt, w.in_features,
                              w.group_size, aq);
    };
    OptTensor delta = delta_in;
    for (int64_t l = 0; l < L; ++l) {
      const LayerWeights& W = layers_[l];
      const Tensor h = delta.has_value() ? ops.rms_norm.call(*delta, W.attn_norm, eps_, x)
                                         : ops.rms_norm.call(x, W.attn_norm, eps_, std::nullopt);
      const Tensor qkv = mm(h, W.qkv);  // [N, nq + 2 nk]
      Tensor q = qkv.narrow(1, 0, nq).view({N, n_heads_, head_dim_});  // rotated in place
      Tensor k = qkv.narrow(1, nq, nk).view({N, n_kv_heads_, head_dim_});
      const Tensor v = qkv.narrow(1, nq + nk, nk).view({N, n_kv_heads_, head_dim_});
      ops.rope.call(q, k, positions, cos_sin, false);
      ops.kv_append.call(k, v, k_pages[l], v_pages[l], slots[l]);
      const Tensor o = std::get<0>(ops.attention.call(
          q.view({batch, T, n_heads_, head_dim_}), k_pages[l], v_pages[l], plans[3 * l],
          plans[3 * l + 1], plans[3 * l + 2], scale, std::nullopt));
      const Tensor h2 = ops.rms_norm.call(mm(o.reshape({N, nq}), W.o), W.ffn_norm, eps_, x);
      delta = mm(ops.silu_mul.call(mm(h2, W.gate_up)), W.down);
    }
    return {x, *delta};
  }

 private:
  LayerWeights& at_layer(int64_t layer, const char* what) {
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()),
                "fastadapt DecodeStack.", what, ": layer must be in [0, ", layers_.size(),
                "), got ", layer);
    return layers_[layer];
  }

  int64_t n_heads_, n_kv_heads_, head_dim_;
  double eps_;
  std::vector<LayerWeights> layers_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastadapt, m) {
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, double>())
      .def("set_norms", &DecodeStack::set_norms)
      .def("set_linear", &DecodeStack::set_linear)
      .def("step", &DecodeStack::step);
}

}  // namespace fastadapt
