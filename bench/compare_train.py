#!/usr/bin/env python
"""Training on the CPU: process CPU time per step of ``fastdiff train`` and ``train-classifier``'s
loops against guided-diffusion's (image_train.py's TrainLoop, classifier_train.py), on the bundled
MNIST networks (the mnist presets) in fp32, from the same weights and the same batches.

    python bench/compare_train.py --guided-diffusion /path/to/guided-diffusion [--steps 30]

One process, one thread (``--threads``), the two sides' steps in alternation, so the machine's
load (recorded before and after) falls on both: fastdiff's own loop (``TrainLoop._loop``, its
logging included) draws each batch from a generator that runs one step of the original first,
as its run_loop runs it (run_step, logger.dumpkvs every ``--log-every`` steps), and
classifier_train.py's main() draws each batch from one that runs one step of fastdiff's
classifier loop; a side's step is the CPU time between two of its draws. The settings are the
MNIST recipe's (recipes/README.md: AdamW with two EMA rates, warm-up, clipping, label dropout;
the original takes the LR, decay and EMA rates, and neither clips nor drops labels). The first
``--warmup`` steps of each side are left out; the report gives the medians. The original runs
with stand-ins for mpi4py (one rank) and blobfile (local files), as tests/test_training_original.py.
Written to bench/results/<date>-cpu-train{-TAG}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.compare_original import _count  # noqa: E402
from bench.machine import machine_info, write_record  # noqa: E402
from bench.original_sample import bundled_networks  # noqa: E402


def _original(path: Path, logdir: Path) -> types.SimpleNamespace:
    """guided-diffusion's modules on one rank, its logger writing csv to ``logdir``."""
    from fastdiff.compat import blobfile

    mpi = types.ModuleType("mpi4py.MPI")
    mpi.COMM_WORLD = types.SimpleNamespace(
        rank=0, size=1, Get_rank=lambda: 0, Get_size=lambda: 1, bcast=lambda obj, root=0: obj
    )
    sys.modules.update({"mpi4py": types.SimpleNamespace(MPI=mpi), "mpi4py.MPI": mpi, "blobfile": blobfile})
    sys.path.insert(0, str(path))
    for name in ("RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES"):
        os.environ.pop(name, None)
    os.environ.update(OPENAI_LOGDIR=str(logdir), OPENAI_LOG_FORMAT="csv")
    import importlib.util

    from guided_diffusion import dist_util, logger, resample, script_util, train_util

    script = path / "scripts" / "classifier_train.py"
    spec = importlib.util.spec_from_file_location("classifier_train", script)
    classifier_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(classifier_train)
    dist_util.setup_dist()
    logger.configure()
    return types.SimpleNamespace(
        logger=logger,
        resample=resample,
        script_util=script_util,
        train_util=train_util,
        classifier_train=classifier_train,
    )


def _data(n: int, classes: int):
    from fastdiff.training.data import ArrayDataset

    rng = np.random.default_rng(0)
    return ArrayDataset(rng.integers(0, 256, (n, 32, 32, 1), dtype=np.uint8), np.arange(n) % classes)


def _batches(data, batch: int, steps: int):
    """The batches both sides train on, in order (fastdiff's flips and label dropout aside)."""
    order = np.random.default_rng(1).permutation(steps * batch) % len(data)
    for k in range(steps):
        items = [data[i] for i in order[k * batch : (k + 1) * batch]]
        yield torch.stack([x for x, _ in items]), torch.as_tensor([y for _, y in items])


def _process(flags: dict, gd) -> object:
    return gd.script_util.create_gaussian_diffusion(
        steps=flags["diffusion_steps"],
        learn_sigma=flags["learn_sigma"],
        noise_schedule=flags["noise_schedule"],
        use_kl=flags["use_kl"],
        predict_xstart=flags["predict_xstart"],
        rescale_timesteps=flags["rescale_timesteps"],
        rescale_learned_sigmas=flags["rescale_learned_sigmas"],
    )


def _config(kind: str, flags: dict, data, out: Path, args, **settings):
    from fastdiff.models import configs_from_flags
    from fastdiff.training import TrainConfig, fit_classifier, fit_unet

    net, process = configs_from_flags(kind, flags)
    cfg_dropout = settings.get("cfg_dropout", 0.0)
    net = fit_unet(net, data, cfg_dropout) if kind == "diffusion" else fit_classifier(net, data)
    return TrainConfig(
        net=net,
        process=process,
        out=str(out),
        batch_size=args.batch_size,
        max_steps=args.warmup + args.steps + 1,  # the last step's checkpoint is not timed
        log_every=args.log_every,
        save_every=0,
        progress=False,
        seed=0,
        device="cpu",
        **settings,
    )


def _diffusion(args, gd, tmp: Path) -> dict:
    from fastdiff.progress import progress_bar
    from fastdiff.training import DiffusionTrainer

    model, _, flags, _ = bundled_networks()
    data = _data(256, 10)
    settings = {"lr": 2e-4, "warmup_steps": 200, "grad_clip": 1.0, "ema": (0.999, 0.9995), "cfg_dropout": 0.1}
    trainer = DiffusionTrainer(_config("diffusion", flags, data, tmp / "fastdiff", args, **settings), data)
    model.load_state_dict(trainer.model.state_dict())
    diffusion = _process(flags, gd)
    loop = gd.train_util.TrainLoop(
        model=model,
        diffusion=diffusion,
        data=None,
        batch_size=args.batch_size,
        microbatch=-1,
        lr=settings["lr"],
        ema_rate=",".join(map(str, settings["ema"])),
        log_interval=args.log_every,
        save_interval=10**9,
        resume_checkpoint="",
        schedule_sampler=gd.resample.create_named_schedule_sampler("uniform", diffusion),
    )
    times = {"fastdiff": [], "original": []}

    def batches():
        mark = None
        for x, y in _batches(data, args.batch_size, trainer.config.max_steps):
            start = time.process_time()
            if mark is not None:
                times["fastdiff"].append(start - mark)
            loop.run_step(x, {"y": y})  # run_loop's step
            if loop.step % loop.log_interval == 0:
                gd.logger.dumpkvs()
            loop.step += 1
            mark = time.process_time()
            times["original"].append(mark - start)
            yield x, y

    trainer._loop(batches(), progress_bar(total=trainer.config.max_steps, disable=True))
    return _row("diffusion (image_train.py)", times, args)


