"""fastdiff's own trainers against guided-diffusion's training code (image_train.py's TrainLoop,
classifier_train.py), given the same draws.

The own loop keys its draws by (seed, step, micro-batch), so it does not repeat the original's
random stream (tests/test_compat_training.py checks compat's loop, which does). Here the own
trainer runs as it is; what it drew (its batches, timesteps, noise and dropout stream) is recorded
and handed to the original code in place of its own draws (``np.random.choice`` of its schedule
sampler, ``th.randn_like`` of its process, the global generator), from the same initial weights.
Then the two must hold the same weights, EMA weights, AdamW state and schedule-sampler state, and
have logged the same losses.
Where fastdiff differs on purpose (loop.py's docstring: micro-batch weighting, clipping, when the
loss-aware sampler learns, the fp16 loss scale's start, the anneal's step), the original is given
fastdiff's choice here, or the difference itself is what a test checks.
"""

from __future__ import annotations

import copy
import csv
import importlib
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_compat_scripts import ORIGINAL, needs_original

from fastdiff.compat import blobfile
from fastdiff.models import configs_from_flags, parse_flags
from fastdiff.training import ClassifierTrainer, DiffusionTrainer, TrainConfig, fit_classifier, fit_unet
from fastdiff.training.data import ArrayDataset

pytestmark = needs_original

STEPS = 4
# A tiny ADM the original builds at 8 px (its create_model takes an explicit channel_mult).
NET = {
    "image_size": 8,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2",
    "attention_resolutions": "4",
    "num_head_channels": 16,
    "learn_sigma": True,
    "noise_schedule": "cosine",
    "diffusion_steps": 4,  # few timesteps: loss-second-moment's history fills within the run
}
# The original's create_classifier knows sizes 64 to 512 and 64 channels per attention head.
CLASSIFIER = {
    "image_size": 64,
    "classifier_width": 32,
    "classifier_depth": 1,
    "classifier_attention_resolutions": "8",
    "diffusion_steps": 40,
}


def images(n: int, size: int, labels: list[int]) -> ArrayDataset:
    rng = np.random.default_rng(0)
    return ArrayDataset(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.array(labels))


def flag_string(flags: dict) -> str:
    return " ".join(f"--{k} {v}" for k, v in flags.items())


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def compared_config(net, process, out: Path, **settings) -> TrainConfig:
    """The own trainer's settings in a comparison: a log row every step unless ``settings`` say,
    no checkpoint, bar or gradient clipping (the original clips nothing)."""
    settings = {"log_every": 1, **settings}
    return TrainConfig(
        net=net, process=process, out=str(out), save_every=0, progress=False, grad_clip=0.0, **settings
    )


def import_original(mp: pytest.MonkeyPatch, rank: int = 0, size: int = 1) -> types.SimpleNamespace:
    """The original's modules, imported afresh from the checkout (another test may have imported
    them with other stand-ins) with stand-ins for mpi4py (rank ``rank`` of ``size``, as mpiexec
    numbers them; its bcast is only reached by setup_dist, which finds the gloo group in place on
    more ranks) and blobfile (local files), which this venv lacks. ``mp`` undoes it."""
    mpi = types.ModuleType("mpi4py.MPI")
    mpi.COMM_WORLD = types.SimpleNamespace(
        rank=rank,
        size=size,
        Get_rank=lambda: rank,
        Get_size=lambda: size,
        bcast=lambda obj, root=0: obj,
    )
    for name in [n for n in sys.modules if n.split(".")[0] == "guided_diffusion"]:
        mp.delitem(sys.modules, name)
    mp.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=mpi))
    mp.setitem(sys.modules, "mpi4py.MPI", mpi)
    mp.setitem(sys.modules, "blobfile", blobfile)
    mp.syspath_prepend(ORIGINAL)
    names = ("script_util", "train_util", "resample", "logger", "dist_util", "image_datasets")
    mods = types.SimpleNamespace(**{n: importlib.import_module(f"guided_diffusion.{n}") for n in names})
    spec = importlib.util.spec_from_file_location(
        "gd_classifier_train", Path(ORIGINAL) / "scripts" / "classifier_train.py"
    )
    mods.classifier_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mods.classifier_train)
    assert Path(mods.train_util.__file__).is_relative_to(ORIGINAL), "guided_diffusion is not the original"
    return mods


