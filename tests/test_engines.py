"""fastdiff.Sampler and the engines: every engine gives the eager samples.

Oracles: the functional ``fastdiff.diffusion.sample`` (the reference loop, itself checked against
guided-diffusion's trajectories in test_compat_vectors), and the fp32 samples for low precision
(PSNR >= 40 dB). The graph engine needs CUDA; torch.compile's cold compile takes minutes on this
CPU, so its CPU check is marked slow.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from builders import build_classifier, build_unet, make_diffusion

import fastdiff
from fastdiff.diffusion import SAMPLERS, sample
from fastdiff.engines import EngineError, default_engine
from fastdiff.ops._backend import triton_available, triton_interpret

CUDA = torch.cuda.is_available()


def _nets(device="cpu"):
    torch.manual_seed(0)
    unet = build_unet(
        image_size=8,
        num_channels=32,
        num_res_blocks=1,
        attention_resolutions="4",
        channel_mult="1,2",
        class_cond=True,
        num_classes=6,
        learn_sigma=True,
        num_head_channels=32,
        use_scale_shift_norm=True,
        in_channels=1,
    )
    clf = build_classifier(
        image_size=8,
        classifier_width=32,
        classifier_depth=1,
        in_channels=1,
        classifier_attention_resolutions="4",
        channel_mult="1,2",
        num_classes=5,
    )
    for net in (unet, clf):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p) * 0.1)
    return unet.to(device).eval(), clf.to(device).eval()


def _diffusion(respacing="ddim6"):
    return make_diffusion(steps=1000, learn_sigma=True, noise_schedule="cosine", timestep_respacing=respacing)


GUIDANCE = {"classifier": dict(classifier_scale=2.0), "cfg": dict(cfg_scale=1.5, null_label=5)}


def _reference(unet, clf, diffusion, sampler, guidance, labels, seed, device="cpu"):
    kw = GUIDANCE[guidance]
    return sample(
        diffusion,
        copy.deepcopy(unet),
        (len(labels), 1, 8, 8),
        sampler=sampler,
        model_kwargs={"y": labels},
        classifier=clf if "classifier_scale" in kw else None,
        generator=torch.Generator(device).manual_seed(seed),
        device=device,
        **kw,
    )


def _sampler(unet, clf, diffusion, sampler, guidance, **kw):
    g = GUIDANCE[guidance]
    return fastdiff.Sampler(
        copy.deepcopy(unet),
        diffusion,
        sampler=sampler,
        classifier=copy.deepcopy(clf) if "classifier_scale" in g else None,
        **g,
        **kw,
    )


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("guidance", list(GUIDANCE))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_eager_sampler_is_the_reference_loop(sampler, guidance):
    unet, clf = _nets()
    diffusion = _diffusion("6" if sampler == "ddpm" else "ddim6")
    s = _sampler(unet, clf, diffusion, sampler, guidance, engine="eager")
    for labels, seed in ((torch.tensor([0, 3, 4]), 1), (torch.tensor([2, 2, 1]), 2), (torch.tensor([4]), 3)):
        got = s(labels, generator=torch.Generator().manual_seed(seed))
        want = _reference(unet, clf, diffusion, sampler, guidance, labels, seed)
        # the second batch reuses the cached step with new labels in its buffer
        assert torch.equal(got, want), (sampler, guidance, labels)


def test_bf16_close_to_fp32():
    unet, clf = _nets()
    diffusion = _diffusion()
    labels = torch.tensor([0, 1, 2, 3])
    ref = _sampler(unet, clf, diffusion, "ddim", "classifier")(
        labels, generator=torch.Generator().manual_seed(0)
    )
    low = _sampler(unet, clf, diffusion, "ddim", "classifier", dtype="bf16")
    got = low(labels, generator=torch.Generator().manual_seed(0))
    assert got.dtype == torch.float32
    assert next(low.model.parameters()).dtype == torch.bfloat16
    mse = ((got - ref) ** 2).mean().item()
    psnr = 10 * math.log10(4.0 / max(mse, 1e-20))  # images span [-1, 1]: peak-to-peak 2
    assert psnr >= 40, psnr


def test_sampler_bad_arguments():
    unet, clf = _nets()
    diffusion = _diffusion()
    with pytest.raises(ValueError, match="does not use it"):
        fastdiff.Sampler(unet, diffusion, sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="needs a classifier"):
        fastdiff.Sampler(unet, diffusion, classifier_scale=1.0)
    flags = dict(classifier_width=32, classifier_depth=1, classifier_attention_resolutions="4", num_classes=5)
    wide = build_classifier(**flags, image_size=16, in_channels=1, channel_mult="1,2")
    with pytest.raises(ValueError, match="the classifier takes 1x16x16 images, the model makes 1x8x8"):
        fastdiff.Sampler(unet, diffusion, classifier=wide, classifier_scale=1.0)
    with pytest.raises(ValueError, match="null_label"):
        fastdiff.Sampler(unet, diffusion, cfg_scale=2.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        fastdiff.Sampler(unet, diffusion, sampler="euler")
    # a typo names its likely meaning; a name that is no string is the same ValueError (a list was
    # an unhashable-type TypeError)
    for name, meant in (("ddmi", "ddim"), ("dpm", "dpm\\+\\+2m"), ("DDPM", "ddpm")):
        with pytest.raises(
            ValueError, match=f"unknown sampler '{name}'; choose one of: .*did you mean '{meant}'"
        ):
            fastdiff.Sampler(unet, diffusion, sampler=name)
    with pytest.raises(ValueError, match="unknown sampler \\['ddim'\\]"):
        fastdiff.Sampler(unet, diffusion, sampler=["ddim"])
    with pytest.raises(EngineError, match="unknown engine 'grpah'; .*did you mean 'graph'\\?"):
        fastdiff.Sampler(unet, diffusion, engine="grpah")
    with pytest.raises(EngineError, match="unknown engine \\['eager'\\]"):
        fastdiff.Sampler(unet, diffusion, engine=["eager"])
    for bad in ({"eta": math.inf}, {"classifier": clf, "classifier_scale": math.nan}):
        with pytest.raises(ValueError, match="must be finite"):
            fastdiff.Sampler(unet, diffusion, sampler="ddim", **bad)
    for eta in (-0.1, 1.5):  # above 1, DDIM's first step is NaN
        with pytest.raises(ValueError, match="eta must be a finite number >= 0 and <= 1"):
            fastdiff.Sampler(unet, diffusion, sampler="ddim", eta=eta)
    with pytest.raises(ValueError, match="cfg_scale must be finite"):
        fastdiff.Sampler(unet, diffusion, cfg_scale=math.nan, null_label=3)
    bad_settings = {
        "eta must be a number": {"eta": "0.5"},
        "classifier_scale must be a number": {"classifier": clf, "classifier_scale": None},
        "cfg_scale must be a number": {"cfg_scale": "2", "null_label": 5},
        "null_label must be one of the model's 6 class ids": {"cfg_scale": 2.0, "null_label": 6},
        "dtype must be one of fp32, fp16, bf16": {"dtype": "fp64"},
        "unknown device 'gpu'": {"device": "gpu"},
    }
    # the wrong kind of network, process or switch: one ValueError, not an AttributeError from
    # inside (a hand-written model without in_channels/image_size needs image_shape)
    bad_settings.update(
        {
            "classifier must be an nn.Module, got int": {"classifier": 3, "classifier_scale": 1.0},
            "clip_denoised must be True or False, got 'no'": {"clip_denoised": "no"},
            "image_shape must be positive ints \\(C, H, W\\), got '188'": {"image_shape": "188"},
        }
    )
    with pytest.raises(ValueError, match="model must be an nn.Module, got NoneType"):
        fastdiff.Sampler(None, diffusion)
    with pytest.raises(ValueError, match="diffusion must be a GaussianDiffusion"):
        fastdiff.Sampler(unet, None)
    with pytest.raises(
        ValueError, match="pass image_shape \\(C, H, W\\): the model \\(Conv2d\\) has no in_channels"
    ):
        fastdiff.Sampler(torch.nn.Conv2d(1, 1, 1), diffusion)
    if not CUDA:
        bad_settings["device 'cuda' is not available here"] = {"device": "cuda"}
    for message, kw in bad_settings.items():
        with pytest.raises(ValueError, match=message):
            fastdiff.Sampler(unet, diffusion, **kw)
    if not CUDA:
        with pytest.raises(EngineError, match="needs a CUDA device"):
            fastdiff.Sampler(unet, diffusion, engine="graph")
    with pytest.raises(EngineError, match="TensorRT not installed"):
        fastdiff.Sampler(unet, diffusion, engine="trt")
    with pytest.raises(EngineError, match="runs fp32 or fp16 graphs|not installed"):
        fastdiff.Sampler(unet, diffusion, engine="onnx", dtype="bf16")  # refused before any export
    size = unet.image_size
    with pytest.raises(
        EngineError, match=rf"at the model's {size}x{size} images; image_shape \(3, 16, 16\)|not installed"
    ):
        fastdiff.Sampler(
            unet, diffusion, engine="onnx", image_shape=(3, 16, 16)
        )  # every step failed after the export
    s = fastdiff.Sampler(unet, diffusion)
    with pytest.raises(ValueError, match="pass labels"):
        s(num_samples=2)
    with pytest.raises(ValueError, match="noise must have shape"):
        s(torch.tensor([1]), noise=torch.randn(1, 3, 8, 8))
    assert default_engine(torch.device("cpu")) == "eager"


def test_sampler_checks_a_call_before_any_step(monkeypatch):
    """Labels out of any class-aware network's range, of the wrong kind or count, wrong noise,
    generator or callback: one ValueError before the first step (no IndexError from deep inside
    the embedding, and no label silently truncated or broadcast)."""
    from fastdiff.engines import sampler as sampler_module

    unet, clf = _nets()  # the model has 6 classes, the classifier 5
    s = _sampler(unet, clf, _diffusion(), "ddim", "classifier", engine="eager")
    monkeypatch.setattr(sampler_module, "run_steps", None)  # any step run is a failure here
    g = torch.Generator().manual_seed(0)
    for message, labels, kw in (
        ("label 5 out of range: the classifier has classes 0..4", [0, 5], {}),
        ("label -1 out of range", [-1], {}),
        ("integer class ids, got dtype torch.float32", torch.tensor([1.5]), {}),
        ("integer class ids, got str", "3", {}),
        ("2 labels for 3 images", [1, 2], {"num_samples": 3}),
        ("one class id per image \\(1-D\\), got shape \\[2, 1\\]", [[1], [2]], {}),  # was flattened
        ("nothing to sample", [], {}),
        (
            "noise must be a floating-point tensor, got torch.int64",
            [1],
            {"noise": torch.zeros(1, 1, 8, 8).long()},
        ),
        ("generator must be a torch.Generator", [1], {"generator": 0}),
        ("callback must be callable", [1], {"callback": 3}),
        ("num_samples must be an int >= 1, got 2.0", None, {"num_samples": 2.0}),
        (
            "noise must be finite",
            [1],
            {"noise": torch.full((1, 1, 8, 8), math.nan)},
        ),  # was a SamplingError at the end
        (
            "model_kwargs\\['low_res'\\] must be a tensor, got NoneType",
            [1],
            {"model_kwargs": {"low_res": None}},
        ),
    ):
        with pytest.raises(ValueError, match=message):
            s(labels, **{"generator": g, **kw})
    with pytest.raises(ValueError, match="label 6 out of range: the model has classes 0..5"):
        _sampler(unet, clf, _diffusion(), "ddim", "cfg")([6], generator=g)
    with pytest.raises(ValueError, match="images must have shape \\[N, 1, 8, 8\\]"):
        s.invert(torch.zeros(2, 3, 8, 8), [0, 1])
    with pytest.raises(ValueError, match="1 labels for 2 images"):
        s.invert(torch.zeros(2, 1, 8, 8), [0])
    for bad in (math.nan, math.inf):  # was a silently non-finite x_T
        with pytest.raises(ValueError, match="images must be finite"):
            s.invert(torch.full((2, 1, 8, 8), bad), [0, 1])


def test_one_sampler_called_from_two_threads_gives_each_its_own_samples():
    """Calls share the cached step's label buffer: a second thread's call while the first one's
    loop ran made the first one's remaining steps use the second one's labels (wrong samples,
    silently). Calls now take turns."""
    import threading
    import time

    unet, clf = _nets()
    s = _sampler(unet, clf, _diffusion("ddim4"), "ddim", "classifier", engine="eager")
    want = {
        k: s(labels, generator=torch.Generator().manual_seed(0))
        for k, labels in (("a", [1, 2]), ("b", [3, 4]))
    }
    started, got = threading.Event(), {}

    def hold(i, x, pred_xstart):  # the first call pauses after its first step, the second starts
        if i == 0:
            started.set()
            time.sleep(0.5)

    def call(key, labels, callback=None):
        got[key] = s(labels, generator=torch.Generator().manual_seed(0), callback=callback)

    first = threading.Thread(target=call, args=("a", [1, 2], hold))
    first.start()
    assert started.wait(60)
    call("b", [3, 4])
    first.join()
    assert torch.equal(got["a"], want["a"]) and torch.equal(got["b"], want["b"])


def test_a_sampler_whose_network_another_one_converted_says_so():
    """Samplers convert their networks in place: a bf16 Sampler built on the fp32 one's model made
    the fp32 one fail deep in its first conv ('Input type (float) and bias type (c10::BFloat16)')."""
    unet, _ = _nets()
    first = fastdiff.Sampler(unet, _diffusion("ddim4"))
    second = fastdiff.Sampler(unet, _diffusion("ddim4"), dtype="bf16")
    with pytest.raises(
        ValueError, match="the model's weights are torch.bfloat16 on cpu, this Sampler made them"
    ):
        first([1], generator=torch.Generator().manual_seed(0))
    assert second([1], generator=torch.Generator().manual_seed(0)).shape == (1, 1, 8, 8)


def test_unconditional_model_takes_num_samples_and_refuses_labels():
    torch.manual_seed(0)
    flags = dict(image_size=8, num_channels=32, num_res_blocks=1, attention_resolutions="4")
    unc = build_unet(
        **flags, channel_mult="1,2", num_head_channels=32, in_channels=1, learn_sigma=True
    ).eval()
    s = fastdiff.Sampler(unc, _diffusion("ddim2"), engine="eager")
    assert s(num_samples=2, generator=torch.Generator().manual_seed(0)).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="neither the model nor its guidance is class-conditional"):
        s([1, 2])
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        fastdiff.Sampler(unc, _diffusion(), cfg_scale=2.0, null_label=0)


@pytest.mark.parametrize("warm_first", [True, False])
def test_building_the_engine_is_warm_up_not_sampling(monkeypatch, warm_first):
    """An engine's build (the onnx engine exports and opens its session there) is counted in
    warmup_seconds, with or without warmup() (eager on the CPU skips it), so a run's summary
    does not book it as sampling. The sampler's clock moves only in the build: a real sleep of
    0.3 s under a bound of 0.6 s on what was timed fails when the process waits 0.3 s for a core
    (a test asserts no time)."""
    from types import SimpleNamespace

    from fastdiff.engines import sampler as sampler_module

    real, clock = sampler_module.build_engine, [0.0]

    def slow_build(*args):
        clock[0] += 0.25
        return real(*args)

    monkeypatch.setattr(sampler_module, "build_engine", slow_build)
    monkeypatch.setattr(sampler_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    unet, clf = _nets()
    s = _sampler(unet, clf, _diffusion(), "ddim", "cfg", engine="eager")
    labels = torch.tensor([0, 1])
    if warm_first:
        assert s.warmup(labels) == 0.25
    s(labels, generator=torch.Generator().manual_seed(0))
    assert s.warmup_seconds == 0.25  # built once: the call reused the warmed step


def _engine_matches_eager(engine, device, samplers=tuple(SAMPLERS), dtype="fp32", guidances=tuple(GUIDANCE)):
    unet, clf = _nets(device)
    for sampler in samplers:
        diffusion = _diffusion("6" if sampler == "ddpm" else "ddim6")
        for guidance in guidances:
            labels = torch.tensor([0, 3, 4], device=device)
            eager = _sampler(
                unet, clf, diffusion, sampler, guidance, engine="eager", device=device, dtype=dtype
            )
            fast = _sampler(
                unet, clf, diffusion, sampler, guidance, engine=engine, device=device, dtype=dtype
            )
            steps_eager, steps_fast = {}, {}
            for s, steps in ((eager, steps_eager), (fast, steps_fast)):
                for seed in (0, 1):  # the second call replays the compiled / captured step
                    steps.clear()
                    s(
                        labels,
                        generator=torch.Generator(device).manual_seed(seed),
                        callback=lambda i, x, x0, steps=steps: steps.__setitem__(i, x.clone()),
                    )
            # along the trajectory; a whole-loop engine shows its last step only
            assert max(steps_fast) == max(steps_eager)
            for i, got in steps_fast.items():
                assert _rel(got, steps_eager[i]) <= 1e-4, (engine, sampler, guidance, i)


def test_parallel_engine_matches_eager(workers=2):
    """The batch split over CPU threads: samplers with noise (ddpm) and state (dpm++), both
    guidances, an odd batch, new labels in the cached slices' views, a batch smaller than the
    workers; the caller's thread count untouched."""
    unet, clf = _nets()
    before = torch.get_num_threads()
    for sampler, guidance in (("ddim", "classifier"), ("ddpm", "classifier"), ("dpm++2m", "cfg")):
        diffusion = _diffusion("6" if sampler == "ddpm" else "ddim6")
        s = _sampler(unet, clf, diffusion, sampler, guidance, engine="parallel")
        for seed, labels in enumerate((torch.tensor([0, 3, 4]), torch.tensor([4, 2, 1]), torch.tensor([1]))):
            torch.set_num_threads(workers)  # the engine takes its workers from the thread count
            try:
                got = s(labels, generator=torch.Generator().manual_seed(seed))
                assert torch.get_num_threads() == workers
            finally:
                torch.set_num_threads(before)
            want = _reference(unet, clf, diffusion, sampler, guidance, labels, seed)
            assert _rel(got, want) <= 1e-4, (sampler, guidance, labels)
    with pytest.raises(EngineError, match="CPU threads"):
        fastdiff.Sampler(unet, _diffusion(), engine="parallel", device="meta")


