#!/usr/bin/env python
"""The CPU jobs beyond the default one: other samplers, eta, guidance, batch sizes, threads,
dtypes, the upsampler, inversion and a larger architecture, each as fastdiff runs it
(``fastdiff.Sampler``, the commands' engine for the thread count) against the original code
doing the same job (guided-diffusion's own loops and networks with the same weights), in one
process, in interleaved rounds.

    python bench/cpu_jobs.py --guided-diffusion PATH [--jobs ddpm ddim-eta1 ...] [--rounds 5] [--tag T]

Per job and round, fastdiff's loop and the original's, in alternating order, each timed by the
process's CPU time and by wall; the record (bench/results/<date>-cpu-jobs[-TAG].{json,md}) gives
the medians, their ratios (original / fastdiff) and the largest difference between the two sides'
samples (fp32: the original's samples up to rounding; the same noise on both sides). The original
has no DPM-Solver++: its networks run fastdiff's loop there; classifier-free guidance is its loop
around its network in the CFG wrapper a user of it writes; inversion is its ddim_reverse_sample,
whose arithmetic fastdiff changed on purpose (that row's difference is no error). Loops are
short (the step counts in JOBS): a step's work does not depend on how many steps the process was
respaced to, so the ratio is that of ``--steps 250`` or ``1000``.

DDPM and DPM-Solver++ at "5" keep t = T-1, where the bundled cosine process's alpha_bar is 2.4e-9:
x0 = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) multiplies the ~3e-6 by which fastdiff's fp32
networks round otherwise than the original's (channels-last convs, fused attention) by 20291, so
their samples differ by ~2e-3 (7e-2 without clipping x0; DDIM at "5" too: 1.8e-3), where DDIM's
"ddim5", which stops at t = 800, differs by 5e-6. Rounding alone, measured: in float64 (the
original's float32 casts lifted) both sides' samples agree to 4e-12 (9e-11 unclipped; the networks
to 1e-14), and in float32 fastdiff's loops running the original's networks are the original's loops
to the bit (tests/test_compat_scripts.py).
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.machine import machine_info, write_record  # noqa: E402


@dataclass(frozen=True)
class Job:
    """One job: the network, the sampler and its respacing, the guidance, batch, threads, dtype."""

    sampler: str = "ddim"
    respacing: str = "ddim5"
    eta: float = 0.0
    guidance: str = "classifier"  # "classifier", "cfg" or "none"
    batch: int = 16
    threads: int = 1
    dtype: str = "fp32"
    network: str = "bundled"  # "bundled", a base-model preset with random weights, or "upsampler"
    invert: bool = False


JOBS: dict[str, Job] = {
    "default": Job(),
    "unguided": Job(guidance="none"),
    "cfg": Job(guidance="cfg"),
    "ddim-eta1": Job(eta=1.0),
    "ddpm": Job(sampler="ddpm", respacing="5"),
    "ddpm-unguided": Job(sampler="ddpm", respacing="5", guidance="none"),
    "dpm++": Job(sampler="dpm++2m", respacing="5"),
    "batch1": Job(batch=1, respacing="ddim25"),
    "batch1-ddpm": Job(batch=1, sampler="ddpm", respacing="25"),
    "batch1-unguided": Job(batch=1, respacing="ddim25", guidance="none"),
    "batch64": Job(batch=64, respacing="ddim2"),
    "threads2": Job(threads=2),
    "threads2-batch1": Job(threads=2, batch=1, respacing="ddim25"),
    "bf16": Job(dtype="bf16"),
    "invert": Job(invert=True, guidance="none"),
    "upsampler": Job(network="upsampler", sampler="ddpm", respacing="2", guidance="none", batch=1),
    "imagenet64": Job(network="imagenet64", respacing="ddim2", batch=2),
}


def _gd_kwargs(fn, flags: dict) -> dict:
    """The flags ``fn`` (a guided-diffusion builder) takes, fp16 off (the CPU's compute is fp32)."""
    names = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in flags.items() if k in names}
    for k in ("use_fp16", "classifier_use_fp16"):
        if k in names:
            kwargs[k] = False
    for k, v in kwargs.items():
        if isinstance(v, tuple | list):
            kwargs[k] = ",".join(map(str, v))
    return kwargs


