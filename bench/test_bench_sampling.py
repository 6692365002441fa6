"""The product's speed: one UNet forward, one guided step and a whole guided DDIM loop.

Architectures come from fastdiff's presets (ImageNet-64 at batch 64 and ImageNet-256 at batch 8
with their classifiers, random weights, on CUDA; the bundled MNIST model with its real weights at
batch 16 on the CPU: what a user without a GPU runs). In one run, against:

- ``gd``: guided-diffusion's semantics as its released sampling commands run them: every op on
  its reference (``FASTDIFF_OPS=reference``: einsum attention, GroupNorm on fp32 casts), the UNet
  torso's convs in fp16 on CUDA (``use_fp16``), the classifier in fp32, the eager loop;
- ``gd-compile``: ``torch.compile(mode="max-autotune")`` of those networks (CUDA, or
  ``FASTDIFF_BENCH_COMPILE=1``);
- ``gd-sdpa`` and ``gd-xformers``: ``gd`` with its einsum attention replaced by PyTorch's fused
  SDPA, or by xformers' ``memory_efficient_attention`` (CUDA, where xformers is installed), the
  layout changes to and from ``[B, C, T]`` included: what a user patching the original gets;
- every fastdiff engine through ``fastdiff.Sampler`` (eager, compile, graph and graph-loop on
  CUDA, parallel on the CPU with ``FASTDIFF_BENCH_THREADS`` >= 2), fp16 on CUDA and fp32 on the
  CPU.

Compile/capture time is measured apart (``extra_info["warmup_s"]``: the Sampler's warm-up); the
timed rounds end with a CUDA sync. ``extra_info`` also has images/s and, for the UNet forward,
model FLOP utilisation: the network's FLOPs (counted by torch's FlopCounterMode on the reference
path, the same count for every row) over the measured bf16 matmul rate.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

from bench import baselines, shapes, timing
from bench.baselines import compile_enabled
from fastdiff.diffusion import GaussianDiffusion, sample
from fastdiff.engines.sampler import Sampler
from fastdiff.models.presets import build_preset, get_preset
from fastdiff.ops.attention.module import QKVAttention, QKVAttentionLegacy
from fastdiff.runs.loading import load_diffusion_model

# (name, diffusion preset, classifier preset, batch) on CUDA
GPU_CASES = [
    ("imagenet64", "imagenet64", "classifier64", 64),
    ("imagenet256", "imagenet256", "classifier256", 8),
]
# cheapest to prepare first, then the baselines no target depends on
IMPLS = ["gd", "eager", "parallel", "graph", "graph-loop", "compile", "gd-compile", "gd-sdpa", "gd-xformers"]
GD_ATTENTION = {"gd-sdpa": baselines.attention_sdpa, "gd-xformers": baselines.attention_xformers}
MODES = ["unet", "step", "loop"]


def _steps() -> str:
    return "ddim25" if shapes.bench_size() == "full" else "ddim2"


def _randomize(net: torch.nn.Module) -> torch.nn.Module:
    """Small non-zero weights everywhere (zero-initialised output convs would skip work in no kernel,
    but make the guidance gradient trivially zero)."""
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    return net


def _networks(name: str, device: torch.device):
    """(unet, classifier, the unet's process config) on the device, fp32, eval."""
    if name == "mnist":
        loaded = load_diffusion_model(preset=None, flag_string=None, checkpoint=None, device=device)
        clf = loaded.bundled_classifier(device)
        return loaded.model, clf.model, loaded.process
    _, unet_preset, clf_preset, _ = next(c for c in GPU_CASES if c[0] == name)
    unet = _randomize(build_preset(unet_preset, device=device)).eval().requires_grad_(False)
    clf = _randomize(build_preset(clf_preset, device=device)).eval().requires_grad_(False)
    return unet, clf, get_preset(unet_preset).process


def _cases():
    if shapes.bench_device().type == "cuda" and shapes.bench_size() == "full":
        return [(name, batch) for name, _, _, batch in GPU_CASES]
    return [("mnist", 16 if shapes.bench_size() == "full" else 2)]


_CACHE: dict = {}


def _setup(name: str, device: torch.device):
    if name not in _CACHE:
        _CACHE.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _CACHE[name] = _networks(name, device)
    return _CACHE[name]


def _with_attention(net: torch.nn.Module, attention) -> torch.nn.Module:
    """``net`` with every QKV attention computed by ``attention(qkv, heads, order)`` instead."""
    for m in net.modules():
        if isinstance(m, (QKVAttention, QKVAttentionLegacy)):
            m.forward = lambda qkv, m=m: attention(qkv, m.n_heads, m.order)
    return net


def _gd_networks(unet, clf, device, compiled: bool, attention=None):
    """The original's configuration: fp16 torso on CUDA, fp32 classifier; optionally compiled, or
    with another attention implementation."""
    unet, clf = copy.deepcopy(unet), copy.deepcopy(clf)
    if device.type == "cuda":
        unet.convert_to_fp16()
    if attention is not None:
        unet, clf = _with_attention(unet, attention), _with_attention(clf, attention)
    if compiled:
        unet = torch.compile(unet, mode="max-autotune")
        clf = torch.compile(clf, mode="max-autotune")
    return unet, clf


def _model_flops(unet, x, t, y, monkeypatch) -> float:
    """The network's FLOPs as guided-diffusion computes it, the same count for every row: on the
    reference path (FlopCounterMode sees no FLOPs in a custom op such as the Triton attention,
    and the transposed-conv upsampler's fewer multiply-adds are speed, not less model)."""
    from torch.utils.flop_counter import FlopCounterMode

    with monkeypatch.context() as m, torch.no_grad(), FlopCounterMode(display=False) as counter:
        m.setenv("FASTDIFF_OPS", "reference")
        unet(x, t, y)
    return float(counter.get_total_flops())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"{c[0]}-b{c[1]}")