def test_reference_ops_default_to_the_eager_engine_with_threads(monkeypatch):
    """FASTDIFF_OPS=reference runs the whole batch in one call on the CPU however many threads
    torch has: the parallel engine's slices round as a smaller batch does, not as the original."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert default_engine(torch.device("cpu")) == "parallel"
        monkeypatch.setenv("FASTDIFF_OPS", "reference")
        assert default_engine(torch.device("cpu")) == "eager"
    finally:
        torch.set_num_threads(before)


def test_parallel_engine_runs_a_batch_of_one_on_a_one_core_worker():
    """A batch of one is a single slice: it ran on the caller's thread with torch's intra-op
    threads, 4x slower a guided step of the bundled model at 2 threads than at 1 (OpenMP's
    barriers at a batch too small to split). It runs on a worker with one intra-op thread."""
    import threading

    from fastdiff.engines.parallel import BatchParallelStep

    class Step:
        def narrow(self, a, m, n):
            return self

        def __call__(self, x, t, noise, state):
            seen.append((threading.current_thread().name, torch.get_num_threads()))
            return x + 1, x, state

    seen, before = [], torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        step = BatchParallelStep(Step(), workers=2)
        for n in (1, 2):
            x = torch.zeros(n, 1)
            out, _, _ = step(x, torch.zeros(n, dtype=torch.long), None, None)
            assert torch.equal(out, x + 1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 3 and all(name.startswith("fastdiff-step") and threads == 1 for name, threads in seen)


def test_parallel_engine_keeps_the_callers_autocast(workers=2):
    """autocast is per thread: under a caller's ``torch.autocast("cpu", torch.bfloat16)`` the
    parallel engine's slices computed in fp32 (different samples from eager's, silently)."""
    unet, clf = _nets()
    diffusion = _diffusion("ddim4")
    eager = _sampler(unet, clf, diffusion, "ddim", "classifier", engine="eager")
    parallel = _sampler(unet, clf, diffusion, "ddim", "classifier", engine="parallel")
    labels, before = torch.tensor([0, 3, 4, 1]), torch.get_num_threads()
    torch.set_num_threads(workers)  # the engine takes its workers from the thread count
    try:
        fp32 = parallel(labels, generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = parallel(labels, generator=torch.Generator().manual_seed(0))
            want = eager(labels, generator=torch.Generator().manual_seed(0))
    finally:
        torch.set_num_threads(before)
    # bf16 rounds per batch slice, so not bit-equal to eager's whole batch: nearer it than fp32
    # (measured 1.7e-3 against 5.3e-3); the slices ran in fp32 before, bit-equal to fp32's
    assert not torch.equal(got, fp32)
    assert _rel(got, want) < _rel(got, fp32), (_rel(got, want), _rel(got, fp32))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("engine", ["graph", "graph-loop"])
def test_gpu_engines_match_eager(engine, no_tf32):
    _engine_matches_eager(engine, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("guidance", list(GUIDANCE))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_gpu_compile_engine_matches_eager(sampler, guidance, no_tf32):
    """One cold compile per test (a minute or more each): bench/run_gpu.py's time limit for the
    GPU tests cuts whole cases, and those that ran are reported."""
    _engine_matches_eager("compile", "cuda", samplers=(sampler,), guidances=(guidance,))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_graph_fp16_psnr():
    unet, clf = _nets("cuda")
    diffusion = _diffusion()
    labels = torch.tensor([0, 1, 2, 3], device="cuda")
    ref = _sampler(unet, clf, diffusion, "ddim", "classifier", engine="eager", device="cuda")(
        labels, generator=torch.Generator("cuda").manual_seed(0)
    )
    got = _sampler(unet, clf, diffusion, "ddim", "classifier", engine="graph", device="cuda", dtype="fp16")(
        labels, generator=torch.Generator("cuda").manual_seed(0)
    )
    mse = ((got - ref) ** 2).mean().item()
    assert 10 * math.log10(4.0 / max(mse, 1e-20)) >= 40


@pytest.mark.slow
def test_compile_engine_matches_eager_cpu():
    # Classifier guidance only: its gradient is the part a whole-step graph has to trace
    # (torch.func.grad); each CPU compile of the step takes minutes.
    _engine_matches_eager("compile", "cpu", samplers=("ddim",), guidances=("classifier",))


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: capture runs the captured body once
    (recording it), replay runs it again on the same static inputs and writes into the captured
    outputs, which is what a real replay does to its memory. Checks the graph engines' buffer
    plumbing without a GPU."""

    def __init__(self):
        self.fn = None
        self.replays = 0

    def replay(self):
        self.replays += 1
        fresh = self.fn()
        for dst, src in zip(self.outputs, fresh):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)


