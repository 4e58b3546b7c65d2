// hla._C — the torch glue: torch tensors in, hla::TensorView out, one call into libhla (the linear
// family and the softmax family).
//
// Nothing here computes anything: outputs are allocated by the Python side (torch.empty) and passed
// in, the way libhla's API expects (caller-allocated outputs). Errors from libhla (hla::Error, a
// std::invalid_argument) leave as ValueError with the message unchanged.
//
// Kept to one translation unit on purpose: compiling against the torch headers costs ~a minute per
// file on the 2-core CI machine.
#include <torch/extension.h>

#include <cmath>
#include <string>

#include "hla/hla.hpp"

namespace py = pybind11;

namespace {

hla::DType to_hla_dtype(const char* name, at::ScalarType t) {
    switch (t) {
        case at::kFloat: return hla::DType::F32;
        case at::kDouble: return hla::DType::F64;
        case at::kBFloat16: return hla::DType::BF16;
        case at::kHalf: return hla::DType::F16;
        case at::kInt: return hla::DType::I32;
        case at::kLong: return hla::DType::I64;
        default: break;
    }
    hla::detail::fail("hla: ", name, ": dtype ", c10::toString(t), " is not supported by hla");
}

// A torch tensor (or None) as a non-owning view. Strides are passed through unchanged: libhla itself
// checks which layouts an op accepts and says so by name.
hla::TensorView as_view(const char* name, const c10::optional<at::Tensor>& maybe) {
    if (!maybe.has_value() || !maybe->defined()) return {};
    const at::Tensor& t = *maybe;
    HLA_CHECK(t.dim() <= hla::kMaxDims, "hla: ", name, ": at most ", hla::kMaxDims, " dimensions are supported, got ",
              t.dim());
    hla::TensorView v;
    v.data = t.data_ptr();
    v.dtype = to_hla_dtype(name, t.scalar_type());
    if (t.device().is_cpu()) {
        v.device = hla::Device::CPU;
        v.device_index = 0;
    } else if (t.device().is_cuda()) {
        v.device = hla::Device::CUDA;
        v.device_index = t.device().has_index() ? t.device().index() : 0;
    } else {
        hla::detail::fail("hla: ", name, ": tensors on ", t.device().str(), " are not supported (cpu or cuda)");
    }
    v.ndim = int(t.dim());
    for (int d = 0; d < v.ndim; ++d) {
        v.shape[d] = t.size(d);
        v.stride[d] = t.stride(d);
    }
    return v;
}

// The integer codes of the config enums are read from the C++ enums themselves (see PYBIND11_MODULE),
// so Python never hard-codes them.
hla::LinearConfig make_config(int64_t decay, int64_t update, c10::optional<double> scale, bool qk_l2norm,
                              int64_t gate_activation, double lower_bound, int64_t beta_activation, int64_t backend) {
    hla::LinearConfig c;
    c.decay = static_cast<hla::Decay>(decay);
    c.update = static_cast<hla::Update>(update);
    if (scale.has_value()) c.scale = *scale;
    c.qk_l2norm = qk_l2norm;
    c.gate_activation = static_cast<hla::GateActivation>(gate_activation);
    c.lower_bound = float(lower_bound);
    c.beta_activation = static_cast<hla::BetaActivation>(beta_activation);
    c.backend = static_cast<hla::Backend>(backend);
    return c;
}

// Runs fn with the GIL released and hla::Error turned into ValueError.
template <class Fn>
void call_hla(Fn&& fn) {
    try {
        py::gil_scoped_release release;
        fn();
    } catch (const hla::Error& e) {
        throw py::value_error(e.what());
    }
}

using Opt = c10::optional<at::Tensor>;

// The forward's inputs as the C++ API takes them; shared by the forward and the backward binding.
hla::LinearForwardArgs linear_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Opt& g,
                                     const Opt& beta, const Opt& A_log, const Opt& dt_bias, const Opt& initial_state,
                                     const Opt& cu_seqlens) {
    hla::LinearForwardArgs a;
    a.q = as_view("q", q);
    a.k = as_view("k", k);
    a.v = as_view("v", v);
    a.g = as_view("g", g);
    a.beta = as_view("beta", beta);
    a.A_log = as_view("A_log", A_log);
    a.dt_bias = as_view("dt_bias", dt_bias);
    a.initial_state = as_view("initial_state", initial_state);
    a.cu_seqlens = as_view("cu_seqlens", cu_seqlens);
    return a;
}

