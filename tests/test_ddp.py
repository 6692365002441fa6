"""torchrun + DDP on the CPU (gloo, 2 processes): ranks agree and match one process' run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys, numpy as np, torch
from fastdiff.models import configs_from_flags, parse_flags
from fastdiff.training import dist
from fastdiff.training.data import load_npz
from fastdiff.training import DiffusionTrainer, TrainConfig, fit_unet

npz, out = sys.argv[1], sys.argv[2]
ds = load_npz(npz)
net, process = configs_from_flags("diffusion", parse_flags(
    "--num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 4 "
    "--num_head_channels 16 "
    "--learn_sigma True --class_cond True --diffusion_steps 50"))
cfg = TrainConfig(net=fit_unet(net, ds, 0.1), process=process, out=out, batch_size=8, microbatch=4,
                  max_steps=4, log_every=2, save_every=0, ema=(0.9,), cfg_dropout=0.1, lr=1e-3, seed=3,
                  device="cpu", schedule_sampler="loss-second-moment", progress=False)
trainer = DiffusionTrainer(cfg, ds)
trainer.run()
torch.save({"model": trainer.model.state_dict(), "history": trainer.schedule_sampler.history},
           f"{out}/rank{dist.rank()}_of{dist.world_size()}.pt")
dist.cleanup()
"""


def _run(cmd, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


@pytest.mark.slow  # two torchrun jobs: CI's slow stage runs it
def test_two_gloo_ranks_match_single_process(tmp_path):
    np.savez(
        tmp_path / "d.npz",
        np.random.default_rng(0).integers(0, 256, (12, 8, 8, 1), dtype=np.uint8),
        np.arange(12) % 3,
    )
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    npz = str(tmp_path / "d.npz")
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            npz,
            str(tmp_path / "ddp"),
        ],
        tmp_path,
    )
    _run([sys.executable, str(script), npz, str(tmp_path / "single")], tmp_path)

    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{r}_of2.pt", weights_only=True) for r in (0, 1))
    single = torch.load(tmp_path / "single" / "rank0_of1.pt", weights_only=True)
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
        torch.testing.assert_close(r0["model"][k], single["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert torch.equal(r0["history"], single["history"])  # loss-aware history is gathered in global order
    assert (tmp_path / "ddp" / "latest.json").is_file()  # written by rank 0


CLASSIFIER_SCRIPT = """
import json, sys, numpy as np, torch
from fastdiff.models import configs_from_flags, parse_flags
from fastdiff.training import ClassifierTrainer, TrainConfig, dist, fit_classifier
from fastdiff.training.data import load_npz

npz, val, out = sys.argv[1:]
ds = load_npz(npz)
net, process = configs_from_flags("classifier", parse_flags(
    "--classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 4 "
    "--channel_mult 1,2 --diffusion_steps 50"))
cfg = TrainConfig(net=fit_classifier(net, ds), process=process, out=out, batch_size=4, microbatch=2,
                  max_steps=2, log_every=1, eval_every=1, save_every=0, ema=(), lr=1e-3, seed=3,
                  device="cpu", progress=False)
trainer = ClassifierTrainer(cfg, ds, load_npz(val))
scored, logits = [], trainer._logits
def spy(net, x, *args):
    if not net.training:
        scored.append(len(x))
    return logits(net, x, *args)
trainer._logits = spy
first = trainer.evaluate()
trainer.run()
with open(f"{out}/rank{dist.rank()}_of{dist.world_size()}.json", "w") as f:
    json.dump({"first": first, "scored": scored}, f)
dist.cleanup()
"""


@pytest.mark.slow  # two torchrun jobs: CI's slow stage runs it
def test_two_gloo_ranks_share_the_held_out_set_and_log_one_process_metrics(tmp_path):
    """Each rank scored the whole held-out set (N times the work, rank 0 alone logging it); now
    each scores its batches: 9 images in batches of 2 (the last of 1), 3 batches on rank 0 and
    2 on rank 1, and the metrics are one process's."""
    rng = np.random.default_rng(0)
    for name, n in (("d", 12), ("val", 9)):
        images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
        np.savez(tmp_path / f"{name}.npz", images, np.arange(n) % 6)
    script = tmp_path / "worker.py"
    script.write_text(CLASSIFIER_SCRIPT)
    data = [str(tmp_path / "d.npz"), str(tmp_path / "val.npz")]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*launch, str(script), *data, str(tmp_path / "ddp")], tmp_path)
    _run([sys.executable, str(script), *data, str(tmp_path / "single")], tmp_path)

    def saved(name):
        return json.loads((tmp_path / name).read_text())

    r0, r1, single = saved("ddp/rank0_of2.json"), saved("ddp/rank1_of2.json"), saved("single/rank0_of1.json")
    assert single["scored"] == [2, 2, 2, 2, 1] * 3  # before the run, then at steps 1 and 2
    assert r0["scored"] == [2, 2, 1] * 3 and r1["scored"] == [2, 2] * 3
    assert r0["first"] == r1["first"] == single["first"]  # the same weights: to the bit
    assert 0 < single["first"]["val_acc@1"] < single["first"]["val_acc@5"] < 1

    def held_out(run):
        rows = map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines())
        return [r for r in rows if "val_loss" in r]

    two, one = held_out("ddp"), held_out("single")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(two, one):  # weights after DDP's gradient averaging: to its rounding
        assert a.keys() == b.keys()
        assert a == pytest.approx(b, rel=1e-5), (a, b)


def test_data_parallel_leaves_buffers_alone_without_a_warning_per_rank():
    """torch 2.13 warned (a FutureWarning on every rank of every torchrun training) about the
    old name of the option the trainers pass; the wrapper still does not sync buffers in forward."""
    import torch.distributed as torch_dist

    from fastdiff.distributed import data_parallel

    torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ddp = data_parallel(torch.nn.BatchNorm1d(2), torch.device("cpu"), bucket_cap_mb=128)
        assert not ddp.will_sync_module_buffers()
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.parametrize("device", ["cpu", "cpu-compat"])
def test_process_groups_wait_a_day_for_the_slowest_rank(monkeypatch, device):
    """Sampling, training and gd-run ranks wait at collectives while one rank alone works (a
    preview grid, a checkpoint): torch's default timeout (10 minutes on nccl) ended healthy runs."""
    import torch.distributed as torch_dist

    from fastdiff import distributed
    from fastdiff.compat import dist_util

    seen = {}
    monkeypatch.setattr(torch_dist, "init_process_group", lambda *a, **kw: seen.update(kw))
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    for name, value in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="localhost", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    if device == "cpu":
        distributed.setup("cpu")
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        dist_util.setup_dist()
    assert seen["timeout"] == distributed.SLOWEST_RANK and distributed.SLOWEST_RANK.days == 1