@pytest.fixture
def fake_cuda_graph(monkeypatch):
    """The graph engines on the CPU: streams and syncs are no-ops, capture records the body."""
    from contextlib import contextmanager

    from fastdiff import engines
    from fastdiff.engines.graph import GraphStep, LoopGraph

    class _Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    @contextmanager
    def _noop(*_args, **_kwargs):
        yield

    fake = _FakeGraph()
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", _noop)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: fake)
    monkeypatch.setattr(torch.cuda, "graph", _noop)

    original_record = GraphStep._record

    def record(self, body, *inputs):
        original_record(self, body, *inputs)
        fake.fn = lambda: body(*self.inputs)
        fake.outputs = self.outputs

    monkeypatch.setattr(GraphStep, "_record", record)
    monkeypatch.setitem(engines.ENGINES, "graph", lambda step, device: GraphStep(step))
    monkeypatch.setitem(engines.ENGINES, "graph-loop", lambda step, device: LoopGraph(step))
    # runs.device binds check_engine at import: patched (so imported) before engines' name is,
    # or a first import under this fixture would keep the stand-in for the worker's later tests
    monkeypatch.setattr("fastdiff.runs.device.check_engine", lambda *args: None)
    monkeypatch.setattr("fastdiff.engines.check_engine", lambda *args: None)
    monkeypatch.setattr("fastdiff.engines.sampler.check_engine", lambda *args: None)
    return fake