@pytest.fixture(scope="module")
def gd():
    """The original's modules on one rank (:func:`import_original`), for this module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        return import_original(mp)


@pytest.fixture
def original_group(gd, monkeypatch, tmp_path):
    """One-rank process group of the original's setup_dist, and its logger writing to tmp_path;
    both gone after the test (fastdiff's trainers read torchrun's variables)."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        # set first, so monkeypatch records each and undoes what setup_dist sets (delenv of an
        # absent one records nothing: the group's variables leaked into the worker's later tests)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "original"))
    monkeypatch.setenv("OPENAI_LOG_FORMAT", "csv")
    monkeypatch.setenv("FASTDIFF_OPS", "reference")  # the original's arithmetic, no fused kernel
    gd.dist_util.setup_dist()
    gd.logger.configure()
    yield gd
    gd.logger.reset()
    torch.distributed.destroy_process_group()


class Draws:
    """What the own trainer drew, in order, and the original's draws replaced by it."""

    def __init__(self):
        self.batches, self.t, self.noise, self.rng = [], [], [], []

    def record(self, trainer, process_method: str) -> None:
        """Spy on ``trainer.run_step`` (batches) and the process' method that takes t and noise."""
        run_step, method = trainer.run_step, getattr(trainer.diffusion, process_method)

        def step(x, y):
            self.batches.append((x.clone(), y.clone()))
            return run_step(x, y)

        def spy(*args, noise, **kwargs):
            self.t.append(args[-1].clone())
            self.noise.append(noise.clone())
            self.rng.append(torch.get_rng_state())  # the dropout masks' stream
            return method(*args, noise=noise, **kwargs)

        trainer.run_step = step
        setattr(trainer.diffusion, process_method, spy)

    def inject(self, monkeypatch, gd, diffusion, process_method: str, per_draw: int = 1) -> None:
        """The original's schedule sampler draws the recorded t, its process the recorded noise,
        ``per_draw`` recorded draws at a time (classifier_train.py draws for a whole batch, the
        own trainer for each micro-batch)."""
        ts, noises, rngs = iter(self.t), iter(self.noise), iter(self.rng)

        def choice(n, size, p):
            t = torch.cat([next(ts) for _ in range(per_draw)]).numpy()
            assert t.shape == size and t.max() < n and (p[t] > 0).all()
            return t

        method = getattr(diffusion, process_method)

        def with_noise(*args, **kwargs):
            assert kwargs.get("noise") is None
            noise = torch.cat([next(noises) for _ in range(per_draw)])
            rng = [next(rngs) for _ in range(per_draw)]
            torch.set_rng_state(rng[0])  # dropout: only the diffusion model has any (per_draw 1)
            return method(*args, **kwargs, noise=noise.reshape(args[-2].shape))

        # the original's module numpy, with this choice (and np.int, which numpy 1.24 removed)
        random = types.SimpleNamespace(choice=choice)
        numpy = types.SimpleNamespace(**{**vars(np), "random": random, "int": int})
        monkeypatch.setattr(gd.resample, "np", numpy)
        monkeypatch.setattr(diffusion, process_method, with_noise)

    def check_used(self, diffusion_draws: int) -> None:
        assert len(self.t) == diffusion_draws and len(self.noise) == diffusion_draws


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().float().flatten() for t in tensors])


def assert_same_update(start, want, got, what: str, tol: float = 1e-2) -> None:
    """The same change from ``start``, up to rounding. AdamW turns a gradient element's rounding
    into up to a whole step where that element is near 0 (measured: 1e-3 to 2.4e-3 of the update's
    norm, from loss terms that agree to 1e-7); a wrong LR, decay or rate is 1e-1 or more."""
    assert [w.shape for w in want] == [g.shape for g in got], what
    start, want, got = flat(start), flat(want), flat(got)
    assert (want - got).norm() <= tol * (want - start).norm(), what


def assert_same_optimizer(want: dict, got: dict) -> None:
    """AdamW's settings, step counts and moments (the moments' own scale: they start at 0). Its
    foreach is no setting of the numbers (loop.py's ADAMW_IMPLEMENTATION: the same to the bit)."""

    def settings(state: dict) -> list[dict]:
        return [{k: v for k, v in group.items() if k != "foreach"} for group in state["param_groups"]]

    assert settings(want) == settings(got)
    assert want["state"].keys() == got["state"].keys()
    steps = [{float(s["step"]) for s in o["state"].values()} for o in (want, got)]
    assert steps[0] == steps[1]
    for key in ("exp_avg", "exp_avg_sq"):
        zero = [torch.zeros_like(s[key]) for s in want["state"].values()]
        wanted, gotten = ([s[key] for s in o["state"].values()] for o in (want, got))
        assert_same_update(zero, wanted, gotten, f"AdamW {key}")