def _networks(job: Job):
    """(fastdiff model, fastdiff classifier or None, original model, original classifier or None,
    the process's DiffusionConfig, null label): the same weights on both sides."""
    import torch

    from bench.original_sample import bundled_networks
    from fastdiff.models.flags import flags_of
    from fastdiff.models.presets import build_network, get_preset
    from fastdiff.runs.loading import load_diffusion_model

    if job.network == "bundled":
        loaded = load_diffusion_model(preset=None, flag_string=None, checkpoint=None, device="cpu")
        classifier = loaded.bundled_classifier(torch.device("cpu")).model
        gd_model, gd_classifier, _, _ = bundled_networks()
        return loaded.model, classifier, gd_model, gd_classifier, loaded.process, loaded.null_label
    from guided_diffusion import script_util

    torch.manual_seed(0)
    preset = get_preset("upsampler64-256" if job.network == "upsampler" else job.network)
    net = preset.net
    if job.network == "upsampler":  # the preset's widths at a CPU-sized 16 -> 64 (64's levels)
        net = type(net)(**{**net.__dict__, "image_size": 64, "small_size": 16, "channel_mult": (1, 2, 3, 4)})
    model = build_network(net)
    flags = flags_of(net, preset.process)
    if job.network == "upsampler":
        gd_model = script_util.sr_create_model(**_gd_kwargs(script_util.sr_create_model, flags))
    else:
        gd_model = script_util.create_model(**_gd_kwargs(script_util.create_model, flags))
    gd_model.load_state_dict(model.state_dict())
    classifier = gd_classifier = None
    if job.guidance == "classifier":
        cpreset = get_preset(f"classifier{net.image_size}")
        classifier = build_network(cpreset.net)
        cflags = flags_of(cpreset.net, cpreset.process)
        gd_classifier = script_util.create_classifier(**_gd_kwargs(script_util.create_classifier, cflags))
        gd_classifier.load_state_dict(classifier.state_dict())
    return model, classifier, gd_model.eval(), gd_classifier and gd_classifier.eval(), preset.process, None


