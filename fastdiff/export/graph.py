"""The guided denoiser as one autograd-free graph: the UNet and the classifier's input gradient.

An upsampler (ADM-U) takes its low-resolution image as one more input, ``low_res``, at the small
size; the model's own bilinear upsampling of it to x's size is traced into the graph as PyTorch's
decomposition of ``F.interpolate`` (index arithmetic and gathers, the same half-pixel sampling;
the tracer's Python dispatcher decomposes it, so there is no ONNX Resize), so a runtime feeds
the small images as they are.

``GuidedDenoiser`` computes, for a batch, what every sampler needs from the networks: the raw
model output (classifier-free guidance already mixed in) and ``scale * d/dx log p(y | x_t)``.
DDPM shifts its mean by variance * gradient and DDIM / DPM-Solver++ shift eps by
sqrt(1 - alpha_bar) * gradient (gaussian.py ``condition_mean`` / ``condition_score``), so that
boundary serves all samplers and keeps the process tables out of the graph.

The gradient is turned into ordinary ops by tracing the forward *and* autograd's backward with
``make_fx`` (a symbolic batch, every other size static), with the backward ops the ONNX
translator lacks decomposed here: a convolution's input gradient is a transposed convolution, an
average pool's an upsample.
The traced graph then exports like any forward-only module.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff.diffusion.guidance import ClassifierFreeGuidance
from fastdiff.models.nn import InDtype
from fastdiff.models.unet import SuperResModel
from fastdiff.ops.ada_group_norm.module import AdaGroupNormSiLU, GroupNorm
from fastdiff.ops.ada_group_norm.reference import ada_group_norm_reference
from fastdiff.ops.attention import QKVAttention, QKVAttentionLegacy
from fastdiff.ops.attention.reference import split_heads

aten = torch.ops.aten

GUIDANCE_KINDS = ("none", "classifier", "cfg", "classifier+cfg")


def guidance_kind(classifier: bool, cfg: bool) -> str:
    return GUIDANCE_KINDS[int(classifier) + 2 * int(cfg)]


# ------------------------------------------------------------------ export forms of the ops


def matmul_attention(qkv: Tensor, num_heads: int, order: str) -> Tensor:
    """ADM attention as matmul -> softmax -> matmul with d**-1/4 folded into q and k (the form
    TensorRT fuses into one attention kernel); same numbers as ``attention_reference``."""
    q, k, v = split_heads(qkv, num_heads, order)  # [B*H, d, T]
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    weight = torch.matmul((q * scale).transpose(1, 2), k * scale)  # [B*H, T, T]
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    return torch.matmul(v, weight.transpose(1, 2)).reshape(qkv.shape[0], -1, qkv.shape[2])


def _attention_forward(module: QKVAttention | QKVAttentionLegacy):
    return lambda qkv: matmul_attention(qkv, module.n_heads, module.order)


def _group_norm_forward(module: GroupNorm):
    # The plain PyTorch chain (F.group_norm: InstanceNormalization form in ONNX), never a kernel.
    def forward(x: Tensor, scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        args = (module.weight, module.bias, scale, shift, module.eps, module.activation)
        return ada_group_norm_reference(x, module.num_groups, *args)

    return forward


def export_form(net: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of ``net`` on the CPU in ``dtype``, eval, without parameter gradients, whose fused
    ops run as the plain tensor math an exporter translates (the original is left untouched)."""
    net = copy.deepcopy(net).to(device="cpu", dtype=dtype).eval().requires_grad_(False)
    for m in net.modules():
        if isinstance(m, (QKVAttention, QKVAttentionLegacy)):
            m.forward = _attention_forward(m)
        elif isinstance(m, (GroupNorm, AdaGroupNormSiLU)):
            m.forward = _group_norm_forward(m)
    return net


# ------------------------------------------------------------------ backward decompositions


