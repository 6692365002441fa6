"""guided-diffusion's ``train_util``: its ``TrainLoop`` on fastdiff's process, EMA and files.

What a script sees is the original's: the same arguments, the same loop (``run_loop`` runs until
``lr_anneal_steps``, or forever without it; saves every ``save_interval`` steps from step 0),
the same log keys (loss terms and their timestep quartiles, ``grad_norm``, ``param_norm``,
``step``, ``samples``), and the same files in ``get_blob_logdir()``: ``modelNNNNNN.pt``,
``ema_RATE_NNNNNN.pt`` and ``optNNNNNN.pt``, torch.save'd state dicts the original loads, with
the original's numbering (a save in the loop at step N follows N + 1 updates, the final one N;
a resume from either starts its log at step N). Randomness is the original's too: timesteps
from numpy's global RNG, noise and data order from torch's, so a seeded script gives the
original's losses.

Built on fastdiff: the losses are ``GaussianDiffusion.training_losses``, the averages
``training.EMA``, the files written atomically (``training.checkpoint.save_torch``), and
mixed precision ``fp16_util.MixedPrecisionTrainer`` (torch.amp). fastdiff's own
``training.TrainLoop`` is not used: it keys every draw by (seed, step) and owns the data order,
which is what makes its runs resumable bit for bit but could not give the original's draws.
Unlike the original, a multi-process CPU run (gloo) synchronises its gradients with DDP, and a
missing resume checkpoint is a one-line error.
"""

from __future__ import annotations

import functools
import os

import torch
from torch.optim import AdamW

from ..training import dist
from ..training.checkpoint import save_torch
from ..training.config import parse_ema_rates
from ..training.ema import EMA
from ..training.loop import TrainingError
from . import dist_util, logger
from .fp16_util import INITIAL_LOG_LOSS_SCALE, MixedPrecisionTrainer
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler

# The original's own names, and those it imports from its package (it has no ``__all__``, so
# ``from guided_diffusion.train_util import *`` gives those too).
__all__ = [
    "INITIAL_LOG_LOSS_SCALE",
    "LossAwareSampler",
    "MixedPrecisionTrainer",
    "TrainLoop",
    "UniformSampler",
    "find_ema_checkpoint",
    "find_resume_checkpoint",
    "get_blob_logdir",
    "log_loss_dict",
    "parse_resume_step_from_filename",
    "update_ema",
]