void linear_forward(int64_t decay, int64_t update, c10::optional<double> scale, bool qk_l2norm, int64_t gate_activation,
                    double lower_bound, int64_t beta_activation, int64_t backend, const at::Tensor& q,
                    const at::Tensor& k, const at::Tensor& v, const Opt& g, const Opt& beta, const Opt& A_log,
                    const Opt& dt_bias, const Opt& initial_state, const Opt& cu_seqlens, const at::Tensor& o,
                    const Opt& final_state) {
    call_hla([&] {
        const hla::LinearConfig cfg =
            make_config(decay, update, scale, qk_l2norm, gate_activation, lower_bound, beta_activation, backend);
        hla::LinearForwardArgs a = linear_inputs(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens);
        a.o = as_view("o", o);
        a.final_state = as_view("final_state", final_state);
        hla::linear_forward(cfg, a);
    });
}

void linear_backward(int64_t decay, int64_t update, c10::optional<double> scale, bool qk_l2norm,
                     int64_t gate_activation, double lower_bound, int64_t beta_activation, int64_t backend,
                     const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Opt& g, const Opt& beta,
                     const Opt& A_log, const Opt& dt_bias, const Opt& initial_state, const Opt& cu_seqlens,
                     const at::Tensor& d_o, const Opt& d_final_state, const Opt& dq, const Opt& dk, const Opt& dv,
                     const Opt& dg, const Opt& dbeta, const Opt& dA_log, const Opt& ddt_bias,
                     const Opt& dinitial_state) {
    call_hla([&] {
        const hla::LinearConfig cfg =
            make_config(decay, update, scale, qk_l2norm, gate_activation, lower_bound, beta_activation, backend);
        hla::LinearForwardArgs a = linear_inputs(q, k, v, g, beta, A_log, dt_bias, initial_state, cu_seqlens);
        hla::LinearGrads gr;
        gr.dq = as_view("dq", dq);
        gr.dk = as_view("dk", dk);
        gr.dv = as_view("dv", dv);
        gr.dg = as_view("dg", dg);
        gr.dbeta = as_view("dbeta", dbeta);
        gr.dA_log = as_view("dA_log", dA_log);
        gr.ddt_bias = as_view("ddt_bias", ddt_bias);
        gr.dinitial_state = as_view("dinitial_state", dinitial_state);
        hla::linear_backward(cfg, a, as_view("d_o", d_o), as_view("d_final_state", d_final_state), gr);
    });
}

void linear_decode(int64_t decay, int64_t update, c10::optional<double> scale, bool qk_l2norm, int64_t gate_activation,
                   double lower_bound, int64_t beta_activation, int64_t backend, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, const Opt& g, const Opt& beta, const Opt& A_log,
                   const Opt& dt_bias, const at::Tensor& state, const Opt& state_indices, const at::Tensor& o) {
    call_hla([&] {
        const hla::LinearConfig cfg =
            make_config(decay, update, scale, qk_l2norm, gate_activation, lower_bound, beta_activation, backend);
        hla::LinearDecodeArgs a;
        a.q = as_view("q", q);
        a.k = as_view("k", k);
        a.v = as_view("v", v);
        a.g = as_view("g", g);
        a.beta = as_view("beta", beta);
        a.A_log = as_view("A_log", A_log);
        a.dt_bias = as_view("dt_bias", dt_bias);
        a.state = as_view("state", state);
        a.state_indices = as_view("state_indices", state_indices);
        a.o = as_view("o", o);
        hla::linear_decode(cfg, a);
    });
}

hla::SoftmaxConfig make_softmax_config(bool causal, int64_t window, c10::optional<double> scale, int64_t backend) {
    hla::SoftmaxConfig c;
    c.causal = causal;
    c.window = window;
    if (scale.has_value()) c.scale = *scale;
    c.backend = static_cast<hla::Backend>(backend);
    return c;
}

// The forward's inputs and outputs (the backward needs o and lse too).
hla::SoftmaxForwardArgs softmax_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Opt& g,
                                     const Opt& gate, const Opt& cu_seqlens, const at::Tensor& o, const Opt& lse) {
    hla::SoftmaxForwardArgs a;
    a.q = as_view("q", q);
    a.k = as_view("k", k);
    a.v = as_view("v", v);
    a.g = as_view("g", g);
    a.gate = as_view("gate", gate);
    a.cu_seqlens = as_view("cu_seqlens", cu_seqlens);
    a.o = as_view("o", o);
    a.lse = as_view("lse", lse);
    return a;
}