# ---------------------------------------------------------------- image_train.py's TrainLoop

DIFFUSION_GRID = {
    "hybrid loss": ({}, {}),
    "lr, weight decay, two EMA rates": ({}, {"lr": 3e-3, "weight_decay": 0.05, "ema": (0.9, 0.99)}),
    "micro-batches": ({}, {"microbatch": 2, "ema": (0.5,)}),
    # 4 timesteps x 10 losses of history: the importance weights take over after ~3 steps of 16
    "loss-second-moment": ({}, {"schedule_sampler": "loss-second-moment", "batch_size": 16, "max_steps": 6}),
    "loss-second-moment, micro-batches": (
        {},
        {"schedule_sampler": "loss-second-moment", "batch_size": 16, "max_steps": 6, "microbatch": 8},
    ),
    "class_cond, use_kl": ({"class_cond": True, "use_kl": True}, {}),
    "dropout": ({"dropout": 0.3}, {}),
    "predict_xstart, fixed sigma": ({"predict_xstart": True, "learn_sigma": False}, {}),
    # The original starts its loss scale at 2**20, GradScaler at 2**16 (loop.py): the same start here.
    "use_fp16 / fp16 precision": ({"use_fp16": True}, {"precision": "fp16"}),
    "rescale_learned_sigmas off, rescale_timesteps": (
        {"rescale_learned_sigmas": False, "rescale_timesteps": True},
        {},
    ),
}


