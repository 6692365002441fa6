"""guided-diffusion's ``fp16_util``: ``MixedPrecisionTrainer`` on torch.amp.

The original keeps fp16 convs in the model and a flattened fp32 copy of the weights
("master params"), scaling the loss by ``2 ** lg_loss_scale``. Here, as in fastdiff's trainer,
the weights stay fp32 (``master_params`` are the model's own parameters) and the model's forward
runs under fp16 autocast, which fastdiff's networks apply where the original puts fp16: the
torso, not the embeddings or the output head. ``torch.amp.GradScaler`` scales the loss: it
starts at ``2 ** initial_lg_loss_scale``, halves on an overflow (the step is skipped, as in the
original) and doubles every ``1 / fp16_scale_growth`` good steps (the original's average
growth). Model checkpoints are the same fp32 state dicts either way. The optimizer's state is
per parameter here and over two flat master parameters there: ``opt_state_dict`` and
``load_opt_state_dict`` convert, so fp16 runs' ``optNNNNNN.pt`` files go both ways too. The
flattening helpers (``make_master_params`` and the like) are not provided.
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
    if hasattr(model, "convert_to_fp32"):  # built with use_fp16: its torso convs are fp16
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
        device_type = self.model_params[0].device.type
        growth_interval = round(1 / fp16_scale_growth) if fp16_scale_growth > 0 else 2**31 - 1
        self.scaler = torch.amp.GradScaler(
            device_type,
            init_scale=2.0**initial_lg_loss_scale,
            growth_factor=2.0,
            backoff_factor=0.5,
            growth_interval=max(1, growth_interval),
            enabled=bool(use_fp16),
        )
        self._initial_lg_loss_scale = initial_lg_loss_scale
        if use_fp16:
            _autocast_forward(model, device_type)

    @property
    def lg_loss_scale(self) -> float:
        """log2 of the loss scale."""
        if not self.use_fp16:
            return self._initial_lg_loss_scale
        return math.log2(self.scaler.get_scale())

    def zero_grad(self) -> None:
        zero_grad(self.model_params)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def optimize(self, opt: torch.optim.Optimizer) -> bool:
        """Step ``opt``; False (and no step) when the fp16 gradients overflowed."""
        if self.use_fp16:
            logger.logkv_mean("lg_loss_scale", self.lg_loss_scale)
            self.scaler.unscale_(opt)
        grad_norm, param_norm = self._compute_norms()
        if self.use_fp16 and check_overflow(grad_norm):
            self.scaler.update()  # backs off on the overflow unscale_ found
            logger.log(f"Found NaN, decreased lg_loss_scale to {self.lg_loss_scale}")
            self.zero_grad()
            return False
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        self.scaler.step(opt)  # opt.step() when fp16 is off
        self.scaler.update()
        return True

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
        """The model's state dict with ``master_params`` (in parameter order) as its parameters."""
        state = self.model.state_dict()
        for (name, _), value in zip(self.model.named_parameters(), master_params, strict=True):
            state[name] = value.detach()
        return state

    def state_dict_to_master_params(self, state_dict) -> list:
        return [state_dict[name] for name, _ in self.model.named_parameters()]

    # ---------------------------------------------------------------- the original's fp16 layout

    def _flat_groups(self) -> list[list[int]]:
        """Indices of the parameters in the original's two fp16 master parameters: scalars and
        vectors flattened into one, matrices into one of shape (1, -1), each in model order."""
        return [
            [i for i, p in enumerate(self.model_params) if p.ndim <= 1],
            [i for i, p in enumerate(self.model_params) if p.ndim > 1],
        ]

    def opt_state_dict(self, opt: torch.optim.Optimizer) -> dict:
        """``opt``'s state dict as the original saves it: over the flat masters in fp16."""
        state = opt.state_dict()
        if not self.use_fp16:
            return state
        flat = {}
        for g, (indices, shape) in enumerate(zip(self._flat_groups(), ((-1,), (1, -1)), strict=True)):
            per_param = [(state["state"].get(i, {}), self.model_params[i]) for i in indices]
            steps = [s["step"] for s, _ in per_param if "step" in s]
            if not steps:  # no step taken yet (an fp16 overflow at the first one): no state
                continue
            flat[g] = {"step": steps[0].clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                parts = [s[key] if key in s else torch.zeros_like(p) for s, p in per_param]
                flat[g][key] = torch.cat([part.reshape(-1) for part in parts]).view(shape)
        groups = [dict(state["param_groups"][0], params=[0, 1])]
        return {"state": flat, "param_groups": groups}

    def load_opt_state_dict(self, opt: torch.optim.Optimizer, state: dict) -> None:
        """Load an optimizer state of either layout (the original's fp16 one is split up)."""
        if len(state["param_groups"][0]["params"]) == 2 and len(self.model_params) != 2:
            per_param = {}
            for g, indices in enumerate(self._flat_groups()):
                flat = state["state"].get(g)
                if flat is None:
                    continue
                sizes = [self.model_params[i].numel() for i in indices]
                split = {k: flat[k].reshape(-1).split(sizes) for k in ("exp_avg", "exp_avg_sq")}
                for j, i in enumerate(indices):
                    shape = self.model_params[i].shape
                    per_param[i] = {
                        "step": flat["step"].clone(),
                        **{k: v[j].view(shape) for k, v in split.items()},
                    }
            params = list(range(len(self.model_params)))
            state = {"state": per_param, "param_groups": [dict(state["param_groups"][0], params=params)]}
        opt.load_state_dict(state)
