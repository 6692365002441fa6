"""Export and validate the bundled MNIST model, then write a report into export/results/: node
counts by op type, file size, onnxruntime parity against PyTorch / torch.autograd.grad, the
guided epsilon, the samples, and CPU timing of ``--engine onnx`` against eager (interleaved runs,
medians, process CPU time). ``--variants [NAME ...]``: a tiny random model's cfg and fp16
exports and a tiny upsampler's (all, or the named ones, merged into the record). ``--presets
[NAME ...]``: each preset at full size with random weights (all, or the named ones, merged into
results/presets.json; with ``--dtype fp16``, into results/presets-fp16.json).

    python export/recipe.py [--repeats 3] [--threads 1] [--variants [NAME ...]] [--presets [NAME ...]]
                            [--dtype fp32|fp16] [--no-bundled]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fastdiff.diffusion.guidance import ClassifierGuidance  # noqa: E402
from fastdiff.export import OnnxExportConfig, export_onnx, read_export  # noqa: E402
from fastdiff.export.graph import example_inputs  # noqa: E402
from fastdiff.export.onnx_runtime import OrtDenoiser, cache_dir  # noqa: E402
from fastdiff.export.validate import validate_export  # noqa: E402
from fastdiff.files import atomic_write, to_uint8  # noqa: E402
from fastdiff.runs.loading import load_diffusion_model  # noqa: E402


def _write(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _write_json(path: Path, obj) -> None:
    _write(path, json.dumps(obj, indent=2) + "\n")


def _guided_eps_error(path: Path, loaded, clf, scale: float) -> float:
    """Relative max error of DDIM's guided epsilon (condition_score) from the graph vs eager."""
    diffusion = loaded.diffusion("ddim25")
    graph = read_export(path)
    session = OrtDenoiser(graph)
    x, t_model, y, _ = example_inputs(graph.signature, graph.image_shape, 4, seed=7)
    t = torch.tensor([24, 16, 8, 2])
    t_model = diffusion.model_timesteps(t)
    guide = ClassifierGuidance(clf, scale)
    with torch.no_grad():
        out = diffusion.p_mean_variance(loaded.model, x, t, True, None, {"y": y})
        ref = diffusion.condition_score(guide, out, x, t, {"y": y})["eps"]
        model_out, grad = session(x, t_model, y, scale)
        out2 = diffusion.p_mean_variance_from_output(model_out, x, t, True, None)
        got = diffusion.condition_score(lambda *a, **k: grad, out2, x, t, {"y": y})["eps"]
    return float((got - ref).abs().max() / ref.abs().max())


def _time_engines(loaded, clf, scale: float, repeats: int, batch: int) -> dict:
    """Interleaved eager / onnx sampling runs (DDIM 25): medians of wall and process CPU time,
    and the uint8 difference of their images."""
    import fastdiff

    diffusion = loaded.diffusion("ddim25")
    samplers = {
        engine: fastdiff.Sampler(
            loaded.model, diffusion, sampler="ddim", classifier=clf, classifier_scale=scale, engine=engine
        )  # fmt: skip
        for engine in ("eager", "onnx")
    }
    labels = list(range(batch))
    for s in samplers.values():  # warm-up (the onnx engine's session; eager's first-call costs)
        s(labels, generator=torch.Generator().manual_seed(0))
    wall = {e: [] for e in samplers}
    cpu = {e: [] for e in samplers}
    images = {}
    for _ in range(repeats):
        for engine, s in samplers.items():
            c0, w0 = time.process_time(), time.perf_counter()
            images[engine] = s(labels, generator=torch.Generator().manual_seed(1))
            cpu[engine].append(time.process_time() - c0)
            wall[engine].append(time.perf_counter() - w0)
    a, b = (torch.from_numpy(to_uint8(images[e])).int() for e in ("eager", "onnx"))
    return {
        "batch": batch,
        "steps": 25,
        "repeats": repeats,
        "median_wall_s": {e: statistics.median(v) for e, v in wall.items()},
        "median_cpu_s": {e: statistics.median(v) for e, v in cpu.items()},
        "uint8_max_diff": int((a - b).abs().max()),
        "uint8_mean_diff": float((a - b).abs().float().mean()),
    }


