"""fastdiff's trainers against guided-diffusion's training code on two ranks (gloo on this CPU),
given the same draws: tests/test_training_original.py's comparison, one process per rank.

Each rank runs the own trainer under torchrun's variables, records what it drew (``Draws``) and
replays that into the original's TrainLoop / classifier_train.py on the same rank, in the same
process group (the original's setup_dist finds it in place), with an mpi4py stand-in numbering the
ranks as mpiexec would. The ranks write what they hold to files; the test compares them here,
per rank and per step: the losses, the logged means, weights, EMA, AdamW moments, the
loss-second-moment sampler's state, the checkpoint rank 0 writes, and the data each rank saw.

On the CPU the original does not synchronise gradients (train_util.py wraps DDP only where CUDA
is, and warns): its model is wrapped here as its CUDA branch wraps it, in DDP without device ids,
as DDP runs on the CPU. Besides the one-rank differences, the own trainer differs on purpose in
what loop.py's docstring lists for several ranks: the global --batch-size, each rank's slice of
one data order, and the logged mean over all ranks (the original logs rank 0's share).
"""

from __future__ import annotations

import copy
import csv
import math
import re
import socket
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_compat_scripts import needs_original
from test_training_original import (
    CLASSIFIER,
    NET,
    STEPS,
    Draws,
    assert_same_optimizer,
    assert_same_update,
    compared_config,
    flag_string,
    images,
    import_original,
    log_rows,
)

from fastdiff import distributed
from fastdiff.models import configs_from_flags, parse_flags
from fastdiff.training import ClassifierTrainer, DiffusionTrainer, fit_classifier, fit_unet
from fastdiff.training import checkpoint as ckpt
from fastdiff.training.data import ImageFolderDataset, ShardedSampler

# two processes, each running every case: about 1.5 minutes
pytestmark = [needs_original, pytest.mark.slow]

