"""guided-diffusion's ``fp16_util``: ``MixedPrecisionTrainer`` on torch.amp.

As in fastdiff's trainer, the weights stay fp32 and the model's forward runs under fp16
autocast, which fastdiff's networks apply where the original puts fp16: the torso, not the
embeddings or the output head. What a script can see is the original's: in fp16,
``master_params`` are its two flat fp32 parameters (scalars and vectors in one, matrices in one of
shape (1, -1), each in model order), so an optimizer a script builds over them saves and loads the
original's ``optNNNNNN.pt`` (classifier_train.py saves its own); the model's parameters are views
into them rather than an fp16 copy, so the weights cost no extra memory. ``lg_loss_scale`` follows
the original's schedule (+``fp16_scale_growth`` per good step, -1 on an overflow, which skips the
step), which is what progress.csv logs; ``torch.amp.GradScaler`` applies it (scaling, unscaling
and the overflow check), set to ``2 ** lg_loss_scale`` after every step rather than on its own
growth schedule. The flattening helpers (``make_master_params`` and the like) are not provided.
"""

from __future__ import annotations

import functools
import math

import torch

from ..models.nn import convert_module_to_f16, convert_module_to_f32
from . import logger

__all__ = [
    "INITIAL_LOG_LOSS_SCALE",
    "MixedPrecisionTrainer",
    "check_overflow",
    "convert_module_to_f16",
    "convert_module_to_f32",
    "zero_grad",
]

INITIAL_LOG_LOSS_SCALE = 20.0


def zero_grad(model_params) -> None:
    for p in model_params:
        p.grad = None


def check_overflow(value) -> bool:
    """Whether a norm is inf or NaN."""
    return not math.isfinite(value)


def _autocast_forward(model: torch.nn.Module, device_type: str) -> None:
    """Run ``model``'s forward under fp16 autocast over fp32 weights (the torso computes in fp16),
    returning fp32."""
    if hasattr(model, "convert_to_fp32"):  # the script may have cast its torso (convert_to_fp16)
        model.convert_to_fp32()
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.float16):
            return forward(*args, **kwargs).float()

    model.forward = autocast_forward


class MixedPrecisionTrainer:
    """Backward with loss scaling, and the optimizer step that logs ``grad_norm`` / ``param_norm``
    (and ``lg_loss_scale`` in fp16) to the logger, as the original's."""

    def __init__(
        self, *, model, use_fp16=False, fp16_scale_growth=1e-3, initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE
    ):
        self.model = model
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.model_params = list(model.parameters())
        self.master_params = self.model_params
        self.param_groups_and_shapes = None
        self.lg_loss_scale = initial_lg_loss_scale
        device_type = self.model_params[0].device.type
        self.scaler = torch.amp.GradScaler(
            device_type, init_scale=2.0**initial_lg_loss_scale, enabled=bool(use_fp16)
        )
        if use_fp16:
            _autocast_forward(model, device_type)
            self.param_groups_and_shapes = [
                ([(n, p) for n, p in model.named_parameters() if p.ndim <= 1], (-1,)),
                ([(n, p) for n, p in model.named_parameters() if p.ndim > 1], (1, -1)),
            ]
            self.master_params = [
                self._flat_master(group, shape) for group, shape in self.param_groups_and_shapes
            ]

    @staticmethod
    def _flat_master(group, shape) -> torch.nn.Parameter:
        """One flat fp32 copy of ``group``'s parameters, which then become views into it (an
        optimizer step on the master is a step on the model)."""
        params = [p for _, p in group]
        flat = torch.cat([p.detach().float().reshape(-1) for p in params]) if params else torch.zeros(0)
        master = torch.nn.Parameter(flat.view(shape))
        for p, view in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.data = view.view(p.shape)
        return master

    def zero_grad(self) -> None:
        zero_grad(self.model_params)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def optimize(self, opt: torch.optim.Optimizer) -> bool:
        """Step ``opt``; False (and no step) when the fp16 gradients overflowed."""
        if self.use_fp16:
            logger.logkv_mean("lg_loss_scale", self.lg_loss_scale)
            self._model_grads_to_master_grads()
            self.scaler.unscale_(opt)
        grad_norm, param_norm = self._compute_norms()
        if self.use_fp16 and check_overflow(grad_norm):
            self.lg_loss_scale -= 1
            self.scaler.update(new_scale=2.0**self.lg_loss_scale)
            logger.log(f"Found NaN, decreased lg_loss_scale to {self.lg_loss_scale}")
            zero_grad(self.master_params)
            return False
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        self.scaler.step(opt)  # opt.step() when fp16 is off
        if self.use_fp16:
            zero_grad(self.master_params)
            self.lg_loss_scale += self.fp16_scale_growth
            self.scaler.update(new_scale=2.0**self.lg_loss_scale)
        return True

    def _model_grads_to_master_grads(self) -> None:
        """Each master's gradient: its parameters' gradients (zero where none), flattened; the
        model's are freed, as the next backward starts from none."""
        for master, (group, _) in zip(self.master_params, self.param_groups_and_shapes, strict=True):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in group]
            master.grad = (
                torch.cat([g.float().reshape(-1) for g in grads]).view(master.shape) if grads else None
            )
            for _, p in group:
                p.grad = None

    @torch.no_grad()
    def _compute_norms(self, grad_scale: float = 1.0) -> tuple[float, float]:
        """L2 norms of the gradient (divided by ``grad_scale``, the original's argument for scaled
        gradients; here they are unscaled already) and of the weights, in one host sync."""
        params = self.master_params
        grads = [p.grad for p in params if p.grad is not None]
        norms = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params)).float())]
        norms.append(
            torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
            if grads
            else norms[0] * 0
        )
        param_norm, grad_norm = torch.stack(norms).tolist()
        return grad_norm / grad_scale, param_norm

    def master_params_to_state_dict(self, master_params) -> dict:
        """The model's state dict with ``master_params`` (this trainer's layout: flat in fp16) as
        its parameters."""
        state = self.model.state_dict()
        if self.use_fp16:
            master_params = [
                part.view(p.shape)
                for master, (group, _) in zip(master_params, self.param_groups_and_shapes, strict=True)
                for part, (_, p) in zip(
                    master.detach().reshape(-1).split([p.numel() for _, p in group]), group, strict=True
                )
            ]
            names = [n for group, _ in self.param_groups_and_shapes for n, _ in group]
        else:
            names = [n for n, _ in self.model.named_parameters()]
        for name, value in zip(names, master_params, strict=True):
            state[name] = value.detach()
        return state

    def state_dict_to_master_params(self, state_dict) -> list:
        """``state_dict``'s parameters in this trainer's layout (flat in fp16)."""
        if not self.use_fp16:
            return [state_dict[name] for name, _ in self.model.named_parameters()]
        return [
            torch.cat([state_dict[n].float().reshape(-1) for n, _ in group]).view(shape)
            for group, shape in self.param_groups_and_shapes
        ]