def test_sampling(benchmark, device, monkeypatch, case, impl, mode):
    name, batch = case
    if impl in ("gd-compile", "compile") and not compile_enabled(device):
        pytest.skip("torch.compile baselines run on CUDA (FASTDIFF_BENCH_COMPILE=1 for the CPU)")
    if impl == "gd-xformers" and not baselines.xformers_available(device):
        pytest.skip("xformers is a CUDA baseline and is not installed here (bench/README.md: carrying it)")
    if impl in ("graph", "graph-loop") and device.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    if impl == "graph-loop" and mode != "loop":
        pytest.skip("the whole-loop graph is timed as a loop (its network and step are graph's)")
    if impl == "parallel" and (device.type != "cpu" or torch.get_num_threads() < 2):
        pytest.skip("the parallel engine splits the batch over CPU threads (FASTDIFF_BENCH_THREADS >= 2)")
    if timing.interpreting(device):
        pytest.skip("sampling benchmarks time the product, not Triton's interpreter")
    unet, clf, process = _setup(name, device)
    steps = _steps()
    diffusion = GaussianDiffusion.from_config(process, steps)
    null = 10 if name == "mnist" else None
    classes = null if null is not None else 1000
    labels = torch.arange(batch, device=device) % classes
    x = torch.randn(batch, unet.in_channels, unet.image_size, unet.image_size, device=device)
    t_model = torch.full((batch,), 500, device=device, dtype=torch.long)
    t_index = torch.full((batch,), diffusion.num_timesteps - 1, device=device, dtype=torch.long)
    scale = 1.0
    extra = {"op": "sampling", "case": name, "batch": batch, "impl": impl, "mode": mode, "respacing": steps}

    if impl.startswith("gd"):
        monkeypatch.setenv("FASTDIFF_OPS", "reference")
        g_unet, g_clf = _gd_networks(unet, clf, device, impl == "gd-compile", GD_ATTENTION.get(impl))
        from fastdiff.diffusion.guidance import ClassifierGuidance
        from fastdiff.diffusion.samplers import SamplingStep, make_rule

        rule = make_rule(diffusion, "ddim", 0.0, device)
        step = SamplingStep(
            diffusion, g_unet, rule, model_kwargs={"y": labels}, cond_fn=ClassifierGuidance(g_clf, scale)
        )
        step.prepare(x)
        warm = time.perf_counter()
        with torch.no_grad():
            step(x, t_index, None, None)  # compile (when compiled) and lazy init, timed apart
        timing.sync(device)
        extra["warmup_s"] = time.perf_counter() - warm
        calls = {
            "unet": lambda: g_unet(x, t_model, labels),
            "step": lambda: step(x, t_index, None, None),
            "loop": lambda: sample(
                diffusion,
                g_unet,
                tuple(x.shape),
                model_kwargs={"y": labels},
                classifier=g_clf,
                classifier_scale=scale,
                noise=x,
            ),
        }
    else:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        sampler = Sampler(
            copy.deepcopy(unet),
            diffusion,
            classifier=copy.deepcopy(clf),
            classifier_scale=scale,
            engine=impl,
            dtype=dtype,
            device=device,
        )
        extra["warmup_s"] = sampler.warmup(labels)
        run = sampler.step_for(batch)[1]
        net = sampler.model
        calls = {
            "unet": lambda: net(x, t_model, y=labels),
            "step": lambda: run(x, t_index, None, None),
            "loop": lambda: sampler(labels, noise=x),
        }
        extra["dtype"] = shapes.DTYPE_NAMES[dtype]
    call = calls[mode]

    def timed():
        with torch.no_grad():
            out = call()
        timing.sync(device)
        return out

    timed()  # one untimed round (allocator, caches)
    rounds = 3 if mode == "loop" or device.type == "cpu" else 10
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0, iterations=1)
    median = timing._median_of(benchmark)
    if median:
        extra["images_per_s"] = batch / median
        if mode == "unet" and device.type == "cuda":
            flops = _model_flops(unet, x, t_model, labels, monkeypatch)
            rate = timing.reference_rates(device).get("matmul_tflops_bfloat16") or 0
            extra["model_tflops"] = flops / median / 1e12
            if rate:
                extra["mfu_pct"] = 100 * extra["model_tflops"] / rate
    benchmark.extra_info.update(extra)
    timing._record(benchmark, extra)