RANKS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cases(rank: int, port: int, root: Path) -> None:
    """Every case on this rank, one after the other in one process group (a process per case
    spent most of its time importing torch): each saves what this rank holds to its folder."""
    with pytest.MonkeyPatch.context() as mp:
        env = {"RANK": rank, "WORLD_SIZE": RANKS, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        for name, value in {**env, "OMPI_COMM_WORLD_RANK": rank, "FASTDIFF_OPS": "reference"}.items():
            mp.setenv(name, str(value))
        torch.set_num_threads(1)
        for case, (worker, args) in CASES.items():
            folder = root / case
            folder.mkdir(exist_ok=True)
            with pytest.MonkeyPatch.context() as case_mp:
                # the original's logger: rank 0 writes progress.csv, the others a log-rankNNN.txt
                case_mp.setenv("OPENAI_LOGDIR", str(folder / "original"))
                case_mp.setenv("OPENAI_LOG_FORMAT", "csv")
                result = worker(case_mp, import_original(case_mp, rank, RANKS), rank, folder, *args)
            torch.save(result, folder / f"rank{rank}.pt")
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> Path:
    """The folder of every case's files, the ranks having run them."""
    root = tmp_path_factory.mktemp("ranks")
    image_folder(root / "data")
    torch.multiprocessing.spawn(run_cases, args=(free_port(), root), nprocs=RANKS)
    return root


def folder_name(kind: str, case: str) -> str:
    return re.sub(r"[^\w-]+", "_", f"{kind} {case}")


def case_files(root: Path, case: str) -> tuple[Path, list[dict]]:
    """A case's folder and what each rank saved there."""
    folder = root / case
    return folder, [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(RANKS)]


def logged_steps(mp: pytest.MonkeyPatch, gd) -> list[dict]:
    """At each of the original logger's dumpkvs, before it clears them: this rank's values, and on
    rank 0 their mean over the ranks as the original's logger takes it when given an MPI comm
    (image_train.py and classifier_train.py give it none: rank 0 writes its own share)."""
    steps, dump = [], gd.logger.dumpkvs
    comm = types.SimpleNamespace(rank=distributed.rank(), gather=distributed.gather_objects)

    def dumpkvs():
        current = gd.logger.get_current()
        values = {k: float(v) for k, v in current.name2val.items()}  # numpy's among them
        counted = {k: (v, current.name2cnt.get(k, 1)) for k, v in values.items()}
        steps.append({"rank": values, "mean": gd.logger.mpi_weighted_mean(comm, counted)})
        return dump()

    mp.setattr(gd.logger, "dumpkvs", dumpkvs)
    return steps


def record_losses(trainer) -> list[float]:
    """Each micro-batch's loss on this rank, as compute_loss returns it."""
    losses, compute = [], trainer.compute_loss

    def spy(*args):
        loss, rec = compute(*args)
        losses.append(loss.item())
        return loss, rec

    trainer.compute_loss = spy
    return losses


def check_logged(
    ranks: list[dict], rows: list[dict], keys: list[str], prefix: str = "", rel: float = 1e-5
) -> None:
    """Per step: each rank's loss is that rank's logged loss; the own row is the original's mean
    over the ranks, its grad norm each rank's (DDP gave them one gradient)."""
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    for s, row in enumerate(rows):
        logged = [rank["logged"][s]["rank"] for rank in ranks]
        for r, rank in enumerate(ranks):
            losses = rank["losses"][s * rank["n_micro"] : (s + 1) * rank["n_micro"]]
            assert np.mean(losses) == pytest.approx(logged[r][f"{prefix}loss"], rel=rel), (s, r)
            assert row["grad_norm"] == pytest.approx(logged[r]["grad_norm"], rel=rel), (s, r)
        mean = ranks[0]["logged"][s]["mean"]
        for key in keys:
            for name in [key] + [f"{key}_q{q}" for q in range(4)]:
                assert row.get(name, math.nan) == pytest.approx(
                    mean.get(prefix + name, math.nan), rel=rel, nan_ok=True
                ), (s, name)
        # --batch-size is global: the original's is each rank's, its samples counted from step 0
        assert row["samples"] == logged[0]["samples"]


def check_original_log(folder: Path, ranks: list[dict], prefix: str = "") -> None:
    """The original's rank 0 writes its own share of each step's loss, the others no csv."""
    with open(folder / "original" / "progress.csv") as f:
        written = [float(r[f"{prefix}loss"]) for r in csv.DictReader(f)]
    assert written == pytest.approx([s["rank"][f"{prefix}loss"] for s in ranks[0]["logged"]], rel=1e-6)
    assert not (folder / "original" / "progress-rank001.csv").exists()


def check_same_on_ranks(ranks: list[dict], *keys: str) -> None:
    for key in keys:
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), (key, name)


# ---------------------------------------------------------------- image_train.py's TrainLoop

DIFFUSION_GRID = {
    "hybrid loss": ({}, {}),
    "micro-batches": ({}, {"microbatch": 2, "ema": (0.5,)}),
    # 4 timesteps x 10 losses of history: the importance weights take over after ~3 steps of 16
    "loss-second-moment": ({}, {"schedule_sampler": "loss-second-moment", "batch_size": 16, "max_steps": 6}),
    "loss-second-moment, micro-batches": (
        {},
        {"schedule_sampler": "loss-second-moment", "batch_size": 16, "max_steps": 6, "microbatch": 4},
    ),
    "class_cond": ({"class_cond": True}, {}),
    # The original starts its loss scale at 2**20, GradScaler at 2**16 (loop.py): the same start here.
    "use_fp16 / fp16 precision": ({"use_fp16": True}, {"precision": "fp16"}),
}
DIFFUSION_CASES = {
    name: ({**NET, **flags}, {"batch_size": 8, "lr": 1e-3, "ema": (0.9999,), "max_steps": STEPS, **settings})
    for name, (flags, settings) in DIFFUSION_GRID.items()
}


def image_folder(root: Path) -> Path:
    """16 8-px images named by class (the original's labels from its file names)."""
    data = images(16, 8, [0, 1, 2, 1] * 4)
    root.mkdir()
    for i, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        Image.fromarray(image).save(root / f"{label}_{i:02d}.png")
    return root