def _note(seen: list, i: int, *_) -> None:
    seen.append(i)


@pytest.mark.parametrize("engine", ["graph", "graph-loop"])
def test_graph_engine_buffers_on_cpu(fake_cuda_graph, engine):
    from fastdiff.engines.graph import GraphStep, LoopGraph

    unet, clf = _nets()
    for sampler in SAMPLERS:  # dpm++2m carries state across steps; ddpm draws noise each step
        diffusion = _diffusion("6" if sampler == "ddpm" else "ddim6")
        labels = torch.tensor([0, 3, 4])
        want = _reference(unet, clf, diffusion, sampler, "classifier", labels, 5)
        s = _sampler(unet, clf, diffusion, sampler, "classifier", engine=engine)
        s(torch.tensor([1, 1, 1]), generator=torch.Generator().manual_seed(9))  # capture with other labels
        replays = fake_cuda_graph.replays
        seen = []
        got = s(labels, generator=torch.Generator().manual_seed(5), callback=functools.partial(_note, seen))
        assert torch.equal(got, want), sampler
        run = s.step_for(3)[1]
        assert isinstance(run, LoopGraph if engine == "graph-loop" else GraphStep)
        steps = diffusion.num_timesteps
        # the loop graph replays once per batch and shows its last step; the step graph every step
        assert fake_cuda_graph.replays - replays == (1 if engine == "graph-loop" else steps)
        assert seen == ([steps - 1] if engine == "graph-loop" else list(range(steps)))


