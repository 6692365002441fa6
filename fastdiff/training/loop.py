"""The training loop both trainers share (improved-diffusion's TrainLoop), exactly resumable and sharded.

Every random draw of a step (timesteps, noise, label dropout, flips, dropout masks) comes from a
stream keyed by ``(seed, step, global micro-batch index)`` and the data order is a function of
``(seed, step)``. So a run resumed from a checkpoint repeats the uninterrupted run bit for bit,
and N processes with the same global batch and micro-batch size see the same samples, noise
and timesteps as one process.

Given the same draws, the loop computes guided-diffusion's image_train.py and classifier_train.py
(tests/test_training_original.py; on two ranks tests/test_training_original_ranks.py), except, on
purpose:
- micro-batch losses are weighted by their share of the batch, so splitting a batch into
  micro-batches does not change the gradient (image_train.py summed micro-batch means);
- the global gradient norm is clipped to ``--grad-clip`` (1.0 by default; the original clips
  nothing, which ``--grad-clip 0`` repeats);
- ``--anneal`` gives step s (from 0) the LR ``lr * (1 - s / max_steps)``, classifier_train.py's
  rule; image_train.py sets each step's LR after the step before, so its schedule lags one step
  (its steps 0 and 1 both at the full LR);
- the loss-second-moment sampler learns a step's losses after the step, gathered over the ranks
  in global batch order (the original learns each micro-batch's before the next one draws), so N
  processes draw the timesteps one process draws;
- mixed precision is autocast over fp32 master weights (``use_fp16`` model flag is forced off:
  ``--precision`` says), fp16 with ``torch.amp.GradScaler``'s dynamic loss scale (from 2**16,
  doubled after 2000 good steps) instead of the original's log-scale schedule (from 2**20, +0.001
  per step), whose first steps may overflow and be skipped where these are taken;
- under torchrun ``--batch-size`` is the global batch, each rank training on its share (the
  original's ``--batch_size`` is each rank's), a slice of every global batch of one order over all
  the data (the original's rank r shuffles its own files[r::N] alone), and the log's values are
  means over every rank's examples (the original's scripts give its logger no MPI comm: rank 0
  logs its own share). On the CPU the ranks' gradients are averaged by DDP over gloo, where the
  original wraps DDP only with CUDA (its CPU ranks warn and each train alone).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastdiff.config import changed
from fastdiff.files import is_temp_file
from fastdiff.models.checkpoint import CheckpointError, check_fits
from fastdiff.models.flags import configs_from_flags, flags_of
from fastdiff.progress import progress_bar

from . import checkpoint as ckpt
from . import dist
from .config import TrainConfig, check_batch, micro_batch, parse_ema_rates
from .data import DataError, ShardedSampler, fingerprint, worker_error
from .ema import EMA
from .runlog import Meter, plot_losses, truncate_log

# fp16: this many skipped steps in a row means the scaler cannot rescue the run (scale / 2**25).
MAX_SKIPPED_STEPS = 25
# AdamW's multi-tensor kernels: on the CPU torch's default is its per-parameter loop (CUDA's is this
# already), which computes the same numbers, bit for bit, one Python call per op and parameter
# (11.5 ms against 7.7 ms a step for a 1.4M-parameter 32x32 ADM at one thread). Set again on a
# resume, whose optimizer state brings back the setting it was saved with (None before).
ADAMW_IMPLEMENTATION = {"foreach": True}
# What a state_*.pt holds besides the trainer's extra_state().
STATE_KEYS = ("optimizer", "scaler", "rng", "config")
# Settings a resumed run must share with its checkpoint, besides the flags, the data and the
# micro-batch size (the keyed noise streams follow it): each changes what is being trained. The
# optimizer's schedule (--lr, --warmup-steps, --anneal, --weight-decay, --grad-clip) may change,
# as a second phase with another LR does (recipes/README.md); log.jsonl records each step's LR.
RESUME_KEYS = (
    "seed",
    "batch_size",
    "precision",
    "ema",
    "ema_warmup",
    "schedule_sampler",
    "cfg_dropout",
    "random_flip",
)


# The optimizer's schedule a resume may change (the settings besides RESUME_KEYS'), by option.
SCHEDULE_OPTIONS = {
    "lr": "--lr",
    "warmup_steps": "--warmup-steps",
    "lr_anneal_steps": "--anneal",
    "weight_decay": "--weight-decay",
    "grad_clip": "--grad-clip",
}


def schedule_changes(old: dict, new: dict) -> list[str]:
    """The schedule settings of the config record ``new`` that differ from the checkpoint's
    ``old``, as options: a resume takes them silently, so the user is told (a typo in --lr)."""

    def shown(key: str, value) -> str:
        if key == "lr_anneal_steps":  # --anneal decays to --max-steps, which a resume may move
            return f"to step {value}" if value else "off"
        return f"{value:g}"

    return [
        f"{option} {shown(k, old[k])} -> {shown(k, new[k])}"
        for k, option in SCHEDULE_OPTIONS.items()
        if k in old and old[k] != new[k]
    ]


def _scaler_state(state: dict) -> dict:
    """GradScaler's state, also from checkpoints of the hand-written scaler it replaced."""
    if "good_steps" in state:
        return {
            "scale": float(state["scale"]),
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": int(state["good_steps"]),
        }
    return state


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


