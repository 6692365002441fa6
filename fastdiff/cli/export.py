"""``fastdiff export onnx|trt``: the guided denoiser as an ONNX file, and a TensorRT engine from it.

An upsampler (a superres preset, or flags with a small size) exports with its ``low_res`` input
at its small size, without guidance (ADM-U has none). Under torchrun rank 0 alone writes (and
validates) while the other ranks wait: every rank checks the options, one exports."""

from __future__ import annotations

import re
from pathlib import Path

import click

from fastdiff.cli.errors import user_error
from fastdiff.cli.paths import UserPath, UserText
from fastdiff.config import ConfigError


@click.group("export")
def export_command():
    """Export the classifier-guided denoiser for inference runtimes (ONNX, TensorRT)."""


def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(" ".join(str(e).split()))


def _once(what: str, work) -> None:
    """``work()`` (writing, validating, printing) by rank 0 alone under torchrun, the other ranks
    waiting: one file instead of N ranks exporting it at once and renaming onto the same path.
    Its error is every rank's one line; without torchrun it just runs."""
    import torch

    from fastdiff.runs import RunError, ranks

    ranks.join(torch.device("cpu"))  # a gloo group to wait in; rank 0's work picks its own device

    def one_line():
        try:
            work()
        except click.ClickException as e:  # ranks.agreed passes RunError's line to the others
            raise RunError(e.format_message()) from None

    ranks.decided_by_main(what, one_line)


@export_command.command("onnx")
@click.option(
    "--preset", default=None, help="Model or upsampler preset (a fastdiff .safetensors needs none)."
)
@click.option("--flags", "flag_string", default=None, help="guided-diffusion flag string over the preset.")
@click.option("--checkpoint", type=UserPath(path_type=Path), default=None, help="Model weights.")
@click.option(
    "--classifier",
    type=UserText(),
    default=None,
    help="Classifier checkpoint whose input gradient goes into the graph ('bundled': the MNIST one).",
)
@click.option("--cfg", is_flag=True, help="Classifier-free guidance: both halves in one batch.")
@click.option("--out", type=UserPath(path_type=Path), required=True, help="Folder to write into.")
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="The networks' dtype in the graph.",
)
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (18 or later).")
@click.option("--max-batch", type=int, default=4096, show_default=True, help="Largest batch the graph takes.")
@click.option("--validate/--no-validate", default=True, show_default=True, help="Compare with PyTorch.")
def export_onnx_command(
    preset, flag_string, checkpoint, classifier, cfg, out, dtype, opset, max_batch, validate
):
    """One ONNX graph: UNet output and the classifier's input gradient (no autograd inside)."""
    import torch

    from fastdiff.export import ExportError, OnnxExportConfig, export_onnx
    from fastdiff.export.onnx_export import missing_packages
    from fastdiff.export.validate import validate_export
    from fastdiff.runs.device import check_ops_mode
    from fastdiff.runs.folder import check_writable, shared_folder, writing
    from fastdiff.runs.loading import (
        BUNDLED_CLASSIFIER,
        check_classifier,
        load_classifier,
        load_diffusion_model,
    )
    from fastdiff.runs.upsample import load_upsampler, names_upsampler

    if missing := missing_packages():
        raise click.ClickException(missing)
    check_ops_mode()  # the trace runs the ops
    try:
        config = OnnxExportConfig(dtype=dtype, opset=opset, max_batch=max_batch)
    except ExportError as e:  # name the options the user wrote, not the config's fields
        option = re.sub(r"\b(dtype|opset|max_batch)\b", lambda m: "--" + m[0].replace("_", "-"), str(e))
        raise user_error(ConfigError(option, usage=True)) from None  # each a number out of its range
    if out.exists() and not out.is_dir():
        raise click.ClickException(f"--out {out} exists and is not a folder")
    cpu = torch.device("cpu")
    low_res_shape = None
    if names_upsampler(preset, flag_string, checkpoint):
        if classifier is not None or cfg:
            option = "--classifier" if classifier is not None else "--cfg"
            raise click.ClickException(
                f"{option}: upsamplers export without guidance (ADM-U has no classifier or "
                "classifier-free guidance; fastdiff upsample takes neither)"
            )
        loaded = load_upsampler(preset=preset, flag_string=flag_string, checkpoint=checkpoint, device=cpu)
        low_res_shape = (loaded.in_channels, loaded.net.small_size, loaded.net.small_size)
    else:
        loaded = load_diffusion_model(
            preset=preset, flag_string=flag_string, checkpoint=checkpoint, device=cpu
        )
    clf = None
    if classifier is not None:
        path = BUNDLED_CLASSIFIER if classifier == "bundled" else Path(classifier)
        clf = load_classifier(path, preset=None, flag_string=None, image_size=loaded.image_size, device=cpu)
        check_classifier(loaded, clf)
    if cfg and loaded.null_label is None:
        raise click.ClickException("--cfg needs a model trained with a null label (classifier-free guidance)")
    null_label = loaded.null_label if cfg else None
    kind = ("classifier" if clf else "") + ("+cfg" if cfg else "")
    kind = "superres" if low_res_shape is not None else kind.strip("+") or "none"
    name = f"denoiser-{kind}-{dtype}.onnx"
    meta = {"preset": preset or "", "checkpoint_sha256": loaded.identity["sha256"]}
    check_writable(out, f"--out {out}")  # before the trace, not after it
    _check_replaceable(out / name, loaded.model, clf, null_label, config, low_res_shape)

    def export():
        try:
            # a second export into --out is one line; a killed one's temporaries go first
            with shared_folder(out, [name]), writing(out):  # a full disk: one line, not a traceback
                result = export_onnx(
                    loaded.model,
                    out / name,
                    classifier=None if clf is None else clf.model,
                    null_label=null_label,
                    low_res_shape=low_res_shape,
                    config=config,
                    metadata=meta,
                )
        except ExportError as e:
            raise _fail(e) from None
        from fastdiff.export.onnx_runtime import remember

        nodes = sum(result.node_counts.values())
        click.echo(f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB, {nodes} nodes)")
        if validate:
            report = validate_export(
                result.path, loaded.model, None if clf is None else clf.model, null_label
            )
            click.echo(report.summary())
            if not report.ok:  # kept for inspection, but not offered to --engine onnx
                raise click.ClickException(f"{result.path} does not match PyTorch: {report.summary()}")
        remember(result.path, result.hash, max_batch)  # fastdiff sample --engine onnx then finds it

    _once("exporting the graph", export)


