#!/usr/bin/env python
"""How fast can the bundled model's guided step be on this CPU at all? A lower bound from FLOPs.

    python bench/cpu_bound.py [--threads 1] [--rounds 20]

Counts the FLOPs of one guided DDIM step of the default ``fastdiff sample`` (UNet forward,
classifier forward and input gradient, batch 16) with torch's FlopCounterMode, measures the best
fp32 rate this machine reaches on the step's own largest convolutions and on a 1024^3 matmul
(best of ``--rounds``; run it on an idle machine, since load lowers that rate and so raises
the bound; the report records the load), and reports the step time the FLOPs alone need at
that rate, beside the measured step and the time to import torch. Written to
bench/results/<date>-cpu-bound.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.machine import machine_info, write_record  # noqa: E402


def _best(fn, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bundled_step(n: int = 16):
    """The default ``fastdiff sample``'s networks (frozen, eval), its classifier guidance and a
    guided step's inputs (x, t, y) at batch ``n``."""
    from fastdiff.diffusion.guidance import ClassifierGuidance
    from fastdiff.runs.loading import load_diffusion_model

    cpu = torch.device("cpu")
    loaded = load_diffusion_model(preset=None, flag_string=None, checkpoint=None, device=cpu)
    unet = loaded.model.eval().requires_grad_(False)
    clf = loaded.bundled_classifier(cpu).model.eval().requires_grad_(False)
    size = loaded.image_size
    x = torch.randn(n, loaded.in_channels, size, size)
    inputs = (x, torch.full((n,), 500), torch.arange(n) % 10)
    return unet, clf, ClassifierGuidance(clf, loaded.default_classifier_scale), inputs


class ConvLog(TorchDispatchMode):
    """The convolutions aten runs inside it: ``counts`` by (kind, input shape, weight shape,
    stride, padding, transposed, channels_last), kind "forward" or "input gradient" (a
    convolution_backward that computes one; its layout is the output gradient's), and
    ``tensors``: a copy of the first (input, weight, output gradient or None) of each. Module
    hooks would change the step they record: fastdiff calls a hooked upsampler's conv as it is,
    3x3 on the upsampled image, instead of folding it into upsample_conv's transposed conv."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.tensors: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            inp, weight, _, stride, padding, _, transposed = args[:7]
            self._add("forward", inp, weight, None, stride, padding, transposed)
        elif func is torch.ops.aten.convolution_backward.default and args[-1][0]:
            grad, inp, weight, _, stride, padding, _, transposed = args[:8]
            self._add("input gradient", inp, weight, grad, stride, padding, transposed)
        return func(*args, **(kwargs or {}))

    def _add(self, kind, inp, weight, grad, stride, padding, transposed):
        seen = inp if grad is None else grad
        nhwc = seen.is_contiguous(memory_format=torch.channels_last) and not seen.is_contiguous()
        key = (kind, tuple(inp.shape), tuple(weight.shape), tuple(stride), tuple(padding), transposed, nhwc)
        self.counts[key] += 1
        if key not in self.tensors:
            self.tensors[key] = tuple(None if v is None else v.detach().clone() for v in (inp, weight, grad))


def cpu_args(description: str) -> argparse.Namespace:
    """--threads, --rounds and --out-dir, checked before any work, with torch's threads set (this
    script's and cpu_winograd's)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    if args.threads < 1 or args.rounds < 1:
        ap.error(f"--threads and --rounds must be at least 1, got {args.threads} and {args.rounds}")
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = cpu_args(__doc__.split("\n")[0])
    unet, clf, guidance, (x, t, y) = bundled_step()
    n = len(x)

    def step():
        with torch.no_grad():
            unet(x, t, y=y)
        guidance(x, t, y=y)

    def counted_step():
        # FlopCounterMode's module tracking cannot follow autograd.grad: the same gradient by backward().
        with torch.no_grad():
            unet(x, t, y=y)
        x_in = x.clone().requires_grad_(True)
        F.log_softmax(clf(x_in, t), dim=-1)[torch.arange(n), y].sum().backward()

    with FlopCounterMode(display=False) as counter, ConvLog() as log:
        counted_step()
    flops = counter.get_total_flops()
    by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}

    # The best rate on the step's own convolutions (the three with the most FLOPs) and a big GEMM.
    def conv_flops(key):
        (b, c, h, w), (o, _, kh, kw), stride = key[1:4]
        return 2 * b * o * c * kh * kw * (h // stride[0]) * (w // stride[1])

    # 2-D convs, not transposed
    convs = [k for k in log.counts if k[0] == "forward" and len(k[1]) == 4 and not k[5]]
    rates = {}
    for key in sorted(convs, key=conv_flops, reverse=True)[:3]:
        inp, wshape, stride, padding = key[1:5]
        a, w = torch.randn(inp), torch.randn(wshape)
        with torch.no_grad():
            sec = _best(
                lambda a=a, w=w, p=padding, s=stride: F.conv2d(a, w, padding=p, stride=s), args.rounds
            )
        rates[f"conv {list(inp)} * {list(wshape)}"] = conv_flops(key) / sec / 1e9
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    rates["matmul 1024^3"] = 2 * 1024**3 / _best(lambda: a @ b, args.rounds) / 1e9
    peak = max(rates.values())

    measured = _best(step, max(3, args.rounds // 4))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    import_s = time.perf_counter() - start

    info = machine_info(threads=args.threads, load_1min=os.getloadavg()[0])
    result = {
        "machine": info,
        "step_gflop": flops / 1e9,
        "gflop_by_op": {k: v / 1e9 for k, v in by_op.items()},
        "best_gflops": rates,
        "bound_step_s": flops / (peak * 1e9),
        "measured_step_s": measured,
        "import_torch_s": import_s,
        "bound_e2e_s": import_s + 25 * flops / (peak * 1e9),
    }
    lines = [
        f"# The bundled model's guided step on this CPU: a FLOP bound ({info['date']})",
        "",
        f"Machine: {info['cores']} cores ({info['cpu']}), {args.threads} thread(s), torch {info['torch']}, "
        f"1-min load {info['load_1min']:.2f}. Command: `python bench/cpu_bound.py --threads {args.threads} "
        f"--rounds {args.rounds}`. Step: UNet forward + classifier forward and input gradient, batch {n}.",
        "",
        f"- FLOPs per guided step: {flops / 1e9:.2f} GFLOP ("
        + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in sorted(by_op.items(), key=lambda kv: -kv[1]))
        + ")",
        "- best fp32 rates measured here (GFLOP/s, best of rounds): "
        + ", ".join(f"{k}: {v:.0f}" for k, v in rates.items()),
        f"- FLOP bound per step at {peak:.0f} GFLOP/s: {result['bound_step_s']:.3f} s; "
        f"measured fastdiff step: {measured:.3f} s "
        f"(the bound is {result['bound_step_s'] / measured:.0%} of it)",
        f"- import torch: {import_s:.2f} s; so guided DDIM-25 end to end takes at least "
        f"{result['bound_e2e_s']:.2f} s on {args.threads} thread(s)",
    ]
    write_record(args.out_dir, "cpu-bound", result, lines)


if __name__ == "__main__":
    main()
