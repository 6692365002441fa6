"""``fastdiff gd-run SCRIPT [ARGS...]``: run a guided-diffusion script, unedited, on fastdiff.

The script's ``guided_diffusion`` imports get fastdiff's compat modules (this process only:
``fastdiff.compat.package``), so the sampling scripts (image_sample.py, classifier_sample.py,
super_res_sample.py) run on checkpoints the original saved and write their npz to OPENAI_LOGDIR,
and the training and likelihood scripts (image_train.py, classifier_train.py,
super_res_train.py, image_nll.py) write the original's checkpoints and logs there. No MPI: one
process is a one-process group; under torchrun (``torchrun --nproc_per_node N -m
fastdiff.cli.gd_run SCRIPT ...``) each process is one rank, and an ``onnx``/``trt`` engine is
exported (built) once for the job by rank 0, the other ranks loading it. fastdiff's own input
errors raised inside the script (bad data folder, unknown schedule sampler, missing or unreadable
checkpoint, impossible respacing, an engine that cannot run the script's loop: onnx and trt
export fastdiff's guidance, not a script's own cond_fn) end it with one line, as does a sampling
loop that produced NaN/Inf (where the original writes garbage images, compat's loops raise, as
``fastdiff sample`` reports it); anything else keeps its traceback.
"""

from __future__ import annotations

import os
import runpy
import sys
import zipfile
from pathlib import Path

import click

from fastdiff.choices import ENGINE_NAMES, OPS_MODES
from fastdiff.cli.paths import UserPath

_ENGINE_HELP = (
    f"fastdiff engine of the script's sampling loops ({' | '.join([*ENGINE_NAMES, 'auto'])}; auto: the "
    "device's default); default: $FASTDIFF_GD_ENGINE, else eager."
)


def _check(engine: str | None) -> None:
    """The choices, checked before the script starts (one-line errors)."""
    import torch

    from fastdiff.engines import EngineError, check_engine
    from fastdiff.runs.device import check_ops_mode

    try:
        check_ops_mode()  # FASTDIFF_OPS, set from --ops by now
        if engine is not None and engine != "auto":
            check_engine(engine, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    except (EngineError, ValueError) as e:
        raise click.ClickException(str(e)) from None


def _check_script(path: str) -> None:
    """SCRIPT is Python source, or a zip with a __main__.py as ``python SCRIPT`` runs one: another
    file (an npz, an image, text) is one line, not runpy's ImportError or SyntaxError traceback."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if "__main__.py" in z.namelist():
                return
        raise click.ClickException(f"{path} is a zip file without a __main__.py, not a Python script")
    try:
        source = Path(path).read_bytes()
    except OSError as e:
        raise click.ClickException(f"cannot read {path}: {e.strerror or e}") from None
    try:
        compile(source, path, "exec")
    except (SyntaxError, ValueError) as e:  # ValueError: null bytes
        raise click.ClickException(f"{path} is not a Python script: {e}") from None


@click.command(
    "gd-run",
    context_settings={
        "ignore_unknown_options": True,
        "allow_interspersed_args": False,
        "help_option_names": ["-h", "--help"],
    },
)
@click.option("--engine", default=None, help=_ENGINE_HELP)
@click.option(
    "--ops",
    type=click.Choice(OPS_MODES, case_sensitive=False),
    default=None,
    help="Kernels (sets FASTDIFF_OPS for the script).",
)
@click.argument("script", type=UserPath(exists=True, dir_okay=False))
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def gd_run_command(engine, ops, script, script_args):
    """Run a guided-diffusion SCRIPT with its own ARGS on fastdiff, unedited.

    Options go before SCRIPT; everything after it is the script's (its own --help included).

    Example ($MODEL_FLAGS: the model's flags as guided-diffusion's README gives them):

    \b
      OPENAI_LOGDIR=out fastdiff gd-run --engine auto scripts/classifier_sample.py \\
          $MODEL_FLAGS --model_path 64x64_diffusion.pt \\
          --classifier_path 64x64_classifier.pt --classifier_scale 1.0
    """
    from fastdiff.compat.guided_diffusion import ENGINE_ENV

    _check_script(script)
    if ops is not None:
        os.environ["FASTDIFF_OPS"] = ops
    engine = engine or os.environ.get(ENGINE_ENV) or None
    _check(engine)
    if engine is not None:
        os.environ[ENGINE_ENV] = engine

    from fastdiff.compat.package import install

    install()
    path = os.path.abspath(script)
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(path))  # as `python SCRIPT` does
    from fastdiff.diffusion import SamplingError
    from fastdiff.engines import EngineError
    from fastdiff.models.checkpoint import CheckpointError
    from fastdiff.runs import RunError
    from fastdiff.training import ConfigError, DataError, TrainingError

    user_errors = (
        ConfigError,
        DataError,
        TrainingError,
        CheckpointError,
        SamplingError,
        EngineError,
        RunError,
    )
    try:
        runpy.run_path(path, run_name="__main__")
    except user_errors as e:
        raise click.ClickException(str(e)) from None
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":  # torchrun's form; through the group: one-line errors, exits 130 and 143
    from fastdiff.cli.main import main

    main(["gd-run", *sys.argv[1:]], prog_name="fastdiff")
