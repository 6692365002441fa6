"""ADM's diffusion trainer (improved-diffusion's TrainLoop), made exactly resumable and sharded.

Every random draw of a step (timesteps, noise, label dropout, flips, dropout masks) comes from a
stream keyed by ``(seed, step, global micro-batch index)`` and the data order is a function of
``(seed, step)``. So a run resumed from a checkpoint repeats the uninterrupted run bit for bit,
and N processes with the same global batch and micro-batch size see the same samples, noise
and timesteps as one process.

Deviations from guided-diffusion, on purpose:
- micro-batch losses are weighted by their share of the batch, so splitting a batch into
  micro-batches does not change the gradient (the original summed micro-batch means);
- mixed precision is autocast over fp32 master weights (``use_fp16`` model flag is forced off);
- classifier-free guidance: labels are replaced by the null class with probability
  ``cfg_dropout``. The null label is the dataset's class count: the model is built with
  ``num_classes = classes + 1`` (so a 10-class CFG model has the flag ``num_classes 11``
  and null label 10), and the checkpoint metadata records ``null_label``.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from fastdiff.diffusion import create_diffusion_from_flags
from fastdiff.imageio import atomic_write, is_temp_file, save_grid, to_uint8
from fastdiff.models.presets import create_classifier, create_unet

from . import checkpoint as ckpt
from . import dist
from .data import DataError, ShardedSampler, fingerprint
from .resample import UniformSampler, create_named_schedule_sampler

PRECISIONS = ("fp32", "bf16", "fp16")
# fp16: this many skipped steps in a row means the scaler cannot rescue the run (scale / 2**25).
MAX_SKIPPED_STEPS = 25
# Settings a bit-exact resume depends on, besides the flags and the data.
RESUME_KEYS = ("seed", "batch_size", "precision", "ema")


class TrainingError(Exception):
    """A run that cannot go on for a reason the user can act on; the CLI shows it as one line."""


def _write_error(e: OSError, fallback: Path) -> TrainingError:
    """One line for a failed write, naming the real file rather than its temporary twin."""
    path = Path(e.filename) if e.filename else fallback
    if is_temp_file(path):  # ".model_0000002.safetensors.k3j2h1g0.safetensors" -> the real name
        path = path.with_name(path.name[1 : -len(path.suffix) - 9] if path.suffix else path.name[1:-9])
    if e.errno == errno.ENOSPC:
        return TrainingError(f"no space left on device writing {path}")
    return TrainingError(f"cannot write {path}: {e.strerror or e}")


# The bundled MNIST model's network: small enough for ~40 minutes on 2 CPU cores. AdaGN
# (use_scale_shift_norm), attention at 16x16 and 8x8, learned sigma, cosine schedule; 11 classes
# = 10 digits + the classifier-free guidance null label 10.


def parse_ema_rates(text) -> tuple[float, ...]:
    """ "0.9999,0.999" -> (0.9999, 0.999); empty -> no EMA."""
    parts = text if isinstance(text, (tuple, list)) else [r for r in str(text).split(",") if r.strip()]
    try:
        rates = tuple(float(r) for r in parts)
    except ValueError as e:
        raise ValueError(f"EMA rates must be numbers like 0.9999,0.999, got {text!r}") from e
    for r in rates:
        if not 0 < r < 1:
            raise ValueError(f"EMA rate {r} is not in (0, 1)")
    return rates


def resolve_flags(flags: dict, dataset, cfg_dropout: float = 0.0) -> dict:
    """Fit diffusion-model flags to the data: size, channels, class count (+1 null class for CFG)."""
    flags = dict(flags, image_size=dataset.image_size, in_channels=dataset.channels, use_fp16=False)
    if flags.get("class_cond"):
        if not dataset.num_classes:
            raise DataError(
                "class_cond True needs labelled data (class subfolders, class_ prefixes or arr_1)"
            )
        flags["num_classes"] = dataset.num_classes + (1 if cfg_dropout > 0 else 0)
    elif cfg_dropout > 0:
        raise ValueError("--cfg-dropout needs a class-conditional model (class_cond True)")
    return flags


def resolve_classifier_flags(flags: dict, dataset) -> dict:
    """Fit classifier flags to the data: size, channels and one logit per class."""
    if not dataset.num_classes:
        raise DataError(
            "classifier training needs labelled data (class subfolders, class_ prefixes or arr_1)"
        )
    if dataset.num_classes < 2:
        raise DataError("classifier training needs at least 2 classes; the data has 1")
    return dict(
        flags,
        image_size=dataset.image_size,
        in_channels=dataset.channels,
        num_classes=dataset.num_classes,
        classifier_use_fp16=False,
    )


def stream_key(seed: int, step: int, index: int) -> int:
    """Seed of the random stream of global micro-batch ``index`` at ``step`` (63-bit)."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, np.uint64)[0] >> 1)