def test_loop_graph_names_the_first_bad_step(fake_cuda_graph):
    """The NaN check runs inside the captured loop: the error names the step, as eager's does."""
    from fastdiff.diffusion.errors import SamplingError

    unet, clf = _nets()
    diffusion = _diffusion()
    s = _sampler(unet, clf, diffusion, "ddim", "classifier", engine="graph-loop")
    labels = torch.tensor([0, 3, 4])
    s(labels, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        next(s.model.parameters()).fill_(float("nan"))  # every step from the first is bad
    with pytest.raises(SamplingError, match="step 1/6"):
        s(labels, generator=torch.Generator().manual_seed(0))


def test_loop_graph_inverts_as_eager(fake_cuda_graph):
    """Sampler.invert through the whole-loop graph: one replay, the eager engine's x_T."""
    unet, clf = _nets()
    diffusion = _diffusion()
    labels = torch.tensor([0, 3, 4])
    x0 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    want = _sampler(unet, clf, diffusion, "ddim", "classifier", engine="eager").invert(x0, labels)
    looped = _sampler(unet, clf, diffusion, "ddim", "classifier", engine="graph-loop")
    looped.invert(x0 * 0.5, labels)  # captured on other images
    replays = fake_cuda_graph.replays
    assert torch.equal(looped.invert(x0, labels), want)
    assert fake_cuda_graph.replays == replays + 1


def test_upsampler_conditioning_is_checked_and_inverts():
    """An upsampler's low_res is required, float NCHW of the image's channels and the only extra
    input; invert takes it too. Other channels were a conv error, and a float64 low_res failed in
    the first conv (it is taken as fp32); another size is resized by the model, as the original's."""
    from builders import build_superres, make_diffusion

    flags = dict(large_size=8, small_size=4, num_channels=32, num_res_blocks=1, channel_mult="1,2")
    up = build_superres(**flags, attention_resolutions="4", num_head_channels=32, learn_sigma=True)
    s = fastdiff.Sampler(up.eval(), make_diffusion("ddim2", learn_sigma=True), engine="eager")
    low = torch.rand(2, 3, 4, 4) * 2 - 1
    for message, kw in (
        ("the model needs low_res in model_kwargs", {}),
        (
            "low_res must be floating-point NCHW images of 3 channels",
            {"low_res": (low * 100).to(torch.uint8)},
        ),
        ("low_res must be .*got \\[2, 3, 4\\]", {"low_res": low[:, :, 0]}),
        ("low_res must be .*got \\[2, 1, 4, 4\\]", {"low_res": low[:, :1]}),
        ("the model takes no 'mask' in model_kwargs \\(it takes: low_res\\)", {"low_res": low, "mask": low}),
    ):
        with pytest.raises(ValueError, match=message):
            s(num_samples=2, model_kwargs=kw)
    x = s(num_samples=2, generator=torch.Generator().manual_seed(0), model_kwargs={"low_res": low})
    again = s(
        num_samples=2, generator=torch.Generator().manual_seed(0), model_kwargs={"low_res": low.double()}
    )
    assert torch.equal(again, x)
    assert s(num_samples=2, model_kwargs={"low_res": torch.zeros(2, 3, 2, 2)}).shape == (2, 3, 8, 8)
    assert s.invert(x, model_kwargs={"low_res": low}).shape == (2, 3, 8, 8)


def test_guidance_stream_forks_and_joins_inside_the_step(monkeypatch):
    """What the CUDA-graph capture needs of the step (stand-in streams on the CPU): the guidance
    stream waits for the capturing stream before the classifier reads x_t, runs the whole
    gradient, and the capturing stream waits for it before guidance and the update rule use it
    (work left unjoined is a capture error)."""
    from contextlib import contextmanager

    from fastdiff.diffusion.guidance import ClassifierGuidance
    from fastdiff.diffusion.samplers import SamplingStep, make_rule

    events, current = [], ["S"]

    class _Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits {other.name}")

    @contextmanager
    def _on(stream):
        before, current[0] = current[0], stream.name
        events.append(f"on {stream.name}")
        try:
            yield
        finally:
            current[0] = before
            events.append(f"back on {before}")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream(current[0]))
    monkeypatch.setattr(torch.cuda, "stream", _on)
    unet, clf = _nets()
    diffusion = _diffusion()
    guidance = ClassifierGuidance(clf, 2.0)

    def cond_fn(*args, **kwargs):
        events.append(f"gradient on {current[0]}")
        return guidance(*args, **kwargs)

    def model(*args, **kwargs):
        events.append(f"model on {current[0]}")
        return unet(*args, **kwargs)

    rule = make_rule(diffusion, "ddim")

    def traced_rule(*args):
        events.append(f"rule on {current[0]}")
        return rule(*args)

    traced_rule.guidance, traced_rule.needs_noise = rule.guidance, rule.needs_noise
    labels = torch.tensor([0, 3])
    step = SamplingStep(diffusion, model, traced_rule, model_kwargs={"y": labels}, cond_fn=cond_fn)
    step.guidance_stream = _Stream("G")
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 5)
    with torch.no_grad():
        got = step(x, t, None, None)[0]
    assert events == [
        "G waits S",
        "on G",
        "gradient on G",
        "back on S",
        "model on S",
        "S waits G",
        "rule on S",
    ]
    step.guidance_stream = None
    with torch.no_grad():
        assert torch.equal(got, step(x, t, None, None)[0])