@pytest.mark.parametrize("flags, settings", DIFFUSION_GRID.values(), ids=DIFFUSION_GRID)
def test_diffusion_trainer_is_image_trains_loop(flags, settings, original_group, monkeypatch, tmp_path):
    gd = original_group
    flags = {**NET, **flags}
    settings = {"batch_size": 8, "lr": 1e-3, "ema": (0.9999,), "max_steps": STEPS, **settings}
    fp16 = flags.get("use_fp16", False)
    data = images(16, 8, [0, 1, 2, 1] * 4)
    net, process = configs_from_flags("diffusion", parse_flags(flag_string(flags)))
    config = compared_config(
        fit_unet(net, data), process, tmp_path / "own", log_every=settings["max_steps"], **settings
    )
    trainer = DiffusionTrainer(config, data)
    init = copy.deepcopy(trainer.model.state_dict())
    draws = Draws()
    draws.record(trainer, "training_losses")
    trainer.run()

    monkeypatch.setattr(gd.script_util, "NUM_CLASSES", 3)  # the original's label table has 1000 rows
    defaults = gd.script_util.model_and_diffusion_defaults()
    model, diffusion = gd.script_util.create_model_and_diffusion(**{**defaults, **flags})
    model.load_state_dict(init)
    draws.inject(monkeypatch, gd, diffusion, "training_losses")
    sampler = gd.resample.create_named_schedule_sampler(config.schedule_sampler, diffusion)
    micro = trainer.micro
    loop = gd.train_util.TrainLoop(
        model=model,
        diffusion=diffusion,
        data=None,
        batch_size=config.batch_size,
        microbatch=config.microbatch,
        lr=config.lr,
        ema_rate=",".join(map(str, config.ema)),
        log_interval=config.max_steps,
        save_interval=config.max_steps,
        resume_checkpoint="",
        schedule_sampler=sampler,
        weight_decay=config.weight_decay,
        use_fp16=fp16,
    )
    if fp16:
        loop.mp_trainer.lg_loss_scale = math.log2(torch.amp.GradScaler("cpu").get_scale())
    # fastdiff weighs each micro-batch's mean loss by its share of the batch; the original sums
    # the means (loop.py's docstring): the original's backward scaled back to the batch's mean.
    backward = loop.mp_trainer.backward
    loop.mp_trainer.backward = lambda loss: backward(loss * micro / config.batch_size)
    if micro < config.batch_size and config.schedule_sampler == "loss-second-moment":
        # fastdiff's sampler learns a step's losses after the step (loop.py's docstring); the
        # original's after each micro-batch, before the next one draws: deferred to the step's end.
        held, update = [], sampler.update_with_local_losses
        sampler.update_with_local_losses = lambda t, losses: held.append((t, losses))
    for x, y in draws.batches:
        loop.run_step(x, {"y": y} if flags.get("class_cond") else {})
        loop.step += 1
        if micro < config.batch_size and config.schedule_sampler == "loss-second-moment":
            update(torch.cat([t for t, _ in held]), torch.cat([loss for _, loss in held]))
            held.clear()
    draws.check_used(config.max_steps * config.batch_size // micro)

    names = [name for name, _ in trainer.model.named_parameters()]
    start = [init[name] for name in names]
    # fp16: the original's torso computes with fp16 weights, autocast with fp32 ones (measured 0.04)
    tol = 0.1 if fp16 else 1e-2
    weights = loop.mp_trainer.master_params_to_state_dict(loop.mp_trainer.master_params)
    assert_same_update(start, [weights[n] for n in names], list(trainer.model.parameters()), "weights", tol)
    for rate, params in zip(config.ema, loop.ema_params, strict=True):
        ema = loop.mp_trainer.master_params_to_state_dict(params)
        assert_same_update(start, [ema[n] for n in names], trainer.ema.params[rate], f"EMA {rate}", tol)
    if fp16:  # AdamW's state is over the original's two flat masters
        assert loop.mp_trainer.lg_loss_scale == pytest.approx(16 + config.max_steps * 1e-3)  # no skip
        assert trainer.scaler.get_scale() == 2**16 and log_rows(tmp_path / "own")[-1]["skipped"] == 0
    else:
        assert_same_optimizer(loop.opt.state_dict(), trainer.opt.state_dict())
    if config.schedule_sampler == "loss-second-moment":
        assert sampler._warmed_up()  # the importance weights took part
        own = trainer.schedule_sampler.state_dict()
        assert np.array_equal(own["counts"].numpy(), sampler._loss_counts)
        np.testing.assert_allclose(own["history"].numpy(), sampler._loss_history, rtol=1e-5)

    logged = gd.logger.getkvs()
    row = log_rows(tmp_path / "own")[-1]
    assert row["step"] == config.max_steps and row["samples"] == config.max_steps * config.batch_size
    for key in ("loss", "mse", "vb"):
        for name in [key] + [f"{key}_q{q}" for q in range(4)]:
            if name in logged or name in row:
                assert row[name] == pytest.approx(logged[name], rel=1e-5), name
    assert row["grad_norm"] == pytest.approx(logged["grad_norm"], rel=1e-5)


def test_lr_anneal_is_classifier_trains_and_image_train_lags_a_step(gd, tmp_path):
    """--anneal is classifier_train.py's rule, lr (1 - step / steps) at step 0, 1, ...
    image_train.py's TrainLoop sets a step's LR after the step before it: the same values a step
    late (steps 0 and 1 both at the full LR), the documented difference (loop.py)."""
    steps, lr = 5, 1e-3
    ds = images(4, 8, [0, 1, 2, 1])
    net, process = configs_from_flags("diffusion", parse_flags(flag_string(NET)))
    net = fit_unet(net, ds)
    config = TrainConfig(net=net, process=process, out=str(tmp_path), lr=lr, lr_anneal_steps=steps)
    own = [DiffusionTrainer.lr_at(types.SimpleNamespace(config=config), s) for s in range(steps)]

    def image_train_lrs() -> list[float]:
        opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr)
        loop = types.SimpleNamespace(lr=lr, lr_anneal_steps=steps, resume_step=0, opt=opt)
        lrs = []
        for loop.step in range(steps):  # run_step: the step at the LR set, then _anneal_lr
            lrs.append(opt.param_groups[0]["lr"])
            gd.train_util.TrainLoop._anneal_lr(loop)
        return lrs

    def classifier_train_lrs() -> list[float]:
        opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr)
        lrs = []
        for step in range(steps):  # main's loop: set_annealed_lr, then the step
            gd.classifier_train.set_annealed_lr(opt, lr, step / steps)
            lrs.append(opt.param_groups[0]["lr"])
        return lrs

    assert own == pytest.approx(classifier_train_lrs(), rel=1e-12)
    assert own == pytest.approx([lr * (1 - s / steps) for s in range(steps)], rel=1e-12)
    assert image_train_lrs() == pytest.approx([lr, *own[:-1]], rel=1e-12)


# ---------------------------------------------------------------- classifier_train.py


def logged_value(row: dict, name: str) -> float:
    """A value of the original's progress.csv; a quartile no example fell in is empty or absent."""
    return float(row.get(name) or "nan")


def approx(row: dict, name: str):
    return pytest.approx(row.get(name, math.nan), rel=1e-5, nan_ok=True)


CLASSIFIER_GRID = {
    "plain": {},
    "lr, weight decay, anneal": {"lr": 3e-3, "weight_decay": 0.05, "lr_anneal_steps": STEPS},
    "micro-batches": {"microbatch": 2},
    "held-out evaluation": {"max_steps": 1, "eval_every": 1},
    "held-out evaluation, micro-batches": {"max_steps": 1, "eval_every": 1, "microbatch": 2},
}


