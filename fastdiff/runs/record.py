"""run.json: what a run folder holds, and whether a resume (or another rank) is the same run.

A resume may ask for more samples than before (the complete batches are kept), never fewer, and
never another model, classifier, process or seed: the networks are compared by content and flags.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from fastdiff import distributed
from fastdiff.config import changed
from fastdiff.files import atomic_write
from fastdiff.runs.errors import RunError
from fastdiff.runs.folder import RUN_FILE, writing
from fastdiff.runs.loading import same_flags
from fastdiff.runs.plan import Plan
from fastdiff.runs.writer import batch_npz, final_npz_name


def read_run(run_file: Path) -> dict:
    try:
        old = json.loads(run_file.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"--resume: {run_file} is unreadable ({e}); choose another --out") from None
    if not isinstance(old, dict) or not isinstance(old.get("num_samples"), int):
        raise RunError(f"--resume: {run_file} is not a fastdiff sampling run; choose another --out")
    return old


# The parallel engine runs the eager step on batch slices (the same samples up to float rounding,
# as at another thread count: rarely a pixel level), so a resume at another thread count, which
# changes the CPU's default engine, continues the same run; the loop
# graph replays the graph engine's captured step n times over.
_SAME_SAMPLES_AS = {"parallel": "eager", "graph-loop": "graph"}


def differences(old: dict, record: dict) -> list[str]:
    """Names of what differs between two run records; networks are compared by content and flags."""
    diff = []
    # an older fastdiff clipped x0 before guiding, always, and took dpm++2m's last step at second order
    old = {"clip_guided_x0": False, "first_order_final": False, **old}
    for key in ("model", "classifier"):
        a, b = old.get(key), record[key]
        if b is None or not isinstance(a, dict):
            diff += [key] if a != b else []
            continue
        if a.get("sha256") is None:
            diff.append(f"{key} weights (an older fastdiff made this run and did not record them)")
        elif a["sha256"] != b["sha256"]:
            diff.append(changed(f"{key} weights' sha256", a["sha256"][:12], b["sha256"][:12]))
        if not same_flags(a.get("flags"), b["flags"], "classifier" if key == "classifier" else None):
            diff.append(f"{key} flags")
    skip = {"model", "classifier", "labels", "low_res", "num_samples", "engine"}
    skip |= {"clip_guided_x0", "first_order_final"}
    skip |= {"device"} - old.keys()  # an older fastdiff did not record it
    diff += [changed(k, old.get(k), v) for k, v in record.items() if k not in skip and old.get(k) != v]
    if old["clip_guided_x0"] != record.get("clip_guided_x0", False):
        diff.append(
            "when x0 is clipped (dpm++2m clips the classifier-guided x0 now, "
            "an earlier fastdiff before guiding)"
        )
    if old["first_order_final"] != record.get("first_order_final", False):
        diff.append(
            "the order of the last step (dpm++2m takes it at first order under 10 steps now, "
            "an earlier fastdiff at second order)"
        )
    engines = [_SAME_SAMPLES_AS.get(e, e) for e in (old.get("engine"), record["engine"])]
    if engines[0] != engines[1]:
        diff.append(changed("engine", old.get("engine"), record["engine"]))
    for key, name in (("labels", "classes"), ("low_res", "low_res")):  # per sample: a run may grow
        a, b = old.get(key), record.get(key)
        if a is None or b is None:
            same = a is b
        else:
            shared = min(len(a), len(b))
            same = a[:shared] == b[:shared]
        if not same:
            diff.append(name)
    return diff


def complete_batches(out: Path, batches: list[tuple[int, int]], plan: Plan, image: tuple) -> set[int]:
    """Batches on disk that are exactly what this plan makes there; a partial last batch of a
    smaller run has another size and is made again."""
    done = set()
    for b, (lo, hi) in enumerate(batches):
        path = batch_npz(out, b)
        if not path.exists():
            continue
        try:
            with np.load(path) as z:
                images = z["arr_0"]
                labels = z["arr_1"].tolist() if "arr_1" in z.files else None
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise RunError(
                f"--resume: {path} is unreadable ({e}); delete it to make that batch again"
            ) from None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != image:
            raise RunError(
                f"--resume: {path} holds {images.dtype} images of shape {images.shape[1:]}, "
                f"this run makes uint8 {image}; delete it to make that batch again"
            )
        if len(images) != hi - lo:
            continue
        if labels != (None if plan.labels is None else plan.labels[lo:hi]):
            raise RunError(
                f"--resume: the labels in {path} are not this run's; delete it to make that batch again"
            )
        done.add(b)
    return done


def check_resumable(out: Path, record: dict) -> dict:
    """The run.json in ``out``, refused in one line unless ``record`` continues it; returns it."""
    old = read_run(out / RUN_FILE)
    diff = differences(old, record)
    if diff:
        raise RunError(f"--resume: this run differs from the one in {out} in: {', '.join(diff)}")
    return old


def prepare_out_dir(out: Path, plan: Plan, num_samples: int, image: tuple) -> set[int]:
    """Check the (locked) ``out`` against the plan and record the plan; returns the complete batches.

    A final npz of another count is removed before anything else is written.
    """
    run_file = out / RUN_FILE
    record = plan.record(num_samples)
    done: set[int] = set()
    if run_file.exists():
        old = check_resumable(out, record)
        if num_samples < old["num_samples"]:
            raise RunError(
                f"--resume: the run in {out} is for {old['num_samples']} samples; --num-samples "
                f"{num_samples} would drop samples it made; pass at least {old['num_samples']} "
                "or choose another --out"
            )
        done = complete_batches(out, plan.batches(num_samples), plan, image)
    final = final_npz_name(num_samples, image)
    with writing(out):
        for stale in out.glob("samples_*.npz"):
            if stale.name != final:
                stale.unlink()
        atomic_write(run_file, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return done


def check_same_run(out: Path, plan: Plan, num_samples: int) -> None:
    """What a rank other than 0 checks once rank 0 has recorded the run: it sees the record (the
    folder is one every rank shares) and the record is its own run (the same weights, flags)."""
    run_file = out / RUN_FILE
    if not run_file.is_file():
        raise RunError(
            f"rank {distributed.rank()} does not see {run_file}, which rank 0 wrote: under torchrun "
            "--out must be a folder every rank shares (a shared file system across machines)"
        )
    old = read_run(run_file)
    diff = differences(old, plan.record(num_samples))
    diff += ["num_samples"] if old["num_samples"] != num_samples else []
    if diff:
        raise RunError(f"rank {distributed.rank()}'s run differs from rank 0's in: {', '.join(diff)}")
