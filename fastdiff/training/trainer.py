"""ADM's two trainers on the shared loop: the diffusion model (hybrid loss, classifier-free
guidance dropout, preview grids) and the noisy-image classifier (with held-out evaluation).

Classifier-free guidance: labels are replaced by the null label with probability
``cfg_dropout``. The null label is the dataset's class count: the model is built with
``num_classes = classes + 1`` (so a 10-class CFG model has the flag ``num_classes 11`` and null
label 10), and the checkpoint metadata records ``null_label``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastdiff.diffusion import GaussianDiffusion
from fastdiff.files import save_grid, to_uint8
from fastdiff.models.presets import build_network

from . import dist
from .checkpoint import SAMPLES, seed_rng
from .config import TrainConfig
from .loop import TrainLoop, stream_key
from .resample import UniformSampler, create_named_schedule_sampler
from .runlog import Meter


class DiffusionTrainer(TrainLoop):
    """Hybrid-loss (L_simple + L_vb with learned sigma) diffusion training, ADM style."""

    kind = "diffusion"

    def __init__(self, config: TrainConfig, dataset):
        num_classes = config.net.num_classes
        seed_rng(config.seed)
        super().__init__(config, dataset, build_network(config.net))
        self.diffusion = GaussianDiffusion.from_config(config.process)
        self.schedule_sampler = create_named_schedule_sampler(
            config.schedule_sampler, self.diffusion.num_timesteps
        )
        self.class_cond = num_classes is not None
        self.null_label = num_classes - 1 if config.cfg_dropout > 0 else None
        self._sample_model = None

    def metadata(self) -> dict:
        return {**super().metadata(), "null_label": self.null_label}

    def _forward(self, x, t, **kwargs):
        with self.autocast():
            out = self.net()(x, t, **kwargs)
        return out.float()

    def compute_loss(self, x, y, gen, dev_gen):
        t, weights = self.schedule_sampler.sample(len(x), gen)
        kwargs = {}
        if self.class_cond:
            if self.null_label is not None:
                drop = (torch.rand(len(y), generator=gen) < self.config.cfg_dropout).to(y.device)
                y = torch.where(drop, torch.full_like(y, self.null_label), y)
            kwargs["y"] = y
        noise = torch.randn(x.shape, generator=dev_gen, device=self.device)
        t, weights = t.to(self.device), weights.to(self.device)
        terms = self.diffusion.training_losses(self._forward, x, t, model_kwargs=kwargs, noise=noise)
        loss = (terms["loss"] * weights).mean()
        return loss, {"t": t, "weight": weights, **{k: v.detach() for k, v in terms.items()}}

    def record(self, t, terms) -> None:
        """The schedule sampler learns the plain losses; the log gets them times their importance
        weights, as guided-diffusion logs them: the loss optimized, an unbiased estimate of the
        uniform-t loss whatever the sampler (unweighted, loss-second-moment's mean jumped up once
        its history filled, since it then draws the timesteps of high loss more often)."""
        weights = terms.pop("weight")
        self.schedule_sampler.update_with_losses(t, terms["loss"])
        for name, values in terms.items():
            self.meter.add_per_t(name, values * weights, t, self.diffusion.num_timesteps)

    def extra_state(self) -> dict:
        return {"schedule_sampler": self.schedule_sampler.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.schedule_sampler.load_state_dict(state["schedule_sampler"])

    def after_step(self) -> None:
        cfg = self.config
        if (
            cfg.sample_every
            and dist.is_main()
            and (self.step % cfg.sample_every == 0 or self.step == cfg.max_steps)
        ):
            self.save_samples(self.out / SAMPLES / f"step_{self.step:07d}.png")

    @torch.no_grad()
    def save_samples(self, path: Path) -> None:
        """A grid from the first EMA (or the raw weights) with a short DDIM schedule, fixed noise."""
        from fastdiff.diffusion import SAMPLERS
        from fastdiff.engines.sampler import Sampler

        cfg = self.config
        if self._sample_model is None:
            self._sample_model = copy.deepcopy(self.model).eval()
        rates = self.ema.rates
        self._sample_model.load_state_dict(
            self.ema.state_dict(self.model, rates[0]) if rates else self.model.state_dict()
        )
        respacing = SAMPLERS["ddim"].respacing(cfg.sample_steps)  # what `fastdiff sample --steps N` runs
        diffusion = GaussianDiffusion.from_config(cfg.process, respacing)
        n = cfg.num_samples
        labels = None
        if self.class_cond:
            classes = cfg.net.num_classes - (1 if self.null_label is not None else 0)
            labels = torch.arange(n, device=self.device) % classes
        gen = torch.Generator(self.device).manual_seed(cfg.seed)
        sampler = Sampler(self._sample_model, diffusion, sampler="ddim", engine="eager", device=self.device)
        with self.autocast():
            x = sampler(labels, num_samples=n, generator=gen)
        save_grid(to_uint8(x), path, ncol=math.ceil(math.sqrt(n)))


class ClassifierTrainer(TrainLoop):
    """ADM's noisy-image classifier: uniform t, q_sample, cross-entropy; accuracy per t quartile.

    The classifier is given the timesteps the diffusion model is (``model_timesteps``: 0..1000
    under rescale_timesteps), as guidance gives them to it when sampling; classifier_train.py gave
    it the plain t, which its own sampling then rescaled."""

    kind = "classifier"

    def __init__(self, config: TrainConfig, dataset, val_dataset=None):
        seed_rng(config.seed)
        super().__init__(config, dataset, build_network(config.net))
        self.diffusion = GaussianDiffusion.from_config(config.process)
        self.schedule_sampler = UniformSampler(self.diffusion.num_timesteps)
        self.num_classes = config.net.num_classes
        self.val_dataset = val_dataset

    def _logits(self, net, x, y, gen, dev_gen):
        t, _ = self.schedule_sampler.sample(len(x), gen)
        t = t.to(self.device)
        noise = torch.randn(x.shape, generator=dev_gen, device=self.device)
        x_t = self.diffusion.q_sample(x, t, noise=noise)
        with self.autocast():
            logits = net(x_t, self.diffusion.model_timesteps(t)).float()
        losses = F.cross_entropy(logits, y, reduction="none")
        rec = {"t": t, "loss": losses.detach(), "acc@1": (logits.argmax(-1) == y).float()}
        if self.num_classes >= 5:
            rec["acc@5"] = (logits.topk(5, dim=-1).indices == y[:, None]).any(-1).float()
        return losses, rec

    def compute_loss(self, x, y, gen, dev_gen):
        losses, rec = self._logits(self.net(), x, y, gen, dev_gen)
        return losses.mean(), rec

    def record(self, t, terms) -> None:
        for name, values in terms.items():
            self.meter.add_per_t(name, values, t, self.diffusion.num_timesteps)

    def after_step(self) -> None:
        cfg = self.config
        if (
            self.val_dataset is not None
            and cfg.eval_every
            and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps)
        ):
            metrics = self.evaluate()
            if dist.is_main():
                row = {"step": self.step, **metrics}
                self.append_log(row)
                tqdm.write(" | ".join(f"{k} {v:.4g}" for k, v in row.items()))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss/accuracy over the whole held-out set at fixed random t per image (the same
        every evaluation; classifier_train.py scored one random batch at new draws each time).

        Under torchrun rank r scores batches r, r + N, ... and every rank sums all of them in
        batch order, so the metrics are one process's with the same micro-batch size, to the bit
        (every rank scored the whole set, N times the work)."""
        self.model.eval()
        n, size = len(self.val_dataset), self.micro
        batches = range(self.rank, math.ceil(n / size), self.world)
        loader = torch.utils.data.DataLoader(
            self.val_dataset, batch_sampler=[range(k * size, min(n, (k + 1) * size)) for k in batches]
        )
        mine = []
        for k, (x, y) in zip(batches, loader):
            key = stream_key(self.config.seed, 2**32, k)
            gen = torch.Generator().manual_seed(key)
            dev_gen = gen if self.device.type == "cpu" else torch.Generator(self.device).manual_seed(key)
            _, rec = self._logits(self.model, x.to(self.device), y.to(self.device), gen, dev_gen)
            t = rec.pop("t").cpu()
            mine.append((k, t, {name: values.cpu() for name, values in rec.items()}))
        self.model.train()
        meter = Meter()
        scored = [batch for share in dist.all_gather_objects(mine) for batch in share]
        for _, t, rec in sorted(scored, key=lambda batch: batch[0]):
            for name, values in rec.items():
                meter.add_per_t(f"val_{name}", values, t, self.diffusion.num_timesteps)
        return meter.flush()