def diffusion_rank(mp: pytest.MonkeyPatch, gd, rank: int, folder: Path, flags: dict, settings: dict) -> dict:
    data = ImageFolderDataset(folder.parent / "data", 8)
    net, process = configs_from_flags("diffusion", parse_flags(flag_string(flags)))
    config = compared_config(fit_unet(net, data), process, folder / "own", device="cpu", **settings)
    trainer = DiffusionTrainer(config, data)
    init = copy.deepcopy(trainer.model.state_dict())
    draws = Draws()
    draws.record(trainer, "training_losses")
    losses = record_losses(trainer)
    trainer.run()

    gd.dist_util.setup_dist()  # the group the own trainer joined
    gd.logger.configure()
    logged = logged_steps(mp, gd)
    mp.setattr(gd.script_util, "NUM_CLASSES", 3)
    model, diffusion = gd.script_util.create_model_and_diffusion(
        **{**gd.script_util.model_and_diffusion_defaults(), **flags}
    )
    model.load_state_dict(init)
    draws.inject(mp, gd, diffusion, "training_losses")
    sampler = gd.resample.create_named_schedule_sampler(config.schedule_sampler, diffusion)
    micro, local = trainer.micro, trainer.local_batch
    loop = gd.train_util.TrainLoop(
        model=model,
        diffusion=diffusion,
        data=None,
        batch_size=local,
        microbatch=config.microbatch,
        lr=config.lr,
        ema_rate=",".join(map(str, config.ema)),
        log_interval=1,
        save_interval=config.max_steps,
        resume_checkpoint="",
        schedule_sampler=sampler,
        use_fp16=flags.get("use_fp16", False),
    )
    loop.mp_trainer.lg_loss_scale = math.log2(torch.amp.GradScaler("cpu").get_scale())
    assert not loop.use_ddp  # no CUDA: the original would train each rank on its own
    loop.use_ddp = True
    loop.ddp_model = distributed.data_parallel(
        model, torch.device("cpu"), bucket_cap_mb=128, find_unused_parameters=False
    )
    backward = loop.mp_trainer.backward  # micro-batches weighted as fastdiff (test_training_original)
    loop.mp_trainer.backward = lambda loss: backward(loss * micro / local)
    defer = micro < local and config.schedule_sampler == "loss-second-moment"
    if defer:  # the sampler learns after the step (test_training_original): gathered then
        held, update = [], sampler.update_with_local_losses
        sampler.update_with_local_losses = lambda t, losses: held.append((t, losses))
    for x, y in draws.batches:
        loop.run_step(x, {"y": y} if flags.get("class_cond") else {})
        loop.step += 1
        if defer:
            update(torch.cat([t for t, _ in held]), torch.cat([loss for _, loss in held]))
            held.clear()
        gd.logger.dumpkvs()
    draws.check_used(config.max_steps * local // micro)
    loop.save()  # rank 0 writes, all wait

    # the shard the original's load_data gives this rank (its DataLoader: the dataset itself)
    mp.setattr(gd.image_datasets, "DataLoader", lambda dataset, **_: [dataset])
    shard = next(
        gd.image_datasets.load_data(data_dir=str(folder.parent / "data"), batch_size=1, image_size=8)
    )
    names = [name for name, _ in trainer.model.named_parameters()]
    state = loop.mp_trainer.master_params_to_state_dict
    emas = [state(params) for params in loop.ema_params]
    result = {
        "n_micro": local // micro,
        "losses": losses,
        "logged": logged,
        "batches": draws.batches,
        "files": [str(p) for p in data.files],
        "shard": [str(p) for p in shard.local_images],
        "own": trainer.model.state_dict(),
        "original": state(loop.mp_trainer.master_params),
        "own_ema": {str(r): dict(zip(names, trainer.ema.params[r])) for r in config.ema},
        "original_ema": {str(r): {n: ema[n] for n in names} for r, ema in zip(config.ema, emas)},
        "own_opt": trainer.opt.state_dict(),
        "original_opt": loop.opt.state_dict(),
        "own_sampler": trainer.schedule_sampler.state_dict(),
        "lg_loss_scale": loop.mp_trainer.lg_loss_scale,
        "own_scale": trainer.scaler.get_scale(),
    }
    if config.schedule_sampler == "loss-second-moment":
        assert sampler._warmed_up()  # the importance weights took part
        result["original_sampler"] = {
            "history": torch.from_numpy(sampler._loss_history),
            "counts": torch.from_numpy(sampler._loss_counts),
        }
    if rank == 0:
        result["init"] = init
    gd.logger.get_current().close()  # reset() would reopen, emptying, its files
    return result


@pytest.mark.parametrize("case", DIFFUSION_CASES)
def test_diffusion_trainer_is_image_trains_loop_on_two_ranks(case, ran):
    flags, settings = DIFFUSION_CASES[case]
    folder, ranks = case_files(ran, folder_name("diffusion", case))
    fp16 = flags.get("use_fp16", False)
    # fp16: the original's torso computes with fp16 weights, autocast with fp32 ones
    tol = 0.1 if fp16 else 1e-2

    init = ranks[0]["init"]
    check_same_on_ranks(ranks, "own", "original", "own_sampler")
    for rank in ranks:
        names = list(rank["own_ema"][str(settings["ema"][0])])
        start = [init[n] for n in names]
        own, original = rank["own"], rank["original"]
        want, got = [original[n] for n in names], [own[n] for n in names]
        assert_same_update(start, want, got, "weights", tol)
        for rate, ema in rank["own_ema"].items():
            want = rank["original_ema"][rate]
            assert_same_update(start, [want[n] for n in names], list(ema.values()), f"EMA {rate}", tol)
        if fp16:  # no step skipped; AdamW's state is over the original's two flat masters
            assert rank["lg_loss_scale"] == pytest.approx(16 + settings["max_steps"] * 1e-3)
            assert rank["own_scale"] == 2**16
        else:
            assert_same_optimizer(rank["original_opt"], rank["own_opt"])
        if "original_sampler" in rank:  # every rank learned every rank's losses, in one order
            for key in ("history", "counts"):
                want, got = rank["original_sampler"][key], rank["own_sampler"][key]
                torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=0)

    rows = log_rows(folder / "own")
    check_logged(ranks, rows, ["loss", "mse", "vb"], rel=1e-3 if fp16 else 1e-5)  # fp16: 6e-5 seen
    check_original_log(folder, ranks)
    warned = (folder / "original" / "log-rank001.txt").read_text()  # why its model is wrapped here
    assert "Gradients will not be synchronized properly!" in warned

    # What rank 0 wrote: its weights, as the original's rank 0 wrote them.
    step, weights, emas, _ = ckpt.load_checkpoint(folder / "own")
    logdir = folder / "original"
    assert step == settings["max_steps"]
    assert sorted(p.name for p in logdir.glob("*.pt")) == sorted(
        [f"model{step:06d}.pt", f"opt{step:06d}.pt"] + [f"ema_{r}_{step:06d}.pt" for r in settings["ema"]]
    )
    original = torch.load(logdir / f"model{step:06d}.pt", weights_only=True)
    assert original.keys() == weights.keys() == init.keys()
    assert_same_update(init.values(), original.values(), [weights[k] for k in init], "written weights", tol)
    for rate in settings["ema"]:
        want = torch.load(logdir / f"ema_{rate}_{step:06d}.pt", weights_only=True)
        got = emas[ckpt.ema_name(rate)]
        want, got = [want[k] for k in init], [got[k] for k in init]
        assert_same_update(init.values(), want, got, f"written EMA {rate}", tol)

    # The data: rank r's slice of one data order over all the images (one process' batches), where
    # the original's rank r draws from its files[r::ranks] alone.
    files = ranks[0]["files"]
    order = ShardedSampler(len(files), settings["batch_size"])
    data = ImageFolderDataset(ran / "data", 8)
    local = settings["batch_size"] // RANKS
    for r, rank in enumerate(ranks):
        assert rank["shard"] == files[r::RANKS]
        seen = set()
        for s, (x, y) in enumerate(rank["batches"]):
            index = order.global_indices(s)[r * local : (r + 1) * local]
            assert torch.equal(x, torch.stack([data[i][0] for i in index])), (r, s)
            assert y.tolist() == [data[i][1] for i in index], (r, s)
            seen.update(files[i] for i in index)
        assert not seen <= set(rank["shard"])