@pytest.mark.slow
@pytest.mark.skipif(
    not (triton_available() and (CUDA or triton_interpret())),
    reason="the kernels need triton and CUDA, or TRITON_INTERPRET=1 exported before triton is imported",
)
def test_compile_engine_step_runs_the_kernels(monkeypatch):
    """The compiled step's UNet calls fastdiff's kernels (custom ops, opaque to inductor) and its
    classifier gradient, traced through torch.func.grad, plain PyTorch; before, the whole step
    traced to plain PyTorch, so the compile engine never ran a fastdiff kernel. The graph is
    recorded and run by dynamo alone (inductor's CPU compile takes minutes)."""
    device = "cuda" if CUDA else "cpu"
    targets = []
    real_compile = torch.compile

    def record(gm, _inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def recorded(fn, **kw):
        return real_compile(fn, **{**kw, "backend": record})

    unet, clf = _nets(device)
    diffusion = _diffusion("ddim2")
    labels = torch.tensor([0, 3], device=device)
    runs = {}
    for engine in ("eager", "compile"):  # eager on the fast paths (the interpreter is slow)
        monkeypatch.setenv("FASTDIFF_OPS", "triton" if engine == "compile" else "auto")
        monkeypatch.setattr(torch, "compile", recorded if engine == "compile" else real_compile)
        s = _sampler(unet, clf, diffusion, "ddim", "classifier", engine=engine, device=device)
        runs[engine] = s(labels, generator=torch.Generator(device).manual_seed(0))
    kernels = [t for t in targets if t.startswith("fastdiff.")]
    assert "fastdiff.ada_group_norm" in kernels and "fastdiff.attention.default" in kernels
    assert any("group_norm" in t and not t.startswith("fastdiff.") for t in targets)  # the classifier
    assert _rel(runs["compile"], runs["eager"]) <= 1e-4


def test_compile_engine_builds_past_dynamos_recompile_limit(monkeypatch):
    """Every compiled step has a code object of its own: dynamo counts recompiles per code object,
    so while all steps shared SamplingStep.__call__'s, the process's ninth compiled step (a batch
    size, Sampler or compat loop) failed under fullgraph. The limit is lowered to 1 here (and the
    graphs run by dynamo alone), so the second batch size failed."""
    import torch._dynamo

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "eager"}))

    class Net(torch.nn.Conv2d):
        def forward(self, x, t):
            return super().forward(x)

    torch.manual_seed(0)
    model = Net(1, 2, 3, padding=1)
    diffusion = make_diffusion(steps=1000, learn_sigma=True, timestep_respacing="ddim2")
    eager, compiled = (
        fastdiff.Sampler(model, diffusion, engine=e, image_shape=(1, 4, 4)) for e in ("eager", "compile")
    )
    # torch's own patch: monkeypatch's undo deletes a torch config entry (see the test below)
    with torch._dynamo.config.patch(recompile_limit=1):
        for n in (2, 1, 3):
            g = [torch.Generator().manual_seed(n) for _ in range(2)]
            assert _rel(compiled(num_samples=n, generator=g[0]), eager(num_samples=n, generator=g[1])) <= 1e-6