def _check_replaceable(path: Path, model, clf, null_label, config, low_res_shape) -> None:
    """An existing file of that name is replaced only by the export of the same networks and
    settings (a re-export); another model's graph, or a file that is no fastdiff export, stays."""
    from fastdiff.export import ExportError, read_export
    from fastdiff.export.onnx_export import denoiser_hash

    if not path.exists():
        return
    try:
        previous = read_export(path, check_data=False).hash  # a lost side file is re-exported
    except ExportError:
        previous = None
    wanted = denoiser_hash(
        model, None if clf is None else clf.model, null_label, config.dtype, config.opset, low_res_shape
    )
    if previous != wanted:
        raise click.ClickException(
            f"{path} holds another export (other networks or settings); choose another --out or delete it"
        )


@export_command.command("trt")
@click.option("--onnx", "onnx_path", type=UserPath(path_type=Path), required=True, help="Exported graph.")
@click.option("--out", type=UserPath(path_type=Path), required=True, help="Folder to write into.")
@click.option(
    "--precision",
    type=click.Choice(["fp16", "bf16", "fp32"]),
    default="fp16",
    show_default=True,
    help="TensorRT layer precision.",
)
@click.option("--min-batch", type=int, default=1, show_default=True, help="Smallest batch the engine takes.")
@click.option("--opt-batch", type=int, default=8, show_default=True, help="Batch the engine is tuned for.")
@click.option("--max-batch", type=int, default=64, show_default=True, help="Largest batch the engine takes.")
def export_trt_command(onnx_path, out, precision, min_batch, opt_batch, max_batch):
    """A TensorRT engine from an exported ONNX graph (CUDA, TensorRT 10)."""
    from fastdiff.export import ExportError, read_export
    from fastdiff.export.onnx_export import missing_packages
    from fastdiff.export.tensorrt_engine import (
        TrtBuildConfig,
        build_engine,
        engine_key,
        gpu_key,
        remember_engine,
        tensorrt,
        timing_cache_name,
    )
    from fastdiff.runs.folder import check_writable

    try:  # what the machine lacks first, then the file (reading a large one takes a while)
        config = TrtBuildConfig(precision, min_batch, opt_batch, max_batch)
        trt = tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise ExportError("building a TensorRT engine needs a CUDA GPU")
        if missing := missing_packages(["onnx"]):
            raise ExportError(missing)
        graph = read_export(onnx_path)
        if max_batch > graph.max_batch:
            raise ExportError(f"--max-batch {max_batch} is above the graph's maximum {graph.max_batch}")
        check_writable(out, f"--out {out}")  # before the build (minutes), not after it
        gpu = gpu_key()
        key = engine_key(graph, config, trt.__version__, gpu)
    except ExportError as e:
        raise _fail(e) from None

    def build():
        try:
            timing = out / timing_cache_name(trt.__version__, gpu)
            path = build_engine(graph, out / f"denoiser-{key}.engine", config, timing)
        except ExportError as e:
            raise _fail(e) from None
        click.echo(f"wrote {path}")
        remember_engine(path, graph, config, key)  # fastdiff sample --engine trt then finds it

    _once("building the engine", build)
