// Thin torch adapter for the torch-free kernels in ada_group_norm.cu: checks and converts
// tensors (layout, dtype, fp32 parameters), allocates outputs and scratch with torch's caching
// allocator, and launches on the current stream. Built as fastdiff._C (setup.py) or
// fastdiff_cuda (JIT, fastdiff/ops/_cuda_build.py).
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <optional>
#include <tuple>

#include "ada_group_norm.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

fastdiff::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return fastdiff::DType::kFloat32;
    case at::kHalf:
      return fastdiff::DType::kFloat16;
    case at::kBFloat16:
      return fastdiff::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastdiff ada_group_norm: unsupported dtype ", t, " (float32/float16/bfloat16)");
  }
}

// NCHW-contiguous wins when a tensor is both (H*W == 1 or C == 1): the memory is the same.
at::MemoryFormat pick_format(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

fastdiff::AdaGNShape make_shape(const at::Tensor& x, int64_t groups, at::MemoryFormat fmt, bool silu) {
  TORCH_CHECK(x.is_cuda(), "fastdiff ada_group_norm: x must be a CUDA tensor");
  TORCH_CHECK(x.dim() >= 2, "fastdiff ada_group_norm: x must be [N, C, ...]");
  fastdiff::AdaGNShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.HW = 1;
  for (int64_t d = 2; d < x.dim(); ++d) s.HW *= x.size(d);
  s.G = groups;
  TORCH_CHECK(groups > 0 && s.C % groups == 0, "fastdiff ada_group_norm: C=", s.C,
              " is not divisible by num_groups=", groups);
  TORCH_CHECK(s.C * s.HW < (int64_t{1} << 31), "fastdiff ada_group_norm: C*H*W too large for one sample");
  s.channels_last = fmt != at::MemoryFormat::Contiguous;
  s.dtype = kernel_dtype(x.scalar_type());
  s.act = silu ? fastdiff::Activation::kSiLU : fastdiff::Activation::kNone;
  return s;
}

// Parameters go to the kernels as contiguous fp32 (they are tiny; x may be fp16 while the
// norm's parameters stay fp32, as in guided-diffusion).
at::Tensor param_f32(const OptTensor& t, int64_t numel, const at::Tensor& x, const char* name) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->numel() == numel, "fastdiff ada_group_norm: ", name, " has ", t->numel(),
              " elements, expected ", numel);
  TORCH_CHECK(t->device() == x.device(), "fastdiff ada_group_norm: ", name, " is on another device");
  return t->to(at::kFloat).contiguous();
}

const float* fptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
float* fptr_mut(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

void check(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "fastdiff ada_group_norm ", what, ": ", cudaGetErrorString(e));
}

void maybe_poison(bool poison, std::initializer_list<at::Tensor> ts) {
  if (!poison) return;
  for (const auto& t : ts) {
    if (t.defined()) t.fill_(std::numeric_limits<float>::quiet_NaN());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x_in, int64_t num_groups,
                                                       const OptTensor& weight, const OptTensor& bias,
                                                       const OptTensor& scale, const OptTensor& shift,
                                                       double eps, bool silu, const OptTensor& out,
                                                       int64_t splits, bool poison) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::MemoryFormat fmt = pick_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const fastdiff::AdaGNShape s = make_shape(x, num_groups, fmt, silu);
  const at::Tensor w = param_f32(weight, s.C, x, "weight");
  const at::Tensor b = param_f32(bias, s.C, x, "bias");
  const at::Tensor sc = param_f32(scale, s.N * s.C, x, "scale");
  const at::Tensor sh = param_f32(shift, s.N * s.C, x, "shift");

  at::Tensor y;
  if (out.has_value()) {
    y = *out;
    TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type() && y.device() == x.device() &&
                    y.is_contiguous(fmt),
                "fastdiff ada_group_norm: out must match x in shape, dtype, device and memory format");
  } else {
    y = at::empty(x.sizes(), x.options().memory_format(fmt));
  }
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({s.N, s.G}, f32);
  at::Tensor rstd = at::empty({s.N, s.G}, f32);
  maybe_poison(poison, {y, mean, rstd});
  if (x.numel() == 0) return {y, mean, rstd};

  const int n_splits = fastdiff::ada_group_norm_splits(s, static_cast<int>(splits));
  at::Tensor ws = at::empty({static_cast<int64_t>(fastdiff::ada_group_norm_workspace_bytes(s, n_splits, false))},
                            x.options().dtype(at::kByte));
  check(fastdiff::ada_group_norm_forward(s, x.data_ptr(), fptr(w), fptr(b), fptr(sc), fptr(sh),
                                         static_cast<float>(eps), y.data_ptr(), mean.data_ptr<float>(),
                                         rstd.data_ptr<float>(), n_splits, ws.data_ptr(),
                                         c10::cuda::getCurrentCUDAStream().stream()),
        "forward");
  return {y, mean, rstd};
}