def _inspected(v) -> dict | None:
    """polygraphy's reading of the file as the record keeps it (None: polygraphy not installed)."""
    return None if v.inspection is None else v.inspection.as_dict()


def bundled(repeats: int, batch: int) -> dict:
    cpu = torch.device("cpu")
    loaded = load_diffusion_model(preset=None, flag_string=None, checkpoint=None, device=cpu)
    clf = loaded.bundled_classifier(cpu)
    scale = loaded.default_classifier_scale
    report: dict = {"model": "bundled MNIST (classifier guidance)", "threads": torch.get_num_threads()}
    from fastdiff.export.onnx_runtime import cached_export

    start = time.perf_counter()
    path = cached_export(loaded.model, clf.model, None, OnnxExportConfig())
    report["export_s_or_cached"] = time.perf_counter() - start
    out = HERE / "results" / "bundled-classifier-fp32.onnx.json"
    info = read_export(path)
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    from fastdiff.export.onnx_export import node_counts

    report["file"] = {"bytes": path.stat().st_size, "nodes": node_counts(model), "guidance": info.guidance}
    v = validate_export(path, loaded.model, clf.model, batches=(1, 4, 8))
    report["parity"] = {"relative_max_errors": v.errors, "ok": v.ok}
    report["polygraphy"] = _inspected(v)
    report["ort_call_s"] = v.ort_seconds
    report["eager_call_s"] = v.eager_seconds
    report["guided_eps_relative_error"] = _guided_eps_error(path, loaded, clf.model, scale)
    report["sampling"] = _time_engines(loaded, clf.model, scale, repeats, batch)
    _write_json(out, report)
    return report


VARIANTS = ("classifier+cfg-fp32", "classifier-fp16", "superres-fp32")