def _convolution_backward(
    grad_output, input, weight, _bias_sizes, stride, padding, dilation, transposed, _out_pad, groups, mask
):
    """Input gradient of a convolution: the transposed convolution with the same weight (the
    weights are constants here, so their gradients are never asked for)."""
    if transposed or mask[1] or mask[2]:
        raise NotImplementedError("export traces input gradients of plain convolutions only")
    nd = input.dim() - 2
    k = weight.shape[2:]
    # The rows a strided convolution skipped at the end come back as output padding.
    extra = [
        input.shape[2 + i]
        - ((grad_output.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1)
        for i in range(nd)
    ]
    transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    return transpose(grad_output, weight, None, stride, padding, extra, groups, dilation), None, None


def _avg_pool2d_backward(
    grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
):
    """Average pooling with kernel == stride (ADM's downsampler): the gradient is a nearest
    upsample divided by the window, zero where the floor mode dropped rows."""
    kh, kw = kernel_size if len(kernel_size) == 2 else (kernel_size[0], kernel_size[0])
    stride = tuple(stride) or (kh, kw)
    if len(stride) == 1:
        stride = (stride[0], stride[0])
    if tuple(stride) != (kh, kw) or any(padding) or ceil_mode:
        raise NotImplementedError("export traces average pools with kernel == stride and no padding")
    grad = F.interpolate(grad_output, scale_factor=(kh, kw), mode="nearest") / (divisor_override or kh * kw)
    h, w = input.shape[-2:]
    if grad.shape[-2:] != (h, w):
        grad = F.pad(grad, (0, w - grad.shape[-1], 0, h - grad.shape[-2]))
    return grad


def _adaptive_avg_pool2d_backward(grad_output, input):
    """Global average pooling (output 1x1): the gradient spread evenly over the input."""
    if tuple(grad_output.shape[-2:]) != (1, 1):
        raise NotImplementedError("export traces adaptive average pools to 1x1 only")
    h, w = input.shape[-2:]
    return grad_output.expand(input.shape) / (h * w)


def decompositions() -> dict:
    """The table ``make_fx`` traces the gradient with: backward ops in ops the exporter knows."""
    from torch._decomp import get_decompositions

    table = get_decompositions(
        [
            aten.native_group_norm_backward,
            aten.silu_backward,
            aten.sigmoid_backward,
            aten.threshold_backward,
            aten._softmax_backward_data,
            aten._log_softmax_backward_data,
        ]
    )
    table[aten.convolution_backward.default] = _convolution_backward
    table[aten.avg_pool2d_backward.default] = _avg_pool2d_backward
    table[aten._adaptive_avg_pool2d_backward.default] = _adaptive_avg_pool2d_backward
    return table


# ------------------------------------------------------------------ the denoiser


def classifier_gradient(classifier: nn.Module, x: Tensor, t: Tensor, y: Tensor, scale: Tensor) -> Tensor:
    """scale * d/dx log_softmax(classifier(x, t))[y], as ClassifierGuidance, with the label picked
    by a one-hot product: indexing by ``arange(len(x))`` would fix the traced batch size, and the
    product's backward is a multiply where the index's is a scatter."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
        classes = torch.arange(log_probs.shape[1], device=y.device)
        one_hot = (y.view(-1, 1) == classes.view(1, -1)).to(log_probs.dtype)
        gradient = torch.autograd.grad((log_probs * one_hot).sum(), x_in)[0]
    return gradient * scale


@dataclass(frozen=True)
class DenoiserSignature:
    """Which inputs and outputs a guided denoiser graph has, by name, in order."""

    class_cond: bool
    classifier: bool
    cfg: bool
    superres: bool = False  # an upsampler's graph: it takes low_res

    @property
    def guidance(self) -> str:
        return guidance_kind(self.classifier, self.cfg)

    @property
    def kind(self) -> str:
        return "superres" if self.superres else "base"

    @property
    def needs_labels(self) -> bool:
        return self.class_cond or self.classifier or self.cfg

    @property
    def inputs(self) -> list[str]:
        names = ["x_t", "timestep"]
        if self.superres:
            names.append("low_res")
        if self.needs_labels:
            names.append("labels")
        if self.classifier:
            names.append("classifier_scale")
        if self.cfg:
            names.append("cfg_scale")
        return names

    @property
    def outputs(self) -> list[str]:
        return ["model_output", "gradient"] if self.classifier else ["model_output"]


def input_shapes(
    signature: DenoiserSignature, image_shape: Sequence[int], low_res_shape: Sequence[int] | None = None
) -> dict[str, tuple[int, ...]]:
    """Each batch-dynamic input's shape after the batch dimension (the scalar scales have none):
    what tracing, the runtimes' checks and TensorRT's profile all go by."""
    shapes = {"x_t": tuple(image_shape), "timestep": (), "labels": ()}
    if signature.superres:
        if low_res_shape is None:
            raise ValueError("a super-resolution signature needs the low_res shape")
        shapes["low_res"] = tuple(low_res_shape)
    return {name: shapes[name] for name in signature.inputs if name in shapes}


class GuidedDenoiser(nn.Module):
    """(x_t, timestep[, low_res][, labels][, classifier_scale][, cfg_scale]) -> (model_output[,
    gradient]).

    ``timestep`` is the model timestep (the original step, float); ``low_res`` an upsampler's
    small image in [-1, 1]; ``labels`` int64; the scales are scalars, so one graph serves every
    guidance strength. With ``null_label`` the model runs classifier-free guidance (the
    conditional and unconditional halves as one batch).
    """

    def __init__(
        self,
        model: nn.Module,
        classifier: nn.Module | None = None,
        null_label: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.model = export_form(model, dtype)
        self.classifier = None if classifier is None else export_form(classifier, dtype)
        if dtype != torch.float32:
            self.model = InDtype(self.model, dtype)
            if self.classifier is not None:
                self.classifier = InDtype(self.classifier, dtype)
        self.class_cond = getattr(model, "num_classes", None) is not None
        if null_label is not None and not self.class_cond:
            raise ValueError("classifier-free guidance needs a class-conditional model")
        self.cfg = None if null_label is None else ClassifierFreeGuidance(self.model, 1.0, null_label)
        superres = isinstance(model, SuperResModel)
        self.signature = DenoiserSignature(
            self.class_cond, classifier is not None, null_label is not None, superres
        )

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        named = dict(zip(self.signature.inputs, inputs))
        x, t, y = named["x_t"], named["timestep"], named.get("labels")
        kwargs = {"low_res": named["low_res"]} if self.signature.superres else {}
        if self.cfg is not None:
            self.cfg.scale = named["cfg_scale"]  # a graph input, not a traced constant
            out = self.cfg(x, t, y=y, **kwargs)
        else:
            out = self.model(x, t, y=y, **kwargs) if self.class_cond else self.model(x, t, **kwargs)
        if self.classifier is None:
            return (out,)
        return out, classifier_gradient(self.classifier, x, t, y, named["classifier_scale"])


def example_inputs(
    signature: DenoiserSignature,
    image_shape: Sequence[int],
    batch: int = 2,
    seed: int = 0,
    low_res_shape: Sequence[int] | None = None,
):
    """Inputs of a denoiser graph for a batch (tracing, validation): noise, spread timesteps,
    uniform low-res images in [-1, 1], labels 0..n-1, scales 1.5."""
    g = torch.Generator().manual_seed(seed)
    shapes = input_shapes(signature, image_shape, low_res_shape)
    values = {
        "x_t": torch.randn(batch, *image_shape, generator=g),
        "timestep": torch.linspace(10.0, 900.0, batch).round(),
        "labels": torch.arange(batch) % 2,
        "classifier_scale": torch.tensor(1.5),
        "cfg_scale": torch.tensor(1.5),
    }
    if "low_res" in shapes:
        values["low_res"] = torch.rand(batch, *shapes["low_res"], generator=g) * 2 - 1
    return tuple(values[name] for name in signature.inputs)


def _batch_symbolic(inputs: Sequence[Tensor]) -> list[Tensor]:
    """Fake copies of ``inputs`` sharing one symbolic batch size (dim 0 of every batched input);
    every other size is static. make_fx's own symbolic mode makes every size a symbol, and its
    shape arithmetic over symbolic channels and pixels made the bundled model's whole export take
    121 s against 94 s (one thread; the same graph)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    first = inputs[0]
    sizes = [DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (first.dim() - 1)
    fake = mode.from_tensor(first, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))
    batch = fake.shape[0]
    with mode:
        rest = [torch.empty((batch, *t.shape[1:]) if t.dim() else (), dtype=t.dtype) for t in inputs[1:]]
    return [fake, *rest]


def trace(denoiser: GuidedDenoiser, inputs: Sequence[Tensor]) -> torch.fx.GraphModule:
    """The denoiser's forward and the classifier's backward as one graph of forward ops, with a
    symbolic batch (so the exported graph takes any batch size); ``inputs[0]`` is x_t, batched."""
    from torch.fx.experimental.proxy_tensor import make_fx

    # The networks' weights enter as constants: only the inputs are symbolic.
    with torch.no_grad():
        tracer = make_fx(
            denoiser,
            decomposition_table=decompositions(),
            tracing_mode="symbolic",
            _allow_non_fake_inputs=True,
        )
        return tracer(*_batch_symbolic(inputs))


__all__ = [
    "GUIDANCE_KINDS",
    "DenoiserSignature",
    "GuidedDenoiser",
    "classifier_gradient",
    "decompositions",
    "example_inputs",
    "export_form",
    "input_shapes",
    "matmul_attention",
    "trace",
]