OptTensor grad_like(const at::Tensor& g, const OptTensor& p) {
  if (!p.has_value()) return std::nullopt;
  return g.reshape(p->sizes()).to(p->scalar_type());
}

std::tuple<at::Tensor, OptTensor, OptTensor, OptTensor, OptTensor> backward(
    const at::Tensor& dy_in, const at::Tensor& x_in, int64_t num_groups, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& scale, const OptTensor& shift, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, bool silu, int64_t splits, bool poison) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::MemoryFormat fmt = pick_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const fastdiff::AdaGNShape s = make_shape(x, num_groups, fmt, silu);
  TORCH_CHECK(dy_in.sizes() == x.sizes(), "fastdiff ada_group_norm: dy and x shapes differ");
  const at::Tensor dy = dy_in.to(x.scalar_type()).contiguous(fmt);
  const at::Tensor w = param_f32(weight, s.C, x, "weight");
  const at::Tensor b = param_f32(bias, s.C, x, "bias");
  const at::Tensor sc = param_f32(scale, s.N * s.C, x, "scale");
  const at::Tensor sh = param_f32(shift, s.N * s.C, x, "shift");
  const at::Tensor mean = param_f32(mean_in, s.N * s.G, x, "mean");
  const at::Tensor rstd = param_f32(rstd_in, s.N * s.G, x, "rstd");

  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor dw = weight.has_value() ? at::empty({s.C}, f32) : at::Tensor();
  at::Tensor db = bias.has_value() ? at::empty({s.C}, f32) : at::Tensor();
  at::Tensor dsc = scale.has_value() ? at::empty({s.N, s.C}, f32) : at::Tensor();
  at::Tensor dsh = shift.has_value() ? at::empty({s.N, s.C}, f32) : at::Tensor();
  maybe_poison(poison, {dx, dw, db, dsc, dsh});
  if (x.numel() == 0) {
    // No elements: every gradient is an empty or zero sum.
    dx.zero_();
    for (auto* t : {&dw, &db, &dsc, &dsh}) {
      if (t->defined()) t->zero_();
    }
  } else {
    const int n_splits = fastdiff::ada_group_norm_splits(s, static_cast<int>(splits));
    at::Tensor ws = at::empty({static_cast<int64_t>(fastdiff::ada_group_norm_workspace_bytes(s, n_splits, true))},
                              x.options().dtype(at::kByte));
    check(fastdiff::ada_group_norm_backward(s, dy.data_ptr(), x.data_ptr(), fptr(w), fptr(b), fptr(sc),
                                            fptr(sh), fptr(mean), fptr(rstd), dx.data_ptr(), fptr_mut(dw),
                                            fptr_mut(db), fptr_mut(dsc), fptr_mut(dsh), n_splits, ws.data_ptr(),
                                            c10::cuda::getCurrentCUDAStream().stream()),
          "backward");
  }
  return {dx, grad_like(dw, weight), grad_like(db, bias), grad_like(dsc, scale), grad_like(dsh, shift)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff CUDA kernels (fused adaptive GroupNorm + SiLU)";
  m.def("ada_group_norm_forward", &forward, "-> (y, mean, rstd)", py::arg("x"), py::arg("num_groups"),
        py::arg("weight"), py::arg("bias"), py::arg("scale"), py::arg("shift"), py::arg("eps"),
        py::arg("silu"), py::arg("out") = py::none(), py::arg("splits") = 0, py::arg("poison") = false);
  m.def("ada_group_norm_backward", &backward, "-> (dx, dweight, dbias, dscale, dshift)", py::arg("dy"),
        py::arg("x"), py::arg("num_groups"), py::arg("weight"), py::arg("bias"), py::arg("scale"),
        py::arg("shift"), py::arg("mean"), py::arg("rstd"), py::arg("silu"), py::arg("splits") = 0,
        py::arg("poison") = false);
}