void softmax_forward(bool causal, int64_t window, c10::optional<double> scale, int64_t backend, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const Opt& g, const Opt& gate, const Opt& cu_seqlens,
                     const at::Tensor& o, const Opt& lse) {
    call_hla([&] {
        const hla::SoftmaxForwardArgs a = softmax_args(q, k, v, g, gate, cu_seqlens, o, lse);
        hla::softmax_attention_forward(make_softmax_config(causal, window, scale, backend), a);
    });
}

void softmax_backward(bool causal, int64_t window, c10::optional<double> scale, int64_t backend, const at::Tensor& q,
                      const at::Tensor& k, const at::Tensor& v, const Opt& g, const Opt& gate, const Opt& cu_seqlens,
                      const at::Tensor& o, const at::Tensor& lse, const at::Tensor& d_o, const Opt& dq, const Opt& dk,
                      const Opt& dv, const Opt& dg, const Opt& dgate) {
    call_hla([&] {
        const hla::SoftmaxForwardArgs a = softmax_args(q, k, v, g, gate, cu_seqlens, o, lse);
        hla::SoftmaxGrads gr;
        gr.dq = as_view("dq", dq);
        gr.dk = as_view("dk", dk);
        gr.dv = as_view("dv", dv);
        gr.dg = as_view("dg", dg);
        gr.dgate = as_view("dgate", dgate);
        hla::softmax_attention_backward(make_softmax_config(causal, window, scale, backend), a, as_view("d_o", d_o),
                                        gr);
    });
}

void softmax_kvcache(bool causal, int64_t window, c10::optional<double> scale, int64_t backend, const at::Tensor& q,
                     const at::Tensor& k_cache, const at::Tensor& v_cache, const Opt& cache_seqlens, const Opt& k,
                     const Opt& v, const Opt& cache_batch_idx, const Opt& block_table, const Opt& g_cache,
                     const Opt& g, const Opt& gate, const at::Tensor& o, const Opt& lse) {
    call_hla([&] {
        hla::SoftmaxKVCacheArgs a;
        a.q = as_view("q", q);
        a.k_cache = as_view("k_cache", k_cache);
        a.v_cache = as_view("v_cache", v_cache);
        a.cache_seqlens = as_view("cache_seqlens", cache_seqlens);
        a.k = as_view("k", k);
        a.v = as_view("v", v);
        a.cache_batch_idx = as_view("cache_batch_idx", cache_batch_idx);
        a.block_table = as_view("block_table", block_table);
        a.g_cache = as_view("g_cache", g_cache);
        a.g = as_view("g", g);
        a.gate = as_view("gate", gate);
        a.o = as_view("o", o);
        a.lse = as_view("lse", lse);
        hla::softmax_attention_kvcache(make_softmax_config(causal, window, scale, backend), a);
    });
}