class LossScaler:
    """Dynamic loss scaling for fp16 autocast, like ``torch.amp.GradScaler`` but explicit:
    ``unscale_`` divides every parameter's grad by the scale before clipping, an overflow skips
    the step and halves the scale, and ``growth_interval`` clean steps double it."""

    def __init__(
        self,
        enabled: bool = True,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        self.enabled = enabled
        self.scale = init_scale
        self.growth_factor, self.backoff_factor, self.growth_interval = (
            growth_factor,
            backoff_factor,
            growth_interval,
        )
        self.good_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_(self, params) -> bool:
        """Unscale grads in place; True if any is non-finite (then the step must be skipped)."""
        if not self.enabled:
            return False
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return False
        torch._foreach_mul_(grads, 1.0 / self.scale)
        return not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


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
            rate = self.rate_at(rate, step)
            torch._foreach_mul_(ema, rate)
            torch._foreach_add_(ema, src, alpha=1 - rate)

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


class Meter:
    """Device-side running means (no host sync per step), per timestep quartile where t is given."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def _acc(self, name: str, s: torch.Tensor, c: torch.Tensor) -> None:
        if name in self.sums:
            self.sums[name] += s
            self.counts[name] += c
        else:
            self.sums[name], self.counts[name] = s.clone(), c.clone()

    def add(self, name: str, value) -> None:
        value = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1)
        self._acc(name, value, torch.ones_like(value))

    def add_per_t(self, name: str, values: torch.Tensor, t: torch.Tensor, num_timesteps: int) -> None:
        """Overall mean plus ``name_q0..q3`` by ``int(4 t / T)``, as guided-diffusion's logger."""
        values = values.detach().double()
        q = (4 * t // num_timesteps).clamp(max=3)
        s = torch.zeros(5, dtype=torch.float64, device=values.device).scatter_add_(0, q, values)
        c = torch.zeros(5, dtype=torch.float64, device=values.device).scatter_add_(
            0, q, torch.ones_like(values)
        )
        s[4], c[4] = values.sum(), len(values)
        self._acc(name, s, c)

    def flush(self) -> dict[str, float]:
        out = {}
        for name, s in self.sums.items():
            s, c = s.cpu().tolist(), self.counts[name].cpu().tolist()
            if len(s) == 1:
                out[name] = s[0] / c[0]
            else:
                out[name] = s[4] / c[4]
                out.update({f"{name}_q{i}": s[i] / c[i] for i in range(4) if c[i]})
        self.sums.clear()
        self.counts.clear()
        return out


@dataclass
class TrainConfig:
    """Everything a run needs besides the data; stored in every checkpoint."""

    flags: dict
    out: str = "runs/train"
    batch_size: int = 16
    microbatch: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_anneal_steps: int = 0
    grad_clip: float = 1.0
    ema: tuple[float, ...] = (0.9999,)
    ema_warmup: bool = False
    precision: str = "fp32"
    schedule_sampler: str = "uniform"
    cfg_dropout: float = 0.0
    random_flip: bool = False
    max_steps: int = 1000
    save_every: int = 1000
    sample_every: int = 0
    sample_steps: int = 25
    num_samples: int = 16
    eval_every: int = 0
    log_every: int = 100
    seed: int = 0
    device: str | None = None
    num_workers: int = 0
    resume: bool = False
    progress: bool = True
    keep_last: int = 0


class TrainLoop:
    """Shared machinery: devices/DDP, AdamW with warm-up/anneal, loss scaling, clipping, EMA,
    keyed randomness, logging, checkpoints and exact resume. Subclasses define ``compute_loss``."""

    kind = ""

    def __init__(self, config: TrainConfig, dataset, model: torch.nn.Module):
        cfg = self.config = config
        if cfg.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
        self.device = dist.setup(cfg.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch size {cfg.batch_size} is not divisible by {self.world} processes")
        self.local_batch = cfg.batch_size // self.world
        self.micro = cfg.microbatch if 0 < cfg.microbatch < self.local_batch else self.local_batch
        if self.local_batch % self.micro:
            raise ValueError(
                f"per-process batch {self.local_batch} is not divisible by microbatch {self.micro}"
            )
        self.dataset = dataset
        self.model = model.to(self.device)
        dist.broadcast_module(self.model)
        self.ddp = None
        if self.world > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = LossScaler(enabled=cfg.precision == "fp16")
        self.ema = EMA(self.model, parse_ema_rates(cfg.ema), warmup=cfg.ema_warmup)
        self.meter = Meter()
        self.step = 0
        self.skipped = 0  # fp16 steps skipped in a row
        self.out = Path(cfg.out)
        self._last_log = (time.time(), 0)

    # -- hooks -------------------------------------------------------------------------------
    def compute_loss(self, x, y, gen: torch.Generator, dev_gen: torch.Generator):
        """-> (scalar loss of this micro-batch, {"t": t, metric: per-example values})."""
        raise NotImplementedError

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def record(self, t: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Per-example metrics of the whole global batch, identical on every rank."""

    def after_step(self) -> None:
        pass

    def metadata(self) -> dict:
        return {"kind": self.kind, "flags": self.config.flags}

    # -- pieces ------------------------------------------------------------------------------
    def autocast(self):
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def net(self):
        return self.ddp if self.ddp is not None else self.model

    def lr_at(self, step: int) -> float:
        cfg = self.config
        lr = cfg.lr
        if cfg.warmup_steps:
            lr *= min(1.0, (step + 1) / cfg.warmup_steps)
        if cfg.lr_anneal_steps:
            lr *= max(0.0, 1 - step / cfg.lr_anneal_steps)
        return lr

    def _generators(self, index: int):
        key = stream_key(self.config.seed, self.step, index)
        torch.manual_seed(key)  # dropout masks
        gen = torch.Generator().manual_seed(key)
        dev_gen = gen if self.device.type == "cpu" else torch.Generator(self.device).manual_seed(key)
        return gen, dev_gen

    def run_step(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """One optimizer step over the local batch, split in micro-batches; True if it stepped."""
        cfg = self.config
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        n_micro = self.local_batch // self.micro
        records, losses = [], []
        for i in range(n_micro):
            gen, dev_gen = self._generators(self.rank * n_micro + i)
            xs, ys = x[i * self.micro : (i + 1) * self.micro], y[i * self.micro : (i + 1) * self.micro]
            if cfg.random_flip:
                flip = (torch.rand(len(xs), generator=gen) < 0.5).to(self.device)
                xs = torch.where(flip[:, None, None, None], xs.flip(3), xs)
            last = i == n_micro - 1
            with contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync():
                loss, rec = self.compute_loss(xs, ys, gen, dev_gen)
                self.scaler.scale_loss(loss * (len(xs) / self.local_batch)).backward()
            records.append(rec)
            losses.append(loss.detach().float().reshape(1))
        loss_sum = torch.cat(losses).sum()
        if self.world > 1:
            loss_sum = dist.all_gather_cat(loss_sum.reshape(1)).sum()
        took = self._optimize(loss_sum)
        t = torch.cat([r.pop("t") for r in records])
        terms = {k: torch.cat([r[k] for r in records]).float() for k in records[0]}
        if self.world > 1:
            stacked = dist.all_gather_cat(torch.stack([t.float(), *terms.values()], dim=1))
            t = stacked[:, 0].long()
            terms = dict(zip(terms, stacked[:, 1:].unbind(1)))
        self.record(t, terms)
        return took

    def _diverged(self, what: str) -> TrainingError:
        record = ckpt.latest_checkpoint(self.out)
        kept = (
            f"the last good checkpoint (step {record['step']}) is kept in {self.out}"
            if record
            else "no checkpoint was written yet"
        )
        return TrainingError(f"training diverged at step {self.step + 1}: {what}; {kept}; try a lower --lr")

    def _optimize(self, loss_sum: torch.Tensor | None = None) -> bool:
        """Clip and step; stop the run (before touching the weights) at a non-finite loss or gradient."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        found_inf = self.scaler.unscale_(params)
        clip = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        loss_ok, norm_ok = (
            torch.isfinite(torch.stack([loss_sum.to(norm), norm])).tolist()
            if loss_sum is not None
            else (True, bool(torch.isfinite(norm)))
        )
        if not loss_ok:
            raise self._diverged("the loss is not finite")
        if self.scaler.enabled:  # an overflow is the scaler's to handle, unless it keeps happening
            self.skipped = self.skipped + 1 if found_inf else 0
            if self.skipped >= MAX_SKIPPED_STEPS:
                raise self._diverged(f"the fp16 loss scaler skipped {self.skipped} steps in a row")
        elif not norm_ok:
            raise self._diverged("the gradient is not finite")
        if found_inf:
            self.opt.zero_grad(set_to_none=True)
        else:
            self.opt.step()
            self.ema.update(self.model, self.step)
            self.meter.add("grad_norm", norm)
        self.scaler.update(found_inf)
        self.meter.add("lr", self.opt.param_groups[0]["lr"])
        if self.scaler.enabled:
            self.meter.add("loss_scale", self.scaler.scale)
            self.meter.add("skipped", float(found_inf))
        return not found_inf

    # -- loop --------------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.config
        main = dist.is_main()
        if cfg.resume:
            self.resume()
        sampler = ShardedSampler(
            len(self.dataset), cfg.batch_size, self.rank, self.world, cfg.seed, self.step
        )
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,
        )
        batches = iter(loader)
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=f"train {self.kind}",
            dynamic_ncols=True,
            disable=not (cfg.progress and main),
        )
        self._last_log = (time.time(), self.step)
        try:
            while self.step < cfg.max_steps:
                x, y = next(batches)
                self.run_step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                self.step += 1
                bar.update(1)
                done = self.step == cfg.max_steps
                if self.step % cfg.log_every == 0 or done:
                    self.log(bar)
                if (cfg.save_every and self.step % cfg.save_every == 0) or done:
                    self.save()
                self.after_step()
        finally:
            bar.close()
        if main:
            plot_losses(self.out / "log.jsonl", self.out / "loss.png")
        dist.barrier()

    def log(self, bar) -> None:
        row = self.meter.flush()
        now = time.time()
        then, step0 = self._last_log
        self._last_log = (now, self.step)
        if not dist.is_main():
            return
        row = {
            "step": self.step,
            "samples": self.step * self.config.batch_size,
            "samples_per_sec": (self.step - step0) * self.config.batch_size / max(now - then, 1e-9),
            **row,
        }
        self.append_log(row)
        brief = {k: row[k] for k in ("loss", "mse", "vb", "acc@1") if isinstance(row.get(k), float)}
        bar.set_postfix({k: f"{v:.4g}" for k, v in brief.items()})
        text = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        bar.write(text)

    def append_log(self, row: dict) -> None:
        """One JSON line; non-finite numbers become null (bare NaN is not JSON)."""
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        path = self.out / "log.jsonl"
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(row, allow_nan=False) + "\n")
        except OSError as e:
            raise _write_error(e, path) from None

    def save(self) -> None:
        if not dist.is_main():
            return
        try:
            self._save()
        except OSError as e:
            raise _write_error(e, self.out) from None
        if self.config.keep_last > 0:
            prune_checkpoints(self.out, self.config.keep_last)

    def _save(self) -> None:
        cfg = self.config
        state = {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.capture_rng(),
            "data": {
                "seed": cfg.seed,
                "step": self.step,
                "global_batch": cfg.batch_size,
                "fingerprint": self.data_fingerprint(),
            },
            "config": asdict(cfg),
            **self.extra_state(),
        }
        emas = {r: self.ema.state_dict(self.model, r) for r in self.ema.rates}
        ckpt.save_checkpoint(self.out, self.step, self.model.state_dict(), emas, state, self.metadata())

    def resume(self) -> None:
        """Load the newest checkpoint in ``out`` (none: start fresh) with everything it holds."""
        record = ckpt.latest_checkpoint(self.out)
        if record is None:
            if dist.is_main():
                tqdm.write(f"no checkpoint in {self.out}; starting from step 0")
            return
        step, model_sd, emas, state = ckpt.load_checkpoint(self.out, record)
        self.check_resume(state)
        self.model.load_state_dict(model_sd)
        for rate in self.ema.rates:
            self.ema.load(rate, emas[ckpt.ema_name(rate)])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.load_extra_state(state)
        ckpt.restore_rng(state["rng"])
        self.step = step
        if dist.is_main():
            try:
                _truncate_log(self.out / "log.jsonl", step)
            except OSError as e:
                raise _write_error(e, self.out / "log.jsonl") from None

    def data_fingerprint(self) -> dict:
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = fingerprint(self.dataset)
        return self._fingerprint

    def check_resume(self, state: dict) -> None:
        """Refuse, naming each difference, what would break the promised bit-exact continuation."""
        old, new = state["config"], asdict(self.config)
        old["ema"], new["ema"] = tuple(old.get("ema", ())), tuple(new["ema"])
        diffs = [
            f"flag {k} {old['flags'].get(k)!r} vs {new['flags'].get(k)!r}"
            for k in sorted(set(old["flags"]) | set(new["flags"]))
            if old["flags"].get(k) != new["flags"].get(k)
        ]
        names = {"batch_size": "batch size", "ema": "EMA rates"}
        diffs += [
            f"{names.get(k, k)} {old.get(k)!r} vs {new[k]!r}"
            for k in RESUME_KEYS
            if old.get(k, new[k]) != new[k]
        ]
        was = state.get("data", {}).get("fingerprint")
        if was is not None and was != self.data_fingerprint():
            now = self.data_fingerprint()
            diffs.append(
                f"data ({was['count']} items vs {now['count']})"
                if was["count"] != now["count"]
                else "data (same count, other content)"
            )
        if diffs:
            raise TrainingError(
                f"cannot resume {self.out}: it was trained with other settings: {'; '.join(diffs)}"
            )


def _log_rows(path: Path) -> list[dict]:
    """The rows of log.jsonl; a torn line (kill, full disk) is dropped."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows past the resumed step (they are about to be redone), and torn lines."""
    if path.is_file():
        rows = [json.dumps(r) for r in _log_rows(path) if r["step"] <= step]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))