def _classifier(args, gd, tmp: Path) -> dict:
    from fastdiff.progress import progress_bar
    from fastdiff.training import ClassifierTrainer

    _, model, _, flags = bundled_networks()
    data = _data(256, flags["num_classes"])
    settings = {"lr": 3e-4, "warmup_steps": 100, "grad_clip": 1.0, "ema": ()}
    config = _config("classifier", flags, data, tmp / "fastdiff_classifier", args, **settings)
    trainer = ClassifierTrainer(config, data)
    model.load_state_dict(trainer.model.state_dict())
    bar = progress_bar(total=trainer.config.max_steps, disable=True)
    times = {"fastdiff": [], "original": []}

    def load_data(**_):
        mark = None
        for x, y in _batches(data, args.batch_size, trainer.config.max_steps):
            start = time.process_time()
            if mark is not None:
                times["original"].append(start - mark)
            trainer.run_step(x, y)  # fastdiff's _loop's step, its logging included
            trainer.step += 1
            if trainer.step % trainer.config.log_every == 0:
                trainer.log(bar)
            trainer.after_step()
            mark = time.process_time()
            times["fastdiff"].append(mark - start)
            yield x, {"y": y}

    script = gd.classifier_train
    script.create_classifier_and_diffusion = lambda **_: (model, _process(flags, gd))
    script.load_data = load_data
    script.DDP = lambda model, **_: model  # one process: DDP's bucket copies are no work of the step
    argv = {
        "iterations": trainer.config.max_steps,
        "batch_size": args.batch_size,
        "lr": settings["lr"],
        "log_interval": args.log_every,
        "eval_interval": 10**9,
        "save_interval": 10**9,
    }
    sys.argv = ["classifier_train.py", *(f"--{k}={v}" for k, v in argv.items())]
    script.main()
    return _row("classifier (classifier_train.py)", times, args)


def _row(job: str, times: dict, args) -> dict:
    ms = {side: [1e3 * s for s in t[args.warmup : args.warmup + args.steps]] for side, t in times.items()}
    fastdiff, original = (statistics.median(ms[side]) for side in ("fastdiff", "original"))
    return {
        "job": job,
        "batch_size": args.batch_size,
        "steps": len(ms["fastdiff"]),
        "fastdiff_ms": round(fastdiff, 1),
        "original_ms": round(original, 1),
        "speedup": round(original / fastdiff, 3),
        "fastdiff_ms_all": [round(t, 1) for t in ms["fastdiff"]],
        "original_ms_all": [round(t, 1) for t in ms["original"]],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guided-diffusion", required=True, type=Path)
    ap.add_argument("--steps", type=_count(1), default=30, help="timed steps of each side and job")
    ap.add_argument("--warmup", type=_count(0), default=3, help="untimed first steps of each side")
    ap.add_argument("--batch-size", type=_count(1), default=16)
    ap.add_argument("--log-every", type=_count(1), default=10)
    ap.add_argument("--threads", type=_count(1), default=1)
    jobs = ["diffusion", "classifier"]
    ap.add_argument("--jobs", nargs="+", default=jobs, choices=jobs)
    ap.add_argument("--tag", default="", help="report name suffix: <date>-cpu-train-TAG")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    if not (args.guided_diffusion / "guided_diffusion" / "unet.py").is_file():
        ap.error(f"{args.guided_diffusion} is not a guided-diffusion checkout")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        gd = _original(args.guided_diffusion.resolve(), Path(tmp) / "original")
        for job in args.jobs:
            rows.append((_diffusion if job == "diffusion" else _classifier)(args, gd, Path(tmp)))
            print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("_all")}), flush=True)

    load_after = os.getloadavg()[0]
    info = machine_info(threads=args.threads, load_1min_before=load_before, load_1min_after=load_after)
    lines = [
        f"# Training on the CPU: fastdiff's loops vs guided-diffusion's ({info['date']})",
        "",
        f"Machine: {info['cores']} cores ({info['cpu']}), torch {info['torch']}, {args.threads} thread(s), "
        f"1-min load {info['load_1min_before']:.2f} before and {info['load_1min_after']:.2f} after. Command: "
        f"`python bench/compare_train.py --guided-diffusion PATH --steps {args.steps} --warmup {args.warmup} "
        f"--batch-size {args.batch_size} --log-every {args.log_every} --threads {args.threads} "
        f"--jobs {' '.join(args.jobs)}`. The bundled MNIST networks (the mnist presets), fp32, the "
        "two sides' steps in alternation in one process; median process CPU time per step.",
        "",
        "| job | batch | steps | fastdiff ms/step | original ms/step | original / fastdiff |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['job']} | {r['batch_size']} | {r['steps']} | {r['fastdiff_ms']:.1f} | "
            f"{r['original_ms']:.1f} | {r['speedup']:.2f} |"
        )
    write_record(args.out_dir, "cpu-train", {"machine": info, "rows": rows}, lines, args.tag)


if __name__ == "__main__":
    main()