def variants(names: list[str] | None = None) -> dict:
    """Tiny random networks in the other export variants: a classifier-guided UNet with classifier
    + classifier-free guidance in one graph and with fp16 weights (run here on onnxruntime's CPU),
    and an upsampler (16x16 from 8x8, low_res as an input). ``names`` (default all) are re-run;
    the record keeps the others' last results."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_export_onnx import _tiny
    from test_upsample import _upsampler

    unet, clf = _tiny()
    sr = _upsampler()
    setups = {
        "classifier+cfg-fp32": (unet, {"classifier": clf, "null_label": 2}, "fp32"),
        "classifier-fp16": (unet, {"classifier": clf}, "fp16"),
        "superres-fp32": (sr, {"low_res_shape": (3, 8, 8)}, "fp32"),
    }
    record = HERE / "results" / "tiny-variants.json"
    results = json.loads(record.read_text()) if record.is_file() else {}
    for name in names or VARIANTS:
        model, kwargs, dtype = setups[name]
        path = cache_dir() / f"tiny-{name}.onnx"
        start = time.perf_counter()
        res = export_onnx(model, path, config=OnnxExportConfig(dtype=dtype), **kwargs)
        seconds = time.perf_counter() - start
        guidance = {k: v for k, v in kwargs.items() if k != "low_res_shape"}
        v = validate_export(path, model, **guidance, batches=(1, 3))
        results[name] = {"export_s": seconds, "bytes": res.bytes, "nodes": sum(res.node_counts.values()),
                         "errors": v.errors, "ok": v.ok, "tolerance": v.tolerance,
                         "polygraphy": _inspected(v)}  # fmt: skip
    _write_json(record, results)
    return results


def vectors(folder: Path) -> dict:
    """Each guided reference case of guided-diffusion (``../shared/vectors``): export its model
    and classifier, then DDIM through ``--engine onnx`` against the case's x_0 and against eager."""
    import fastdiff
    from fastdiff.compat import guided_diffusion as gd

    results = {}
    for case_path in sorted(folder.glob("*.pt")):
        case = torch.load(case_path, weights_only=True)
        spec = case.get("sample", {})
        if "classifier" not in case or float(spec.get("classifier_scale", 0)) == 0:
            continue
        model, _ = gd.create_model_and_diffusion(**case["flags"])
        model.load_state_dict(case["state_dict"], strict=True)
        clf = gd.create_classifier(**case["classifier"]["flags"])
        clf.load_state_dict(case["classifier"]["state_dict"], strict=True)
        for net in (model, clf):
            net.eval().requires_grad_(False)
        names = ("learn_sigma", "noise_schedule", "use_kl", "predict_xstart", "rescale_timesteps",
                 "rescale_learned_sigmas")  # fmt: skip
        diffusion = gd.create_gaussian_diffusion(
            steps=case["flags"].get("diffusion_steps", 1000),
            timestep_respacing=spec["respacing"],
            **{k: case["flags"][k] for k in names if k in case["flags"]},
        )
        from fastdiff.export.onnx_runtime import cached_export

        start = time.perf_counter()
        path = cached_export(model, clf, None, OnnxExportConfig())
        export_s = time.perf_counter() - start
        scale = float(spec["classifier_scale"])
        x0 = {}
        for engine in ("eager", "onnx"):
            s = fastdiff.Sampler(model, diffusion, sampler=spec.get("method", "ddim"), classifier=clf,
                                 classifier_scale=scale, engine=engine, clip_denoised=True)  # fmt: skip
            x0[engine] = s(spec["y"], noise=spec["x_T"])

        def rel(a, b):
            return float((a - b).abs().max() / b.abs().max())

        results[case_path.name] = {
            "export_s_or_cached": export_s,
            "nodes": sum(node_counts_of(path).values()),
            "x0_onnx_vs_reference": rel(x0["onnx"], spec["x_0"]),
            "x0_eager_vs_reference": rel(x0["eager"], spec["x_0"]),
            "x0_onnx_vs_eager": rel(x0["onnx"], x0["eager"]),
        }
    _write_json(HERE / "results" / "vectors.json", results)
    return results


# Each base preset's classifier for guidance (guided-diffusion samples its unconditional 256x256
# model with the 256x256 classifier); LSUN models and upsamplers have none.
CLASSIFIERS = {"imagenet64": "classifier64", "imagenet128": "classifier128", "imagenet256": "classifier256",
               "imagenet256-uncond": "classifier256", "imagenet512": "classifier512",
               "mnist": "mnist-classifier"}  # fmt: skip


def _params(name: str) -> int:
    """Weights of a preset's network and its classifier (built on the meta device: no memory)."""
    from fastdiff.models.presets import build_preset

    nets = [name] + ([CLASSIFIERS[name]] if name in CLASSIFIERS else [])
    return sum(p.numel() for n in nets for p in build_preset(n, "meta").parameters())


def _model_presets() -> list[str]:
    """The presets that export (a classifier goes into its model's graph)."""
    from fastdiff.models.presets import PRESETS

    return [n for n, p in PRESETS.items() if p.kind != "classifier"]


def _preset_names() -> list[str]:
    """The model presets, smallest first: weights (with the classifier's), then image size."""
    from fastdiff.models.presets import PRESETS

    return sorted(_model_presets(), key=lambda n: (_params(n), PRESETS[n].net.image_size))


def _random_network(name: str, seed: int):
    """A preset's network with seeded random weights in fp32 (as the graph holds them); the layers
    ADM initialises to zero (each block's last conv, the output conv) get small random weights too,
    so the model output and the classifier gradient are not trivially zero."""
    from fastdiff.models.presets import build_preset

    torch.manual_seed(seed)
    net = build_preset(name).float().eval().requires_grad_(False)
    for p in net.parameters():
        if p.dim() > 1 and not p.any():
            p.normal_(0, 0.5 / p[0].numel() ** 0.5)
    return net