def stream_key(seed: int, step: int, index: int) -> int:
    """Seed of the random stream of global micro-batch ``index`` at ``step`` (63-bit). Shifted as a
    Python int: numpy 1.x promotes ``uint64 >> int`` to float64 and has no shift for it."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, np.uint64)[0]) >> 1


# Flags the trainers set from the data (fit_unet, fit_classifier): compared once it is read.
DATA_FLAGS = ("image_size", "in_channels", "num_classes", "use_fp16", "classifier_use_fp16")


def _settings_diffs(kind: str, state: dict, new: dict, micro: int, world: int, skip=()) -> list[str]:
    """The differences, in words, between a checkpoint's settings and ``new`` (a config record)."""
    old = dict(state["config"])
    old["ema"], new = tuple(old.get("ema", ())), dict(new, ema=tuple(new["ema"]))
    # Flags compared as configs, so an older fastdiff's spelling of the same network matches.
    old_flags = flags_of(*configs_from_flags(kind, old["flags"]))
    diffs = [
        changed(f"flag {k}", old_flags.get(k), new["flags"].get(k))
        for k in sorted(set(old_flags) | set(new["flags"]))
        if k not in skip and old_flags.get(k) != new["flags"].get(k)
    ]
    diffs += [
        changed("EMA rates" if k == "ema" else k.replace("_", " "), old.get(k), new[k])
        for k in RESUME_KEYS
        if old.get(k, new[k]) != new[k]
    ]
    was = state.get("data", {}).get("micro_batch") or micro_batch(  # older states: from the options
        old.get("batch_size", new["batch_size"]), old.get("microbatch", new["microbatch"]), world
    )
    if was != micro:
        diffs.append(changed("micro-batch size", was, micro))
    return diffs


def check_resume_settings(config: TrainConfig, kind: str) -> None:
    """The resume's refusal of changed settings that the data does not decide, made before the
    data is read or the network built (the trainer checks the rest, and the data, on resuming)."""
    record = ckpt.resumable_checkpoint(config.out, kind, config.max_steps)
    state = record and ckpt.read_state_settings(Path(config.out) / record["state"])
    if not state:  # none yet, or damaged: resuming names it
        return
    world = dist.launched_world_size()
    micro = micro_batch(config.batch_size, config.microbatch, world)
    diffs = _settings_diffs(kind, state, config.record(), micro, world, skip=DATA_FLAGS)
    if diffs:
        raise _other_settings(config.out, diffs)


def _other_settings(out, diffs: list[str]) -> TrainingError:
    """The resume's refusal: each setting with the run's value and this command's
    (:func:`fastdiff.config.changed`), and the fix: the run's own options."""
    return TrainingError(
        f"cannot resume {out}: it was trained with other settings: "
        f"{'; '.join(diffs)}; resume with the run's options"
    )


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C, and a SIGTERM from anyone but their parent, which reach
    them too (SLURM signals every process of the job, a terminal its foreground group): torch's
    own SIGTERM handler had a worker die at once, and the main process with it (a RuntimeError)
    before it could save. The parent's SIGTERM (its clean-up at exit) still ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: torch's own SIGTERM handling stays
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # taken by the thread below only
    threading.Thread(target=_exit_at_parents_sigterm, args=(os.getppid(),), daemon=True).start()


