"""Exponential moving averages of a model's parameters (ADM keeps one per rate)."""

from __future__ import annotations

import torch


@torch.no_grad()
def update_ema(targets, sources, rate: float) -> None:
    """``target = rate * target + (1 - rate) * source``, in place, for each pair."""
    targets = list(targets)
    torch._foreach_mul_(targets, rate)
    torch._foreach_add_(targets, [s.detach().to(t.dtype) for t, s in zip(targets, sources)], alpha=1 - rate)


class EMA:
    """fp32 exponential moving averages of the parameters, one per rate:
    ``ema = rate * ema + (1 - rate) * param`` after every optimizer step (as ADM).

    With ``warmup`` the rate at step n is ``min(rate, (1 + n) / (10 + n))``: ADM's plain rate keeps
    ``rate**n`` of the random initialisation (8% for 0.999 after 2,500 steps), which makes the
    averages of short runs unusable; the warm-up forgets it within a few hundred steps."""

    def __init__(self, model: torch.nn.Module, rates: tuple[float, ...], warmup: bool = False):
        self.rates = tuple(rates)
        self.warmup = warmup
        self.names = [n for n, _ in model.named_parameters()]
        self.params = {r: [p.detach().float().clone() for p in model.parameters()] for r in self.rates}

    def rate_at(self, rate: float, step: int) -> float:
        return min(rate, (1 + step) / (10 + step)) if self.warmup else rate

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        src = [p.detach().float() for p in model.parameters()]
        for rate, ema in self.params.items():
            update_ema(ema, src, self.rate_at(rate, step))

    def state_dict(self, model: torch.nn.Module, rate: float) -> dict[str, torch.Tensor]:
        """The model's full state dict with the parameters replaced by this rate's average."""
        sd = dict(model.state_dict())
        for name, p in zip(self.names, self.params[rate]):
            sd[name] = p.to(sd[name].dtype)
        return sd

    @torch.no_grad()
    def load(self, rate: float, state: dict[str, torch.Tensor]) -> None:
        for name, p in zip(self.names, self.params[rate]):
            p.copy_(state[name])