def _preset_record(name: str, threads: int, seed: int, dtype: str = "fp32") -> dict:
    """Export ``name`` at full size (random weights, with its classifier; the graph in ``dtype``,
    checked against the fp32 networks) into a temporary folder,
    check it (onnx.checker with full shape inference), validate it at batch 1 (with polygraphy's
    inspection), then delete it."""
    import resource
    import shutil
    import tempfile

    import onnx

    from fastdiff.models.presets import PRESETS

    torch.set_num_threads(threads)
    preset = PRESETS[name]
    model = _random_network(name, seed)
    clf = _random_network(CLASSIFIERS[name], seed + 1) if name in CLASSIFIERS else None
    low_res = None
    if preset.kind == "superres":
        low_res = (model.in_channels // 2, preset.net.small_size, preset.net.small_size)
    record = {"image_size": preset.net.image_size, "low_res_shape": low_res, "threads": threads, "seed": seed,
              "dtype": dtype}  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix=f"fastdiff-{name}-"))
    try:
        path = folder / f"{name}.onnx"
        res = export_onnx(model, path, classifier=clf, low_res_shape=low_res,
                          config=OnnxExportConfig(dtype=dtype), metadata={"preset": name})  # fmt: skip
        data = folder / f"{path.name}.data"
        external = data.stat().st_size if data.exists() else 0
        record["export_s"] = res.seconds
        record["file"] = {"bytes": res.bytes, "external_data_bytes": external,
                          "nodes": sum(res.node_counts.values()), "nodes_by_op": res.node_counts}  # fmt: skip
        start = time.perf_counter()
        onnx.checker.check_model(str(path), full_check=True)  # by path: the weights may be a side file
        record["checker_s"] = time.perf_counter() - start
        v = validate_export(path, model, clf, batches=(1,))
        record["parity"] = {"relative_max_errors": v.errors, "tolerance": v.tolerance, "ok": v.ok}
        record["polygraphy"] = _inspected(v)
        record["ort_first_call_s"] = v.ort_seconds[1]  # batch 1, the session's first run
        record["eager_call_s"] = v.eager_seconds[1]
        if dtype != "fp32":
            record["torch_relative_max_errors"] = _torch_errors(path, model, clf, dtype)
    finally:
        shutil.rmtree(folder)
    record["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return record


def _torch_errors(path: Path, model, clf, dtype: str) -> dict:
    """PyTorch's own error in ``dtype`` against the fp32 networks, on the inputs the validation
    gave the graph at batch 1: the graph's denoiser run eagerly (the weights cast, GroupNorm
    statistics in fp32), the floor the graph's own errors compare to."""
    from fastdiff.export.graph import GuidedDenoiser
    from fastdiff.export.onnx_export import DTYPES
    from fastdiff.export.validate import reference_outputs, validation_inputs

    graph = read_export(path)
    sig = graph.signature
    named = validation_inputs(graph, 1)
    refs = reference_outputs(graph, named, model, clf)
    got = GuidedDenoiser(model, clf, None, DTYPES[dtype])(*named.values())
    return {
        f"{name}@1": float((g - refs[name]).abs().max() / refs[name].abs().max())
        for name, g in zip(sig.outputs, got)
    }


def _record_path(dtype: str, ext: str) -> Path:
    """results/presets.EXT for fp32 graphs, results/presets-DTYPE.EXT for the others."""
    return HERE / "results" / f"presets{'' if dtype == 'fp32' else '-' + dtype}.{ext}"


def _write_presets_md(results: dict, dtype: str) -> None:
    rows = ["| preset | classifier | params (M) | export s | file MiB (+ext. data) | nodes | "
            "output / gradient rel. err. | ORT s (1st call) | eager s/call | peak RSS GiB |",
            "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        head = f"| {name} | {r['classifier'] or '-'} | {r['params'] / 1e6:.0f} |"
        if "error" in r:
            rows.append(f"{head} failed: {r['error']} | | | | | | |")
            continue
        f, e = r["file"], r["parity"]["relative_max_errors"]
        errs = " / ".join(f"{e[k]:.1e}" for k in ("model_output@1", "gradient@1") if k in e)
        if "torch_relative_max_errors" in r:  # the same dtype in PyTorch: the floor to compare to
            own = r["torch_relative_max_errors"]
            errs += f" (PyTorch {dtype}: " + " / ".join(f"{own[k]:.1e}" for k in own) + ")"
        mib = f"{f['bytes'] / 2**20:.1f} (+{f['external_data_bytes'] / 2**20:.0f})"
        rows.append(
            f"{head} {r['export_s']:.0f} | {mib} | {f['nodes']} | {errs} | "
            f"{r['ort_first_call_s']:.3g} | {r['eager_call_s']:.3g} | {r['peak_rss_gib']:.1f} |"
        )
    against = "" if dtype == "fp32" else ", errors against the fp32 networks"
    title = f"# Full-size preset exports (random weights, {dtype}, batch 1{against})"
    _write(_record_path(dtype, "md"), title + "\n\n" + "\n".join(rows) + "\n")


def presets(names: list[str] | None, threads: int, seed: int = 0, dtype: str = "fp32") -> dict:
    """Each preset (all, or ``names``; smallest first) exported in ``dtype`` and validated in a
    process of its own (its memory is returned, and one that dies is recorded as such), merged
    into results/presets[-DTYPE].json and .md after each, so a partial run keeps the others'
    results."""
    import multiprocessing
    import traceback
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    record = _record_path(dtype, "json")
    results = json.loads(record.read_text()) if record.is_file() else {}
    order = _preset_names()
    for name in sorted(names, key=order.index) if names else order:
        print(f"{name}: exporting", flush=True)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                result = pool.submit(_preset_record, name, threads, seed, dtype).result()
            except BrokenProcessPool:
                result = {"error": "the export process died (killed: out of memory?)"}
            except Exception as e:  # the export's own failure, recorded for this preset
                last = traceback.format_exception_only(type(e), e)[-1].strip()
                result = {"error": " ".join(last.split())[:300]}
        results[name] = {"classifier": CLASSIFIERS.get(name), "params": _params(name), **result}
        print(f"{name}: {json.dumps(results[name])[:400]}", flush=True)
        results = {n: results[n] for n in order if n in results}
        _write_json(record, results)
        _write_presets_md(results, dtype)
    return results


def node_counts_of(path: Path) -> dict:
    import onnx

    from fastdiff.export.onnx_export import node_counts

    return node_counts(onnx.load(str(path), load_external_data=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--variants",
        nargs="*",
        choices=VARIANTS,
        default=None,
        help="also tiny models' exports (all, or these)",
    )
    ap.add_argument(
        "--presets",
        nargs="*",
        choices=_model_presets(),
        default=None,
        help="also each preset at full size with random weights (all, or these; smallest first)",
    )
    ap.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="the preset graphs' dtype")
    ap.add_argument("--no-bundled", action="store_true", help="skip the bundled model")
    ap.add_argument("--vectors", type=Path, default=None, help="guided-diffusion reference cases folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_bundled:
        print(json.dumps(bundled(args.repeats, args.batch), indent=2))
    if args.variants is not None:
        print(json.dumps(variants(args.variants), indent=2))
    if args.presets is not None:
        presets(args.presets, args.threads, dtype=args.dtype)
    if args.vectors is not None:
        print(json.dumps(vectors(args.vectors), indent=2))


if __name__ == "__main__":
    main()