def _exit_at_parents_sigterm(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)


class StopSignals:
    """SIGTERM and Ctrl-C held while the loop runs, so that the run stops after the step it is in,
    with that step's checkpoint, and then acts on the signal as it would have (the CLI: exit 143 or
    130). A second one of the same signal acts at once, a save under way included (its atomic
    writes leave the previous checkpoint)."""

    def __init__(self):
        self.signum = 0  # the strongest signal held (SIGTERM over SIGINT), 0: none
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers are the main thread's
            for s in (signal.SIGTERM, signal.SIGINT):
                # None: a handler set outside Python (not restorable); SIG_IGN: the caller's choice
                if signal.getsignal(s) not in (None, signal.SIG_IGN):
                    self._previous[s] = signal.signal(s, self._hold)
        return self

    def _hold(self, signum, frame):
        self.signum = max(self.signum, signum)
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def deliver(self, signum: int) -> None:
        """The handlers from before the loop back, then ``signum`` raised to them."""
        self.__exit__()
        signal.raise_signal(signum)


class TrainLoop:
    """Shared machinery: devices/DDP, AdamW with warm-up/anneal, loss scaling, clipping, EMA,
    keyed randomness, logging, checkpoints and exact resume. Subclasses define ``compute_loss``."""

    kind = ""

    def __init__(self, config: TrainConfig, dataset, model: torch.nn.Module):
        cfg = self.config = config
        self.device = dist.setup(cfg.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        # TrainConfig checked it for torchrun's WORLD_SIZE; a process group set up otherwise
        # (a library user's init_process_group) is known only here
        check_batch(cfg.batch_size, cfg.microbatch, self.world)
        self.local_batch = cfg.batch_size // self.world
        self.micro = micro_batch(cfg.batch_size, cfg.microbatch, self.world)
        self.dataset = dataset
        self.model = model.to(self.device)
        dist.broadcast_module(self.model)
        self.ddp = None
        if self.world > 1:
            self.ddp = dist.data_parallel(self.model, self.device)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **ADAMW_IMPLEMENTATION
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.ema = EMA(self.model, parse_ema_rates(cfg.ema), warmup=cfg.ema_warmup)
        self.meter = Meter()
        self.step = 0
        self.skipped = 0  # fp16 steps skipped in a row
        self.signals = StopSignals()
        self._stop = torch.zeros(())  # the signal some rank held at this step's gather (world > 1)
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
        """What sampling reads of the weights: the network, and the data's class names, so
        ``--classes`` can name a class and a user need not know the ids the folder order gave."""
        meta = {"kind": self.kind, "flags": flags_of(self.config.net, self.config.process)}
        names = getattr(self.dataset, "class_names", None)
        return meta if names is None else {**meta, "class_names": list(names)}

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
                self.scaler.scale(loss * (len(xs) / self.local_batch)).backward()
            records.append(rec)
            losses.append(loss.detach().float().reshape(1))
        loss_sum = torch.cat(losses).sum()
        if self.world > 1:  # with each rank's held signal, so that all stop after the same step
            held = torch.tensor(float(self.signals.signum), device=loss_sum.device)
            both = dist.all_gather_cat(torch.stack([loss_sum, held]).reshape(1, 2))
            loss_sum, self._stop = both[:, 0].sum(), both[:, 1].max()
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
        """Clip and step; stop the run (before touching the weights) at a non-finite loss or
        gradient. One host sync: the finiteness of the loss and of the unscaled gradient norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        fp16 = self.scaler.is_enabled()
        if fp16:
            self.scaler.unscale_(self.opt)
        clip = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        loss_ok, norm_ok = (
            torch.isfinite(torch.stack([loss_sum.to(norm), norm])).tolist()
            if loss_sum is not None
            else (True, bool(torch.isfinite(norm)))
        )
        if not loss_ok:
            raise self._diverged("the loss is not finite")
        # A non-finite gradient is an fp16 overflow for the scaler to handle (skip the step, lower
        # the scale), unless it keeps happening; in fp32/bf16 it ends the run.
        found_inf = not norm_ok
        if fp16:
            self.skipped = self.skipped + 1 if found_inf else 0
            if self.skipped >= MAX_SKIPPED_STEPS:
                raise self._diverged(f"the fp16 loss scaler skipped {self.skipped} steps in a row")
        elif found_inf:
            raise self._diverged("the gradient is not finite")
        if found_inf:
            self.opt.zero_grad(set_to_none=True)
        else:
            self.opt.step()  # the gradients are unscaled already (GradScaler.step would sync again)
            self.ema.update(self.model, self.step)
            self.meter.add("grad_norm", norm)
        if fp16:
            self.scaler.update()  # backs off on the overflow unscale_ recorded, grows otherwise
            self.meter.add("skipped", float(found_inf))
        self.meter.add("lr", self.opt.param_groups[0]["lr"])
        return not found_inf

    # -- loop --------------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.config
        main = dist.is_main()
        if cfg.resume:
            self.resume()
        if main:
            # Rows past the starting step are about to be redone (a resume), or are a killed run's
            # that never saved a checkpoint (a fresh start): either way they go, with torn lines.
            try:
                truncate_log(self.out / ckpt.LOG, self.step)
            except OSError as e:
                raise _write_error(e, self.out / ckpt.LOG) from None
        sampler = ShardedSampler(
            len(self.dataset), cfg.batch_size, self.rank, self.world, cfg.seed, self.step
        )
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.num_workers > 0,
            worker_init_fn=_leave_stop_signals_to_the_main_process,
        )
        bar = progress_bar(
            total=cfg.max_steps,
            initial=self.step,
            desc=f"train {self.kind}",
            dynamic_ncols=True,
            disable=not (cfg.progress and main),
        )
        self._last_log = (time.time(), self.step)
        try:
            with self.signals:
                self._loop(iter(loader), bar)
        finally:
            bar.close()
        if main:
            plot_losses(self.out / ckpt.LOG, self.out / ckpt.LOSS_PLOT)
        dist.barrier()

    def _loop(self, batches, bar) -> None:
        """Steps to --max-steps, or until a held signal stops every rank after the same step."""
        cfg = self.config
        while self.step < cfg.max_steps:
            try:
                x, y = next(batches)
            except DataError as e:
                raise worker_error(e) from None
            self.run_step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            self.step += 1
            bar.update(1)
            done = self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or done:
                self.log(bar)
            # The step's grid / held-out row before its checkpoint: a run killed in between
            # redoes them on resume (a checkpoint first would leave them never written).
            self.after_step()
            saved = (cfg.save_every and self.step % cfg.save_every == 0) or done
            if saved:
                self.save()
            signum = int(self._stop) if self.world > 1 else self.signals.signum
            if signum:
                try:
                    if not saved:
                        self.save()
                finally:  # the other ranks exit once rank 0 has written (or failed to): an early
                    dist.barrier()  # exit would have torchrun stop rank 0 in the middle of it
                self.signals.deliver(signum)

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
        if self.scaler.is_enabled():
            row["loss_scale"] = self.scaler.get_scale()
        self.append_log(row)
        brief = {k: row[k] for k in ("loss", "mse", "vb", "acc@1") if isinstance(row.get(k), float)}
        bar.set_postfix({k: f"{v:.4g}" for k, v in brief.items()})
        text = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        bar.write(text)

    def append_log(self, row: dict) -> None:
        """One JSON line; non-finite numbers become null (bare NaN is not JSON)."""
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        path = self.out / ckpt.LOG
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
            ckpt.prune_checkpoints(self.out, self.config.keep_last)

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
                "micro_batch": self.micro,
                "fingerprint": self.data_fingerprint(),
            },
            "config": cfg.record(),
            "threads": torch.get_num_threads(),  # the steps' CPU threads: their float sums split by it
            "meter": self.meter.state_dict(),
            **self.extra_state(),
        }
        emas = {r: self.ema.state_dict(self.model, r) for r in self.ema.rates}
        ckpt.save_checkpoint(self.out, self.step, self.model.state_dict(), emas, state, self.metadata())

    def resume(self) -> None:
        """Load the newest checkpoint in ``out`` (none: start fresh) with everything it holds."""
        record = ckpt.resumable_checkpoint(self.out, self.kind, self.config.max_steps)
        self._check_ranks_resume(record)
        if record is None:
            if dist.is_main():
                tqdm.write(f"no checkpoint in {self.out}; starting from step 0")
            return
        step, model_sd, emas, state = ckpt.load_checkpoint(self.out, record)
        missing = [k for k in STATE_KEYS + tuple(self.extra_state()) if k not in state]
        if missing:
            raise CheckpointError(f"cannot resume {self.out}: {record['state']} holds no {missing[0]}")
        self.check_resume(state)
        self._check_fits(model_sd, record["model"])
        changes = schedule_changes(state["config"], self.config.record())
        if changes and dist.is_main():
            changed = ", ".join(changes)
            print(f"note: the resume changes the checkpoint's LR schedule: {changed}", file=sys.stderr)
        self._note_other_threads(state.get("threads"))  # older checkpoints: none recorded
        for rate in self.ema.rates:
            name = ckpt.ema_name(rate)
            if name not in emas:
                raise CheckpointError(f"cannot resume {self.out}: {ckpt.LATEST} names no EMA of rate {name}")
            self._check_fits(emas[name], record["ema"][name])
        self.model.load_state_dict(model_sd)
        for rate in self.ema.rates:
            self.ema.load(rate, emas[ckpt.ema_name(rate)])
        self.opt.load_state_dict(state["optimizer"])
        for group in self.opt.param_groups:  # the state brings back its decay (a resume may change it)
            group.update(weight_decay=self.config.weight_decay, **ADAMW_IMPLEMENTATION)  # and older kernels
        self.scaler.load_state_dict(_scaler_state(state["scaler"]))
        self.load_extra_state(state)
        if "meter" in state:  # older checkpoints: the first row after the resume averages fewer steps
            self.meter.load_state_dict(state["meter"], self.device)
        ckpt.restore_rng(state["rng"])
        self.step = step

    def _note_other_threads(self, was: int | None) -> None:
        """Another CPU thread count splits the steps' float sums otherwise (about 1e-6 apart), as in
        sampling: the resume goes on, but no longer bit for bit as the uninterrupted run, so it says so."""
        now = torch.get_num_threads()
        if was is None or was == now or self.device.type != "cpu" or not dist.is_main():
            return

        def threads(n: int) -> str:
            return f"{n} CPU thread{'' if n == 1 else 's'}"

        print(
            f"note: the checkpoint's steps ran with {threads(was)}, the resume's with {threads(now)}: "
            "float sums about 1e-6 apart from an uninterrupted run's (the same --threads continues "
            "it bit for bit)",
            file=sys.stderr,
        )

    def _check_ranks_resume(self, record: dict | None) -> None:
        """Every rank resumes the checkpoint rank 0 resumes, or all stop with one line: a rank whose
        machine does not share --out started afresh, its gradients silently mixed into rank 0's
        run, and its longer loop then waited forever at a collective rank 0 never joined."""
        if self.world == 1:
            return
        seen = dist.all_gather_objects(record and record["step"])
        if len(set(seen)) > 1:
            steps = ", ".join(f"rank {r} {'none' if s is None else f'step {s}'}" for r, s in enumerate(seen))
            raise TrainingError(
                f"cannot resume {self.out}: the ranks see different checkpoints there ({steps}); "
                "under torchrun --out must be a folder every rank shares"
            )

    def _check_fits(self, weights: dict, name: str) -> None:
        try:
            check_fits(weights, self.model)
        except CheckpointError:  # its message lists the keys, over many lines
            raise CheckpointError(
                f"cannot resume {self.out}: {name} does not fit the network its flags describe"
            ) from None

    def data_fingerprint(self) -> dict:
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = fingerprint(self.dataset)
        return self._fingerprint

    def check_resume(self, state: dict) -> None:
        """Refuse, naming each difference, what would break the promised bit-exact continuation."""
        diffs = _settings_diffs(self.kind, state, self.config.record(), self.micro, self.world)
        was = state.get("data", {}).get("fingerprint")
        if was is not None and was != self.data_fingerprint():
            now = self.data_fingerprint()
            diffs.append(
                changed("data items", was["count"], now["count"])
                if was["count"] != now["count"]
                else "data (same count, other content)"
            )
        if diffs:
            raise _other_settings(self.out, diffs)