def _counted_compiles(monkeypatch, backend="eager") -> list:
    """torch.compile with ``backend`` (dynamo alone by default: inductor's CPU compile takes
    minutes), each graph it is handed recorded in the returned list."""
    graphs = []
    real_compile = torch.compile

    def counted(gm, inputs):
        graphs.append(gm)
        return gm.forward if backend == "eager" else backend(gm, inputs)

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": counted}))
    return graphs


def test_compile_engine_pads_a_smaller_batch_instead_of_compiling_again(monkeypatch):
    """A batch smaller than one the compile engine built runs through that step, padded: a run's
    last partial batch compiled again (a second cold compile, 190 s for the bundled model on the
    CPU). Noise (ddpm), sampler state (dpm++), both guidances and invert, against eager at the
    same seeds; dynamo alone runs the graphs, so padding, not inductor's rounding, is checked."""
    graphs = _counted_compiles(monkeypatch)
    unet, clf = _nets()
    for sampler, guidance in (("ddim", "classifier"), ("dpm++2m", "classifier"), ("ddpm", "cfg")):
        diffusion = _diffusion("3" if sampler == "ddpm" else "ddim3")
        eager, compiled = (
            _sampler(unet, clf, diffusion, sampler, guidance, engine=e) for e in ("eager", "compile")
        )
        before = len(graphs)
        for seed, n in enumerate((4, 3, 1)):
            labels = torch.tensor([4, 0, 3, 1][:n])
            got, want = (s(labels, generator=torch.Generator().manual_seed(seed)) for s in (compiled, eager))
            assert _rel(got, want) <= 1e-4, (sampler, guidance, n, _rel(got, want))
        assert len(graphs) == before + 1, (sampler, guidance)  # the smaller batches compiled nothing
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    for n in (4, 2):  # the inversion step: a graph of its own, padded the same way
        labels = torch.tensor([1, 4, 0, 2][:n])
        got, want = (s.invert(x0[:n], labels) for s in (compiled, eager))
        assert _rel(got, want) <= 1e-4, ("invert", n)
    assert len(graphs) == before + 2