CHECKPOINT_FILE = re.compile(r"(model|state|ema_.+)_(\d{7})\.(safetensors|pt)")


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (called after latest.json names the newest)."""
    files = [(p, m) for p in out.iterdir() if (m := CHECKPOINT_FILE.fullmatch(p.name))]
    steps = sorted({int(m[2]) for _, m in files}, reverse=True)
    for p, m in files:
        if int(m[2]) not in steps[:keep]:
            p.unlink(missing_ok=True)


def plot_losses(log_path: Path, png_path: Path) -> bool:
    """Loss (and its timestep quartiles) against step; False when matplotlib or the log is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not Path(log_path).is_file():
        return False
    rows = _log_rows(Path(log_path))
    keys = [
        k
        for k in ("loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "val_loss")
        if any(k in r for r in rows)
    ]
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        ax.plot(*zip(*pts), label=k, lw=2 if k == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return True


class DiffusionTrainer(TrainLoop):
    """Hybrid-loss (L_simple + L_vb with learned sigma) diffusion training, ADM style."""

    kind = "diffusion"

    def __init__(self, config: TrainConfig, dataset):
        flags = config.flags
        torch.manual_seed(config.seed)
        super().__init__(config, dataset, create_unet(**flags))
        self.diffusion = create_diffusion_from_flags(flags)
        self.schedule_sampler = create_named_schedule_sampler(
            config.schedule_sampler, self.diffusion.num_timesteps
        )
        self.class_cond = bool(flags.get("class_cond"))
        if config.cfg_dropout and not self.class_cond:
            raise ValueError("--cfg-dropout needs a class-conditional model (class_cond True)")
        if not 0 <= config.cfg_dropout < 1:
            raise ValueError(f"cfg dropout must be in [0, 1), got {config.cfg_dropout}")
        self.null_label = flags["num_classes"] - 1 if config.cfg_dropout > 0 else None
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
        return loss, {"t": t, **{k: v.detach() for k, v in terms.items()}}

    def record(self, t, terms) -> None:
        self.schedule_sampler.update_with_losses(t, terms["loss"])
        for name, values in terms.items():
            self.meter.add_per_t(name, values, t, self.diffusion.num_timesteps)

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
            self.save_samples(self.out / "samples" / f"step_{self.step:07d}.png")

    @torch.no_grad()
    def save_samples(self, path: Path) -> None:
        """A grid from the first EMA (or the raw weights) with a short DDIM schedule, fixed noise."""
        from fastdiff.diffusion import SAMPLERS
        from fastdiff.engines.sampler import Sampler

        cfg, flags = self.config, self.config.flags
        if self._sample_model is None:
            self._sample_model = copy.deepcopy(self.model).eval()
        rates = self.ema.rates
        self._sample_model.load_state_dict(
            self.ema.state_dict(self.model, rates[0]) if rates else self.model.state_dict()
        )
        respacing = SAMPLERS["ddim"].respacing(cfg.sample_steps)  # what `fastdiff sample --steps N` runs
        diffusion = create_diffusion_from_flags(flags, timestep_respacing=respacing)
        n = cfg.num_samples
        labels = None
        if self.class_cond:
            classes = flags["num_classes"] - (1 if self.null_label is not None else 0)
            labels = torch.arange(n, device=self.device) % classes
        gen = torch.Generator(self.device).manual_seed(cfg.seed)
        sampler = Sampler(self._sample_model, diffusion, sampler="ddim", engine="eager", device=self.device)
        with self.autocast():
            x = sampler(labels, num_samples=n, generator=gen)
        save_grid(to_uint8(x), path, ncol=math.ceil(math.sqrt(n)))


class ClassifierTrainer(TrainLoop):
    """ADM's noisy-image classifier: uniform t, q_sample, cross-entropy; accuracy per t quartile."""

    kind = "classifier"

    def __init__(self, config: TrainConfig, dataset, val_dataset=None):
        flags = config.flags
        torch.manual_seed(config.seed)
        super().__init__(config, dataset, create_classifier(**flags))
        self.diffusion = create_diffusion_from_flags(flags)
        self.schedule_sampler = UniformSampler(self.diffusion.num_timesteps)
        self.num_classes = flags["num_classes"]
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
        """Held-out loss/accuracy at fixed random t per image (the same every evaluation)."""
        self.model.eval()
        meter = Meter()
        loader = torch.utils.data.DataLoader(self.val_dataset, batch_size=self.micro, shuffle=False)
        for i, (x, y) in enumerate(loader):
            key = stream_key(self.config.seed, 2**32, i)
            gen = torch.Generator().manual_seed(key)
            dev_gen = gen if self.device.type == "cpu" else torch.Generator(self.device).manual_seed(key)
            _, rec = self._logits(self.model, x.to(self.device), y.to(self.device), gen, dev_gen)
            t = rec.pop("t")
            for name, values in rec.items():
                meter.add_per_t(f"val_{name}", values, t, self.diffusion.num_timesteps)
        self.model.train()
        return meter.flush()