@pytest.mark.parametrize("settings", CLASSIFIER_GRID.values(), ids=CLASSIFIER_GRID)
def test_classifier_trainer_is_classifier_train(settings, original_group, monkeypatch, tmp_path):
    """Noised training, micro-batches, --anneal_lr over --iterations, and the held-out loss and
    top-1/top-5 accuracy per quartile as the original logs them. Its evaluation follows the step
    (the own trainer's after step --eval-every, the original's after step 0 of every
    --eval_interval): compared after one step."""
    gd = original_group
    settings = {"batch_size": 4, "lr": 1e-3, "ema": (), "max_steps": STEPS, **settings}
    labels = [0, 1, 999, 1]  # the original's classifier has 1000 logits
    data, val = images(8, 64, labels * 2), images(4, 64, labels[::-1])
    net, process = configs_from_flags("classifier", parse_flags(flag_string(CLASSIFIER)))
    config = compared_config(fit_classifier(net, data), process, tmp_path / "own", **settings)
    trainer = ClassifierTrainer(config, data, val if config.eval_every else None)
    init = copy.deepcopy(trainer.model.state_dict())
    draws = Draws()
    draws.record(trainer, "q_sample")
    trainer.run()
    rows = log_rows(tmp_path / "own")

    n_micro = config.batch_size // trainer.micro
    batches = iter(draws.batches)
    val_batch = (torch.stack([val[i][0] for i in range(len(val))]), {"y": torch.as_tensor(val.labels)})

    def create(**kwargs):
        model, diffusion = gd.script_util.create_classifier_and_diffusion(**kwargs)
        model.load_state_dict(init)
        draws.inject(monkeypatch, gd, diffusion, "q_sample", per_draw=n_micro)
        return model, diffusion

    def load_data(data_dir, **_):
        return iter([val_batch]) if data_dir == "val" else ((x, {"y": y}) for x, y in batches)

    script = gd.classifier_train
    monkeypatch.setattr(script, "create_classifier_and_diffusion", create)
    monkeypatch.setattr(script, "load_data", load_data)
    monkeypatch.setattr(script, "DDP", lambda model, **_: torch.nn.parallel.DistributedDataParallel(model))
    flags = {**CLASSIFIER, "classifier_use_fp16": False}
    args = {
        "data_dir": "train",
        "iterations": config.max_steps,
        "anneal_lr": bool(config.lr_anneal_steps),
        "batch_size": config.batch_size,
        "microbatch": config.microbatch or -1,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "log_interval": 1,
        "eval_interval": 10**6,
        **flags,
    }
    if config.eval_every:
        args["val_data_dir"] = "val"
    monkeypatch.setattr(sys, "argv", ["classifier_train.py", *flag_string(args).split()])
    script.main()
    draws.check_used(config.max_steps * n_micro + (n_micro if config.eval_every else 0))

    logdir = tmp_path / "original"
    last = config.max_steps - 1  # the original names its last checkpoint by the step's index
    weights = torch.load(logdir / f"model{last:06d}.pt", weights_only=True)
    assert weights.keys() == init.keys()
    assert_same_update(init.values(), weights.values(), trainer.model.state_dict().values(), "weights")
    opt = torch.load(logdir / f"opt{last:06d}.pt", weights_only=True)
    assert_same_optimizer(opt, trainer.opt.state_dict())

    with open(logdir / "progress.csv") as f:
        logged = list(csv.DictReader(f))
    train_rows = [r for r in rows if "loss" in r]
    assert [int(r["step"]) + 1 for r in logged] == [r["step"] for r in train_rows]
    assert all(math.isfinite(logged_value(r, "train_acc@5")) for r in logged)
    for want, got in zip(logged, train_rows, strict=True):
        for key in ("loss", "acc@1", "acc@5"):
            for name in [key] + [f"{key}_q{q}" for q in range(4)]:
                assert logged_value(want, f"train_{name}") == approx(got, name), name
        assert float(want["grad_norm"]) == pytest.approx(got["grad_norm"], rel=1e-5)
    if config.eval_every:
        (evaluation,) = [r for r in rows if "val_loss" in r]
        assert math.isfinite(logged_value(logged[0], "val_acc@5"))
        for key in ("loss", "acc@1", "acc@5"):
            for name in [f"val_{key}"] + [f"val_{key}_q{q}" for q in range(4)]:
                assert logged_value(logged[0], name) == approx(evaluation, name), name