def test_compile_engine_pads_an_upsamplers_low_res(monkeypatch):
    """An upsampler's low_res pads with the batch (zero rows) and keys the step by its per-image
    shape: a smaller batch of the same resolution reuses the step, another resolution does not."""
    from builders import build_superres

    graphs = _counted_compiles(monkeypatch)
    flags = dict(large_size=8, small_size=4, num_channels=32, num_res_blocks=1, channel_mult="1,2")
    torch.manual_seed(0)
    up = build_superres(**flags, attention_resolutions="4", num_head_channels=32, learn_sigma=True).eval()
    diffusion = make_diffusion(steps=1000, learn_sigma=True, timestep_respacing="ddim2")
    eager, compiled = (fastdiff.Sampler(copy.deepcopy(up), diffusion, engine=e) for e in ("eager", "compile"))
    low = torch.rand(3, 3, 4, 4) * 2 - 1
    for seed, n in enumerate((3, 2)):
        kw = dict(num_samples=n, model_kwargs={"low_res": low[:n]})
        got, want = (s(generator=torch.Generator().manual_seed(seed), **kw) for s in (compiled, eager))
        assert _rel(got, want) <= 1e-4, n
    assert len(graphs) == 1
    assert compiled._size_for(2, {"low_res": torch.zeros(2, 3, 2, 2)}) == 2  # another layout: its own step


@pytest.mark.slow
def test_compile_engine_pads_a_partial_batch_cpu(monkeypatch):
    """The padded step under inductor's real compile (its kernels' rounding): ddim and dpm++
    with classifier guidance, a batch of 3 then 2, one compile each (minutes on this CPU)."""
    from torch._inductor.compile_fx import compile_fx

    graphs = _counted_compiles(monkeypatch, backend=compile_fx)
    unet, clf = _nets()
    for sampler in ("ddim", "dpm++2m"):
        diffusion = _diffusion("ddim6")
        eager, compiled = (
            _sampler(unet, clf, diffusion, sampler, "classifier", engine=e) for e in ("eager", "compile")
        )
        before = len(graphs)
        for seed, labels in enumerate((torch.tensor([0, 3, 4]), torch.tensor([2, 1]))):
            got, want = (s(labels, generator=torch.Generator().manual_seed(seed)) for s in (compiled, eager))
            assert _rel(got, want) <= 1e-4, (sampler, len(labels), _rel(got, want))
        assert len(graphs) == before + 1, sampler


def test_compile_engine_steps_follow_fastdiff_ops(monkeypatch):
    """FASTDIFF_OPS is read while dynamo traces a compiled step (the UNet's attention: the
    reference's einsums, or SDPA on the CPU's auto path): a second Sampler in the process, built
    and run after the mode changed, traces the new mode rather than reusing the first's graph, as
    eager reads the mode per call. The graphs are recorded and run by dynamo alone."""
    graphs = []
    real_compile = torch.compile

    def record(gm, _inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": record}))
    unet, _ = _nets()
    diffusion = _diffusion("ddim2")
    labels = torch.tensor([0, 3])
    for mode in ("reference", "auto", "reference"):
        monkeypatch.setenv("FASTDIFF_OPS", mode)
        got, want = (
            _sampler(unet, None, diffusion, "ddim", "cfg", engine=e)(
                labels, generator=torch.Generator().manual_seed(0)
            )
            for e in ("compile", "eager")
        )
        reference = any("einsum" in t for t in graphs[-1])
        sdpa = any("scaled_dot_product_attention" in t for t in graphs[-1])
        assert (reference, sdpa) == (mode == "reference", mode == "auto"), mode
        assert _rel(got, want) <= 1e-4


def test_compile_engine_without_a_cpp_compiler_is_one_error_before_work(tmp_path):
    """Inductor's CPU step needs a C++ compiler: without one, --engine compile failed at the first
    batch (after loading the networks and writing run.json) in a long traceback."""
    import torch._inductor.config

    from fastdiff.runs import RunError, sample_run

    with torch._inductor.config.patch({"cpp.cxx": (None, str(tmp_path / "no-g++"))}):
        with pytest.raises(EngineError, match="needs a C\\+\\+ compiler"):
            fastdiff.Sampler(torch.nn.Conv2d(1, 1, 1), _diffusion(), engine="compile", image_shape=(1, 4, 4))
        with pytest.raises(RunError, match="needs a C\\+\\+ compiler"):
            sample_run(tmp_path / "out", engine="compile", device="cpu", threads=1)
    assert not (tmp_path / "out").exists()


def test_the_compile_engine_tests_leave_torchs_config_whole():
    """The compile engine tests above patch torch's config with its own ``config.patch``: pytest's
    monkeypatch (9.2) undid a torch config by deleting it, so every later compile in the process
    failed (AttributeError: torch._dynamo.config.recompile_limit, torch._inductor.config.cpp.cxx
    does not exist), the compile engine's one-line check included. Run after them, in file order."""
    import torch._dynamo
    import torch._inductor.config

    assert torch._dynamo.config.recompile_limit >= 8
    assert isinstance(torch._inductor.config.cpp.cxx, tuple)