class Bench:
    """Both sides of one job, built once; ``fastdiff()`` and ``original()`` each run the loop."""

    def __init__(self, job: Job):
        import torch
        import torch.nn.functional as F
        from guided_diffusion.script_util import create_gaussian_diffusion

        from fastdiff import Sampler
        from fastdiff.diffusion import GaussianDiffusion, sample
        from fastdiff.engines import default_engine

        self.job = job
        torch.set_num_threads(job.threads)
        model, classifier, gd_model, gd_classifier, process, null_label = _networks(job)
        self.upsampler = job.network == "upsampler"
        size, channels = model.image_size, model.in_channels // (2 if self.upsampler else 1)
        self.shape = (job.batch, channels, size, size)
        scale = 2.0 if job.guidance == "classifier" else 0.0
        cfg = 2.0 if job.guidance == "cfg" else None
        engine = default_engine(torch.device("cpu"))
        self.sampler = Sampler(
            model,
            GaussianDiffusion.from_config(process, job.respacing),
            sampler=job.sampler,
            eta=job.eta,
            classifier=classifier if scale else None,
            classifier_scale=scale,
            cfg_scale=cfg,
            null_label=null_label,
            engine=engine,
            dtype=job.dtype,
        )
        self.engine = engine
        gen = torch.Generator().manual_seed(0)
        self.x_T = torch.randn(self.shape, generator=gen)
        classes = getattr(model, "num_classes", None) or getattr(classifier, "num_classes", None) or 10
        self.labels = torch.arange(job.batch) % (null_label or classes)
        self.kwargs = {}
        if self.upsampler:
            self.kwargs["low_res"] = (
                torch.rand(job.batch, channels, size // 4, size // 4, generator=gen) * 2 - 1
            )
        self.images = self.x_T.clamp(-1, 1)  # what invert reads
        gd = create_gaussian_diffusion(
            steps=process.steps,
            learn_sigma=process.learn_sigma,
            sigma_small=process.sigma_small,
            noise_schedule=process.noise_schedule,
            use_kl=process.use_kl,
            predict_xstart=process.predict_xstart,
            rescale_timesteps=process.rescale_timesteps,
            rescale_learned_sigmas=process.rescale_learned_sigmas,
            timestep_respacing=job.respacing,
        )
        gd_model.requires_grad_(False)
        conditional = getattr(gd_model, "num_classes", None) is not None

        def cond_fn(x, t, y=None, **_):
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                log_probs = F.log_softmax(gd_classifier(x_in, t), dim=-1)
                selected = log_probs[range(len(log_probs)), y.view(-1)]
                return torch.autograd.grad(selected.sum(), x_in)[0] * scale

        def model_fn(x, t, y=None, **kwargs):
            if cfg is None:
                return gd_model(x, t, y=y if conditional else None, **kwargs)
            n, c = x.shape[:2]  # what a user of the original writes for CFG: one batch of 2N
            out = gd_model(
                torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)])
            )
            guided = out[n:, :c] + cfg * (out[:n, :c] - out[n:, :c])
            return torch.cat([guided, out[:n, c:]], dim=1)

        self.gd, self.gd_model, self.cond_fn = gd, model_fn, cond_fn if scale else None
        self.gd_classifier, self.scale = (gd_classifier, scale) if scale else (None, 0.0)
        self.fastdiff_sample = sample
        self.process = process

    def fastdiff(self):
        import torch

        if self.job.invert:
            return self.sampler.invert(self.images, self.labels)
        gen = torch.Generator().manual_seed(1)
        kwargs = {"model_kwargs": self.kwargs} if self.kwargs else {}
        return self.sampler(self.labels, noise=self.x_T, generator=gen, **kwargs)

    def original(self):
        import torch

        torch.manual_seed(1)
        kwargs = {"y": self.labels, **self.kwargs}
        job, gd = self.job, self.gd
        if job.invert:  # image_sample.py has no inversion: its ddim_reverse_sample, step by step
            x = self.images
            for i in range(gd.num_timesteps):
                t = torch.tensor([i] * len(x))
                with torch.no_grad():
                    x = gd.ddim_reverse_sample(self.gd_model, x, t, clip_denoised=True, model_kwargs=kwargs)[
                        "sample"
                    ]
            return x
        common = dict(
            noise=self.x_T, device="cpu", clip_denoised=True, cond_fn=self.cond_fn, model_kwargs=kwargs
        )
        if job.sampler == "ddpm":
            return gd.p_sample_loop(self.gd_model, self.shape, **common)
        if job.sampler == "ddim":
            return gd.ddim_sample_loop(self.gd_model, self.shape, eta=job.eta, **common)
        # no DPM-Solver++ in the original: its networks through fastdiff's loop
        from fastdiff.diffusion import GaussianDiffusion

        return self.fastdiff_sample(
            GaussianDiffusion.from_config(self.process, job.respacing),
            self.gd_model,
            self.shape,
            sampler=job.sampler,
            model_kwargs={"y": self.labels},
            classifier=self.gd_classifier,
            classifier_scale=self.scale,
            noise=self.x_T,
        )


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def run_job(name: str, job: Job, rounds: int, warmup: int = 1) -> dict:
    """Interleaved rounds of both sides; medians and the largest sample difference."""
    bench = Bench(job)
    times = {"fastdiff": [], "original": []}
    outs = {}
    for r in range(warmup + rounds):
        for side in ("fastdiff", "original") if r % 2 == 0 else ("original", "fastdiff"):
            wall, cpu, outs[side] = _timed(getattr(bench, side))
            if r >= warmup:
                times[side].append((wall, cpu))
    row = {"job": name, **job.__dict__, "engine": bench.engine, "rounds": rounds}
    for side, ts in times.items():
        row[f"{side}_wall_s"] = statistics.median(t[0] for t in ts)
        row[f"{side}_cpu_s"] = statistics.median(t[1] for t in ts)
    row["ratio_wall"] = row["original_wall_s"] / row["fastdiff_wall_s"]
    row["ratio_cpu"] = row["original_cpu_s"] / row["fastdiff_cpu_s"]
    row["max_abs_diff"] = float((outs["fastdiff"].float() - outs["original"].float()).abs().max())
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guided-diffusion", required=True, type=Path)
    ap.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--no-record", action="store_true", help="print the rows only")
    args = ap.parse_args(argv)
    if not (args.guided_diffusion / "guided_diffusion" / "unet.py").is_file():
        sys.exit(f"error: {args.guided_diffusion} is not a guided-diffusion checkout")
    if args.rounds < 1:
        sys.exit("error: --rounds must be >= 1")
    sys.path.insert(0, str(args.guided_diffusion))
    import json

    load_before = os.getloadavg()[0]
    rows = []
    for name in args.jobs:
        rows.append(run_job(name, JOBS[name], args.rounds))
        print(json.dumps(rows[-1]), flush=True)
    if args.no_record:
        return
    info = machine_info(load_1min_before=load_before, load_1min_after=os.getloadavg()[0])
    lines = [
        f"# CPU jobs: fastdiff against the original code, job by job ({info['date']})",
        "",
        f"Machine: {info['cores']} cores ({info['cpu']}), torch {info['torch']}, 1-min load "
        f"{load_before:.2f} before, {info['load_1min_after']:.2f} after. Command: `python bench/cpu_jobs.py "
        f"--guided-diffusion PATH --jobs {' '.join(args.jobs)} --rounds {args.rounds}`. One process, the "
        "two sides in alternating order each round, medians; the sampling loop only (networks built, "
        "no process start or files).",
        "",
        "| job | sampler, steps | guidance | batch | threads | dtype | engine | fastdiff CPU s "
        "| original CPU s | x CPU | fastdiff wall s | original wall s | x wall | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        what = f"{'invert ' if r['invert'] else ''}{r['sampler']} {r['respacing']}" + (
            f" eta {r['eta']:g}" if r["eta"] else ""
        )
        lines.append(
            f"| {r['job']} | {what} | {r['guidance']} | {r['batch']} | {r['threads']} | {r['dtype']} | "
            f"{r['engine']} | {r['fastdiff_cpu_s']:.3f} | {r['original_cpu_s']:.3f} | {r['ratio_cpu']:.2f} | "
            f"{r['fastdiff_wall_s']:.3f} | {r['original_wall_s']:.3f} | {r['ratio_wall']:.2f} | "
            f"{r['max_abs_diff']:.1e} |"
        )
    write_record(args.out_dir, "cpu-jobs", {"machine": info, "rows": rows}, lines, args.tag)


if __name__ == "__main__":
    main()