# ---------------------------------------------------------------- classifier_train.py

CLASSIFIER_GRID = {"plain": {}, "micro-batches": {"microbatch": 2}}
CLASSIFIER_CASES = {
    name: {"batch_size": 8, "lr": 1e-3, "ema": (), "max_steps": STEPS, **settings}
    for name, settings in CLASSIFIER_GRID.items()
}


def classifier_rank(mp: pytest.MonkeyPatch, gd, rank: int, folder: Path, settings: dict) -> dict:
    data = images(16, 64, [0, 1, 999, 1] * 4)  # the original's classifier has 1000 logits
    net, process = configs_from_flags("classifier", parse_flags(flag_string(CLASSIFIER)))
    config = compared_config(fit_classifier(net, data), process, folder / "own", device="cpu", **settings)
    trainer = ClassifierTrainer(config, data)
    init = copy.deepcopy(trainer.model.state_dict())
    draws = Draws()
    draws.record(trainer, "q_sample")
    losses = record_losses(trainer)
    trainer.run()

    n_micro = trainer.local_batch // trainer.micro
    batches = iter(draws.batches)

    def create(**kwargs):
        model, diffusion = gd.script_util.create_classifier_and_diffusion(**kwargs)
        model.load_state_dict(init)
        draws.inject(mp, gd, diffusion, "q_sample", per_draw=n_micro)
        return model, diffusion

    script = gd.classifier_train
    logged = logged_steps(mp, gd)
    mp.setattr(script, "create_classifier_and_diffusion", create)
    mp.setattr(script, "load_data", lambda **_: ((x, {"y": y}) for x, y in batches))
    mp.setattr(script, "DDP", lambda model, **_: torch.nn.parallel.DistributedDataParallel(model))
    args = {
        "data_dir": "train",
        "iterations": config.max_steps,
        "batch_size": trainer.local_batch,
        "microbatch": config.microbatch or -1,
        "lr": config.lr,
        "log_interval": 1,
        **CLASSIFIER,
        "classifier_use_fp16": False,
    }
    mp.setattr("sys.argv", ["classifier_train.py", *flag_string(args).split()])
    script.main()
    draws.check_used(config.max_steps * n_micro)
    result = {
        "n_micro": n_micro,
        "losses": losses,
        "logged": logged,
        "own": trainer.model.state_dict(),
        "own_opt": trainer.opt.state_dict(),
    }
    if rank == 0:
        result["init"] = init
    gd.logger.get_current().close()  # reset() would reopen, emptying, its files
    return result


