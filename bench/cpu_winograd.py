#!/usr/bin/env python
"""Would Winograd 3x3 convolutions make the bundled model's guided step faster on this CPU?

    python bench/cpu_winograd.py [--threads 1] [--rounds 20]

The guided step of the default ``fastdiff sample`` (bench/cpu_bound.py's: UNet forward, classifier
forward and input gradient, batch 16) spends most of its FLOPs in 3x3 stride-1 convolutions,
which oneDNN runs directly at close to this CPU's fp32 peak. Winograd F(m x m, 3x3) needs
36/(m+2)^2 times their multiplications (F(2x2): 1/2.25, F(4x4): 1/4) and pays for it with tile
transforms and rounding. This times, per conv shape of the step (the weights, inputs and output
gradients the step ran it with, in the layout fastdiff runs it in), what fastdiff runs
(``F.conv2d``; for the classifier's input gradient ``convolution_backward``) against Winograd
written in torch ops, and NNPACK's convolution (``torch._nnpack_spatial_convolution``, a C
library with its own transforms), in interleaved rounds of CPU time (median: the machine may be
shared; the report records the load), with each one's error against an fp64 conv. Written to
bench/results/<date>-cpu-winograd.{json,md}.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.cpu_bound import ConvLog, bundled_step, cpu_args  # noqa: E402
from bench.machine import machine_info, write_record  # noqa: E402

# Lavin & Gray's transforms (interpolation points 0, +-1, +-2, infinity): Y = A^T [(G g G^T) * (B^T d B)] A.
TRANSFORMS = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}
GEMM_ALONE = "F(4x4) GEMM alone"


class Winograd:
    """F(m x m, 3x3), stride 1, padding 1, fp32, in torch ops: the weight transformed once (in
    fp64), tiles cut from a zero-bordered NHWC copy kept between calls (its border written once),
    each transform one GEMM with the Kronecker matrix (``kron``) or two GEMMs of the 1-D one over
    strided views, the (m+2)^2 tile positions one batched GEMM over channels, kept workspaces (fresh
    ones page-fault: F(2x2) 2-pass took 19 ms a call against 8 at [16, 32, 32, 32]), the output
    in the input's layout."""

    def __init__(self, weight: torch.Tensor, m: int, kron: bool):
        bt, g, at = (torch.tensor(t, dtype=torch.float64) for t in TRANSFORMS[m])
        self.m, self.a, self.kron, self.out_channels = m, m + 2, kron, weight.shape[0]
        u = torch.einsum("ik,ockl,jl->ijco", g, weight.double(), g)
        self.u = u.reshape(self.a**2, weight.shape[1], weight.shape[0]).float().contiguous()
        self.bt, self.at = (bt, at) if not kron else (torch.kron(bt, bt), torch.kron(at, at))
        self.bt, self.at = self.bt.float(), self.at.float()
        self.work: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, shape: tuple[int, ...], zero: bool = False) -> torch.Tensor:
        buf = self.work.get(name)
        if buf is None or buf.shape != shape:
            buf = self.work[name] = (torch.zeros if zero else torch.empty)(shape)
        return buf

    def _transform(self, mat: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """``mat`` applied to both tile axes of ``x`` [a, a, Z] (or [a*a, Z] with kron)."""
        rows = mat.shape[0]
        if self.kron:
            return torch.mm(
                mat, x.view(x.shape[0] * x.shape[1], -1), out=self._buffer(name, (rows, x[0, 0].numel()))
            )
        first = torch.mm(mat, x.view(x.shape[0], -1), out=self._buffer(name + "1", (rows, x[0].numel())))
        first = first.view(rows, x.shape[1], -1)
        return torch.matmul(mat, first, out=self._buffer(name, (rows, rows, first.shape[-1])))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m, a, o = self.m, self.a, self.out_channels
        n, c, h, w = x.shape
        th, tw = -(-h // m), -(-w // m)
        padded = self._buffer("padded", (n, th * m + 2, tw * m + 2, c), zero=True)
        padded[:, 1 : h + 1, 1 : w + 1].copy_(x.permute(0, 2, 3, 1))
        sn, sh, sw, sc = padded.stride()
        tiles = padded.as_strided((a, a, n, th, tw, c), (sh, sw, sn, m * sh, m * sw, sc))
        d = self._buffer("tiles", tiles.shape)
        d.copy_(tiles)
        t = n * th * tw
        v = self._transform(self.bt, d.view(a, a, t * c), "v").view(a * a, t, c)
        prod = torch.bmm(v, self.u, out=self._buffer("prod", (a * a, t, o)))
        y = self._transform(self.at, prod.view(a, a, t * o), "y").view(m, m, n, th, tw, o)
        nhwc = x.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if nhwc else torch.contiguous_format
        out = torch.empty((n, o, th * m, tw * m), memory_format=layout)
        out.view(n, o, th, m, tw, m).copy_(y.permute(2, 5, 3, 0, 4, 1))
        return out[:, :, :h, :w]

    def gemm_only(self, x: torch.Tensor):
        """The batched GEMM alone on a tensor of the transformed tiles' size: the time Winograd
        would take if its transforms were free."""
        n, c, h, w = x.shape
        t = n * -(-h // self.m) * -(-w // self.m)
        v = torch.randn(self.a**2, t, c)
        return lambda: torch.bmm(v, self.u, out=self._buffer("prod", (self.a**2, t, self.out_channels)))


def step_convs(n: int):
    """The step's 3x3 stride-1 convs, {(kind, input shape, weight shape, channels_last): count},
    and the first (input, weight, output gradient or None) of each, as the step ran them."""
    unet, clf, guidance, (x, t, y) = bundled_step(n)
    with ConvLog() as log:
        with torch.no_grad():
            unet(x, t, y=y)
        guidance(x, t, y=y)
    counts: Counter = Counter()
    tensors = {}
    for key, count in log.counts.items():
        kind, shape, wshape, stride, padding, transposed, channels_last = key
        if wshape[2:] == (3, 3) and stride == (1, 1) and padding == (1, 1) and not transposed:
            counts[kind, shape, wshape, channels_last] += count
            tensors[kind, shape, wshape, channels_last] = log.tensors[key]
    return counts, tensors


def candidates(kind: str, inp: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor | None):
    """(the tensor convolved, its weight, {name: callable}) for one shape: the input gradient of a
    3x3 conv is the 3x3 conv of the output gradient with the weight transposed and flipped."""
    if kind == "forward":
        x, w = inp, weight
        ours = lambda: F.conv2d(x, w, padding=1)  # noqa: E731
    else:
        x, w = grad, weight.transpose(0, 1).flip(2, 3).contiguous()
        ours = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
            grad, inp, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False]
        )[0]
    runs = {"fastdiff (oneDNN)": ours}
    for m in (2, 4):
        for kron in (True, False):
            runs[f"F({m}x{m}) {'kron' if kron else '2-pass'}"] = functools.partial(Winograd(w, m, kron), x)
    runs[GEMM_ALONE] = Winograd(w, 4, kron=True).gemm_only(x)
    if torch.backends.nnpack.is_available():
        layout = (
            torch.channels_last
            if x.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        runs["NNPACK"] = lambda: torch._nnpack_spatial_convolution(
            x.contiguous(), w, None, [1, 1], [1, 1]
        ).contiguous(memory_format=layout)
    return x, w, runs


def main() -> None:
    args = cpu_args(__doc__.split("\n")[0])
    torch.manual_seed(0)

    counts, tensors = step_convs(16)
    rows = []
    with torch.no_grad():
        for key, count in sorted(counts.items(), key=lambda kv: (kv[0][0], not kv[0][3], -kv[0][1][-1])):
            kind, shape, wshape, channels_last = key
            x, w, runs = candidates(kind, *tensors[key])
            exact = F.conv2d(x.double(), w.double(), padding=1)
            errors = {}
            for name, fn in runs.items():
                if name != GEMM_ALONE:
                    errors[name] = ((fn().double() - exact).abs().max() / exact.abs().max()).item()
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    start = time.process_time()
                    fn()
                    times[name].append(time.process_time() - start)
            ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
            rows.append(
                {
                    "kind": kind,
                    "input": list(shape),
                    "weight": list(wshape),
                    "channels_last": channels_last,
                    "count": count,
                    "ms": ms,
                    "error": errors,
                }
            )
            print(kind, shape, wshape, count, {k: round(v, 2) for k, v in ms.items()}, flush=True)

    names = list(rows[0]["ms"])
    totals = {name: sum(r["count"] * r["ms"][name] for r in rows) for name in names}
    ours = names[0]
    winograd = [n for n in names if n.startswith("F(") and n != GEMM_ALONE]
    # each shape to the fastest of fastdiff's conv and the Winograd variants
    fastest = sum(r["count"] * min(r["ms"][n] for n in [ours, *winograd]) for r in rows)
    info = machine_info(threads=args.threads, load_1min=os.getloadavg()[0])
    result = {
        "machine": info,
        "rounds": args.rounds,
        "rows": rows,
        "step_ms": totals,
        "step_ms_fastest_per_shape": fastest,
        "max_error": {n: max(r["error"][n] for r in rows) for n in rows[0]["error"]},
    }

    def shape(r):
        layout = "NHWC" if r["channels_last"] else "NCHW"
        return f"{r['kind']} | {r['count']} | {r['input']} {layout} | {r['weight'][:2]}"

    lines = [
        f"# Winograd 3x3 convolutions for the bundled model's guided step on this CPU ({info['date']})",
        "",
        f"Machine: {info['cores']} cores ({info['cpu']}), {args.threads} thread(s), torch {info['torch']}, "
        f"1-min load {info['load_1min']:.2f}. Command: `python bench/cpu_winograd.py "
        f"--threads {args.threads} --rounds {args.rounds}`. Median CPU ms per call over {args.rounds} "
        "interleaved rounds; error: the largest deviation from an fp64 conv over the largest output "
        "(the networks' weights, inputs and output gradients in the step).",
        "",
        "| conv | per step | input | [out, in] | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
        *(f"| {shape(r)} | " + " | ".join(f"{r['ms'][n]:.2f}" for n in names) + " |" for r in rows),
        "| **step** | | | | " + " | ".join(f"**{totals[n]:.1f}**" for n in names) + " |",
        "| largest error | | | | "
        + " | ".join(f"{result['max_error'][n]:.1e}" if n != GEMM_ALONE else "-" for n in names)
        + " |",
        "",
        f"- The step's 3x3 stride-1 convs take {totals[ours]:.1f} ms as fastdiff runs them; each shape "
        f"on the fastest of that and the four Winograd variants, {fastest:.1f} ms "
        f"({1 - fastest / totals[ours]:.0%} less); F(4x4)'s batched GEMM alone, with free transforms, "
        f"{totals[GEMM_ALONE]:.1f} ms.",
    ]
    write_record(args.out_dir, "cpu-winograd", result, lines)


if __name__ == "__main__":
    main()