class TrainLoop:
    """The original's diffusion training loop (see the module docstring)."""

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr,
        ema_rate,
        log_interval,
        save_interval,
        resume_checkpoint,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        schedule_sampler=None,
        weight_decay=0.0,
        lr_anneal_steps=0,
    ):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = (
            [ema_rate] if isinstance(ema_rate, float) else list(parse_ema_rates(ema_rate, "ema_rate"))
        )
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.resume_checkpoint = resume_checkpoint
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps

        self.step = 0
        self.resume_step = 0
        self.global_batch = self.batch_size * dist.world_size()
        self.sync_cuda = torch.cuda.is_available()

        # Before loading, as the original: a resume loads into the masters' views of the weights.
        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model, use_fp16=self.use_fp16, fp16_scale_growth=fp16_scale_growth
        )
        self._load_and_sync_parameters()
        self.opt = AdamW(self.mp_trainer.master_params, lr=self.lr, weight_decay=self.weight_decay)
        self.ema = EMA(self.model, tuple(self.ema_rate))  # the current weights, or the resumed ones
        if self.resume_step:
            self._load_optimizer_state()
            for rate in self.ema_rate:
                self._load_ema_parameters(rate)

        self.use_ddp = dist.world_size() > 1
        if self.use_ddp:
            self.ddp_model = dist.data_parallel(
                self.model, dist_util.dev(), bucket_cap_mb=128, find_unused_parameters=False
            )
        else:
            self.ddp_model = self.model

    @property
    def ema_params(self) -> list[list[torch.Tensor]]:
        """One list of averaged parameters per rate (the original's attribute)."""
        return [self.ema.params[rate] for rate in self.ema_rate]

    # ---------------------------------------------------------------- resume

    def _main_checkpoint(self):
        return find_resume_checkpoint() or self.resume_checkpoint

    def _load_and_sync_parameters(self) -> None:
        checkpoint = self._main_checkpoint()
        if checkpoint:
            if not os.path.isfile(checkpoint):
                raise TrainingError(f"resume checkpoint not found: {checkpoint}")
            self.resume_step = parse_resume_step_from_filename(checkpoint)
            logger.log(f"loading model from checkpoint: {checkpoint}...")
            state = dist_util.load_state_dict(checkpoint, map_location=dist_util.dev())
            self.model.load_state_dict(state)
        dist.broadcast_module(self.model)  # every rank starts from rank 0's weights

    def _load_ema_parameters(self, rate) -> None:
        path = find_ema_checkpoint(self._main_checkpoint(), self.resume_step, rate)
        if path:
            logger.log(f"loading EMA from checkpoint: {path}...")
            self.ema.load(rate, dist_util.load_state_dict(path, map_location=dist_util.dev()))

    def _load_optimizer_state(self) -> None:
        path = os.path.join(os.path.dirname(self._main_checkpoint()), f"opt{self.resume_step:06}.pt")
        if os.path.exists(path):
            logger.log(f"loading optimizer state from checkpoint: {path}")
            state = dist_util.load_state_dict(path, map_location=dist_util.dev())
            self.opt.load_state_dict(state)

    # ---------------------------------------------------------------- the loop

    def run_loop(self) -> None:
        while not self.lr_anneal_steps or self.step + self.resume_step < self.lr_anneal_steps:
            batch, cond = next(self.data)
            self.run_step(batch, cond)
            if self.step % self.log_interval == 0:
                logger.dumpkvs()
            if self.step % self.save_interval == 0:
                self.save()
                # The original's hook for integration tests: stop after the first save past step 0.
                if os.environ.get("DIFFUSION_TRAINING_TEST", "") and self.step > 0:
                    return
            self.step += 1
        if (self.step - 1) % self.save_interval != 0:  # the last step was not saved yet
            self.save()

    def run_step(self, batch, cond) -> None:
        self.forward_backward(batch, cond)
        if self.mp_trainer.optimize(self.opt):
            self._update_ema()
        self._anneal_lr()
        self.log_step()

    def forward_backward(self, batch, cond) -> None:
        """Accumulate the gradient of the batch's weighted loss, one micro-batch at a time (each
        micro-batch's mean loss, summed, as the original)."""
        self.mp_trainer.zero_grad()
        device = dist_util.dev()
        for i in range(0, batch.shape[0], self.microbatch):
            micro = batch[i : i + self.microbatch].to(device)
            micro_cond = {k: v[i : i + self.microbatch].to(device) for k, v in cond.items()}
            last = i + self.microbatch >= batch.shape[0]
            t, weights = self.schedule_sampler.sample(micro.shape[0], device)
            compute_losses = functools.partial(
                self.diffusion.training_losses, self.ddp_model, micro, t, model_kwargs=micro_cond
            )
            if last or not self.use_ddp:
                losses = compute_losses()
            else:
                with self.ddp_model.no_sync():
                    losses = compute_losses()
            if isinstance(self.schedule_sampler, LossAwareSampler):
                self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
            loss = (losses["loss"] * weights).mean()
            log_loss_dict(self.diffusion, t, {k: v * weights for k, v in losses.items()})
            self.mp_trainer.backward(loss)

    def _update_ema(self) -> None:
        self.ema.update(self.model, self.step)

    def _anneal_lr(self) -> None:
        """The learning rate of the next step: linear decay to 0 at ``lr_anneal_steps``."""
        if not self.lr_anneal_steps:
            return
        lr = self.lr * (1 - (self.step + self.resume_step) / self.lr_anneal_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr

    def log_step(self) -> None:
        logger.logkv("step", self.step + self.resume_step)
        logger.logkv("samples", (self.step + self.resume_step + 1) * self.global_batch)

    def save(self) -> None:
        """modelNNNNNN.pt, ema_RATE_NNNNNN.pt per rate and optNNNNNN.pt, from rank 0."""
        step = self.step + self.resume_step
        if dist.is_main():
            folder = get_blob_logdir()
            logger.log("saving model 0...")
            model_state = self.mp_trainer.master_params_to_state_dict(self.mp_trainer.master_params)
            save_torch(model_state, os.path.join(folder, f"model{step:06d}.pt"))
            for rate in self.ema_rate:
                logger.log(f"saving model {rate}...")
                save_torch(
                    self.ema.state_dict(self.model, rate), os.path.join(folder, f"ema_{rate}_{step:06d}.pt")
                )
            save_torch(self.opt.state_dict(), os.path.join(folder, f"opt{step:06d}.pt"))
        dist.barrier()


def parse_resume_step_from_filename(filename) -> int:
    """The NNNNNN of ``.../modelNNNNNN.pt`` (0 when the name has no such number)."""
    _, found, tail = str(filename).rpartition("model")
    if not found:
        return 0
    digits = tail.split(".")[0]
    return int(digits) if digits.isdigit() else 0


def get_blob_logdir():
    """Where checkpoints go: the logger's folder (replace this function to send them elsewhere)."""
    return logger.get_dir()


def find_resume_checkpoint():
    """A checkpoint to resume from without ``resume_checkpoint``: none (replace to discover one)."""
    return None


def find_ema_checkpoint(main_checkpoint, step, rate):
    """``ema_RATE_NNNNNN.pt`` beside ``main_checkpoint``, if it exists."""
    if main_checkpoint is None:
        return None
    path = os.path.join(os.path.dirname(main_checkpoint), f"ema_{rate}_{step:06d}.pt")
    return path if os.path.exists(path) else None


def log_loss_dict(diffusion, ts, losses) -> None:
    """Each term's batch mean, and its mean per timestep quartile (``KEY_q0`` .. ``KEY_q3``), as
    running means of the logger's current row."""
    quartiles = (4 * ts.detach().cpu().numpy() // diffusion.num_timesteps).tolist()
    for key, values in losses.items():
        logger.logkv_mean(key, values.mean().item())
        for quartile, value in zip(quartiles, values.detach().cpu().tolist(), strict=True):
            logger.logkv_mean(f"{key}_q{quartile}", value)