@pytest.mark.parametrize("case", CLASSIFIER_CASES)
def test_classifier_trainer_is_classifier_train_on_two_ranks(case, ran):
    folder, ranks = case_files(ran, folder_name("classifier", case))

    check_same_on_ranks(ranks, "own")
    init, logdir = ranks[0]["init"], folder / "original"
    last = STEPS - 1  # the original names its last checkpoint by the step's index
    assert sorted(p.name for p in logdir.glob("*.pt")) == [f"model{last:06d}.pt", f"opt{last:06d}.pt"]
    original = torch.load(logdir / f"model{last:06d}.pt", weights_only=True)
    assert original.keys() == init.keys()
    for rank in ranks:
        assert_same_update(init.values(), original.values(), rank["own"].values(), "weights")
        assert_same_optimizer(torch.load(logdir / f"opt{last:06d}.pt", weights_only=True), rank["own_opt"])
    _, written, _, _ = ckpt.load_checkpoint(folder / "own")
    assert_same_update(init.values(), original.values(), [written[k] for k in init], "written weights")
    rows = [r for r in log_rows(folder / "own") if "loss" in r]
    check_logged(ranks, rows, ["loss", "acc@1", "acc@5"], prefix="train_")
    check_original_log(folder, ranks, prefix="train_")


CASES = {
    **{folder_name("diffusion", k): (diffusion_rank, v) for k, v in DIFFUSION_CASES.items()},
    **{folder_name("classifier", k): (classifier_rank, (v,)) for k, v in CLASSIFIER_CASES.items()},
}