at::Tensor lightning_attn_log_decay(int64_t num_heads, int64_t layer_idx, int64_t num_layers) {
    at::Tensor out = at::empty({std::max<int64_t>(num_heads, 0)}, at::TensorOptions().dtype(at::kFloat));
    call_hla([&] { hla::lightning_attn_log_decay(num_heads, layer_idx, num_layers, out.data_ptr<float>()); });
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "hla: torch bindings of libhla (glue only; see hla.ops for the user API)";

    py::dict decay, update, gate, beta_act, backend;
    decay["none"] = int(hla::Decay::None);
    decay["fixed"] = int(hla::Decay::Fixed);
    decay["scalar"] = int(hla::Decay::Scalar);
    decay["vector"] = int(hla::Decay::Vector);
    update["additive"] = int(hla::Update::Additive);
    update["delta"] = int(hla::Update::Delta);
    gate["none"] = int(hla::GateActivation::None);
    gate["softplus_decay"] = int(hla::GateActivation::SoftplusDecay);
    gate["bounded_sigmoid"] = int(hla::GateActivation::BoundedSigmoid);
    beta_act["none"] = int(hla::BetaActivation::None);
    beta_act["sigmoid"] = int(hla::BetaActivation::Sigmoid);
    beta_act["sigmoid2x"] = int(hla::BetaActivation::Sigmoid2x);
    backend["auto"] = int(hla::Backend::Auto);
    backend["reference"] = int(hla::Backend::Reference);
    backend["cpu"] = int(hla::Backend::Cpu);
    backend["cuda"] = int(hla::Backend::Cuda);
    m.attr("DECAY") = decay;
    m.attr("UPDATE") = update;
    m.attr("GATE_ACTIVATION") = gate;
    m.attr("BETA_ACTIVATION") = beta_act;
    m.attr("BACKEND") = backend;

    // Config arguments come first in every call, in LinearConfig's order.
    m.def("linear_forward", &linear_forward, "o (and final_state) <- the linear-family recurrence (hla::linear_forward)",
          py::arg("decay"), py::arg("update"), py::arg("scale"), py::arg("qk_l2norm"), py::arg("gate_activation"),
          py::arg("lower_bound"), py::arg("beta_activation"), py::arg("backend"), py::arg("q"), py::arg("k"),
          py::arg("v"), py::arg("g"), py::arg("beta"), py::arg("A_log"), py::arg("dt_bias"), py::arg("initial_state"),
          py::arg("cu_seqlens"), py::arg("o"), py::arg("final_state"));
    m.def("linear_backward", &linear_backward, "gradients of linear_forward, recomputing (hla::linear_backward)",
          py::arg("decay"), py::arg("update"), py::arg("scale"), py::arg("qk_l2norm"), py::arg("gate_activation"),
          py::arg("lower_bound"), py::arg("beta_activation"), py::arg("backend"), py::arg("q"), py::arg("k"),
          py::arg("v"), py::arg("g"), py::arg("beta"), py::arg("A_log"), py::arg("dt_bias"), py::arg("initial_state"),
          py::arg("cu_seqlens"), py::arg("d_o"), py::arg("d_final_state"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
          py::arg("dg"), py::arg("dbeta"), py::arg("dA_log"), py::arg("ddt_bias"), py::arg("dinitial_state"));
    m.def("linear_decode", &linear_decode, "in-place step of cached states (hla::linear_decode)", py::arg("decay"),
          py::arg("update"), py::arg("scale"), py::arg("qk_l2norm"), py::arg("gate_activation"), py::arg("lower_bound"),
          py::arg("beta_activation"), py::arg("backend"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("g"),
          py::arg("beta"), py::arg("A_log"), py::arg("dt_bias"), py::arg("state"), py::arg("state_indices"),
          py::arg("o"));
    m.def("softmax_forward", &softmax_forward, "o (and lse) <- causal/windowed softmax attention (hla::softmax_attention_forward)",
          py::arg("causal"), py::arg("window"), py::arg("scale"), py::arg("backend"), py::arg("q"), py::arg("k"),
          py::arg("v"), py::arg("g"), py::arg("gate"), py::arg("cu_seqlens"), py::arg("o"), py::arg("lse"));
    m.def("softmax_backward", &softmax_backward, "gradients of softmax_forward (hla::softmax_attention_backward)",
          py::arg("causal"), py::arg("window"), py::arg("scale"), py::arg("backend"), py::arg("q"), py::arg("k"),
          py::arg("v"), py::arg("g"), py::arg("gate"), py::arg("cu_seqlens"), py::arg("o"), py::arg("lse"),
          py::arg("d_o"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("dg"), py::arg("dgate"));
    m.def("softmax_kvcache", &softmax_kvcache, "attention against a KV cache, appending k/v (hla::softmax_attention_kvcache)",
          py::arg("causal"), py::arg("window"), py::arg("scale"), py::arg("backend"), py::arg("q"), py::arg("k_cache"),
          py::arg("v_cache"), py::arg("cache_seqlens"), py::arg("k"), py::arg("v"), py::arg("cache_batch_idx"),
          py::arg("block_table"), py::arg("g_cache"), py::arg("g"), py::arg("gate"), py::arg("o"), py::arg("lse"));
    m.def("lightning_attn_log_decay", &lightning_attn_log_decay,
          "MiniMax Lightning per-head log decay [H] f32 (hla::lightning_attn_log_decay)", py::arg("num_heads"),
          py::arg("layer_idx"), py::arg("num_layers"));
    m.def("cuda_available", &hla::cuda_available, "whether this build of libhla can use a CUDA device");
    m.def("set_cuda_stream", [](uintptr_t stream) { hla::set_cuda_stream(reinterpret_cast<void*>(stream)); },
          "the cudaStream_t (as an int, torch.cuda.Stream.cuda_stream) that libhla's CUDA work of this thread goes to",
          py::arg("stream"));
    m.def("num_threads", &hla::num_threads, "worker threads of libhla's CPU ops");
    m.def("set_num_threads", [](int n) { call_hla([&] { hla::set_num_threads(n); }); }, py::arg("n"));
}
