"""Entry point of the ``fastdiff`` console script: one click group, one module per command.

The library reports what the user got wrong as a RunError (fastdiff.runs); the group prints it as
one line with a non-zero exit (2 for a value out of its option's range, else 1: cli/errors.py),
and a subcommand's usage error (a bad option or value) as one line too, exit 2 as click gives it,
instead of click's usage block. A path too long for the file
system, which only the user's paths can make, is one line wherever it is first met. Ctrl-C
exits with 130, as a shell reports SIGINT, and SIGTERM (a scheduler's stop, SLURM's before its
SIGKILL) with 143, both after the same clean-up. Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import gc
import os
import signal
import sys
import threading

import click

from fastdiff import __version__
from fastdiff.cli.errors import user_error
from fastdiff.runs.errors import RunError


class Terminated(KeyboardInterrupt):
    """SIGTERM raised as Ctrl-C is, so a run stopped by a scheduler unwinds the same way (temporary
    files removed, progress bars closed, the lock let go) instead of dying mid-write."""


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM stops the clean-up too
    raise Terminated


def _leave_objects_at_exit() -> None:
    """Hand what is left to the OS at exit instead of collecting it: the interpreter's last
    collections walk every object torch's import made (~170,000), 0.2-0.4 s of the default
    ``fastdiff sample``'s 10 s (5% of its CPU time on a loaded machine), for nothing, as the
    commands close their files and process groups themselves. Registered by each command but
    gd-run, whose script may leave a finalizer (an unclosed file in a reference cycle) to it;
    not where triton was imported (a GPU run), whose nanobind bindings list on stderr each of
    their objects left uncollected."""
    if "triton" not in sys.modules:
        gc.freeze()


def _keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for the next allocations: by default each guided
    step's tensors went back to the OS (heap trimming, and mmap for blocks over a threshold it
    raises as it goes) and were faulted in again, ~90,000 page faults and 0.2 s of system time in
    the default ``fastdiff sample`` (2% of its CPU time). No trimming below 1 GB and blocks under
    32 MB (glibc's largest threshold) from the heap instead; a user's own MALLOC_ or
    GLIBC_TUNABLES settings win, and other C libraries keep their ways."""
    if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), no such name (macOS), musl's EINVAL
        return
    if not glibc:
        return
    mallopt = ctypes.CDLL(None).mallopt
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (setting either ends glibc's own tuning of both)
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


def import_torch() -> None:
    """A sampling command's first import of torch, with the collector paused and what it made
    frozen (not walked again, nor at exit): the collections during the import walked the growing
    heap of torch's objects three times, 0.16 s of the default ``fastdiff sample``'s 7.2 s. Where
    torch is imported already (a test, a caller's process) nothing changes."""
    if "torch" in sys.modules:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        if enabled:
            gc.enable()
    if "triton" not in sys.modules:  # see _leave_objects_at_exit
        gc.freeze()


class LazyGroup(click.Group):
    """Imports a subcommand's module only when it runs (or for its --help), keeping startup fast:
    the group's own --help lists the commands from this table, importing none of them (torch)."""

    commands_by_name = {
        "sample": ("fastdiff.cli.sample", "sample_command"),
        "presets": ("fastdiff.cli.presets", "presets_command"),
        "train": ("fastdiff.cli.train", "train"),
        "train-classifier": ("fastdiff.cli.train", "train_classifier"),
        "evaluate": ("fastdiff.cli.evaluate", "evaluate_command"),
        "export": ("fastdiff.cli.export", "export_command"),
        "nearest": ("fastdiff.cli.nearest", "nearest_command"),
        "gd-run": ("fastdiff.cli.gd_run", "gd_run_command"),
        "upsample": ("fastdiff.cli.upsample", "upsample_command"),
        "invert": ("fastdiff.cli.invert", "invert_command"),
        "interpolate": ("fastdiff.cli.interpolate", "interpolate_command"),
    }
    summaries = {
        "sample": "Sample images with classifier or classifier-free guidance.",
        "presets": "List the model presets, or print one preset's flags as a guided-diffusion flag string.",
        "train": "Train an ADM diffusion model (AdamW, EMA; hybrid loss with --learn_sigma True in --flags).",
        "train-classifier": "Train ADM's noisy-image classifier (for classifier guidance).",
        "export": "Export the classifier-guided denoiser for inference runtimes (ONNX, TensorRT).",
        "evaluate": "Score samples against a reference batch: FID, sFID, Inception Score, precision, recall.",
        "nearest": "Memorisation check: each sample's nearest training images, flagged near-copies.",
        "gd-run": "Run a guided-diffusion SCRIPT with its own ARGS on fastdiff, unedited.",
        "upsample": "Super-resolve low-resolution samples with an ADM-U upsampler (64->256, 128->512).",
        "invert": "DDIM-invert IMAGES to latents x_T (reconstruction PSNR); --to-class edits their class.",
        "interpolate": "Sample the spherical interpolation between two latents as one strip PNG.",
    }

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, self.summaries[name]) for name in self.list_commands(ctx)])

    def list_commands(self, ctx):
        return sorted(self.commands_by_name)

    def invoke(self, ctx):
        # signal handlers belong to the main thread (a caller's thread keeps SIGTERM's default)
        main_thread = threading.current_thread() is threading.main_thread()
        # a SIGTERM the caller ignores (a wrapper that handles it itself) stays ignored, as the
        # training loop keeps it
        ours = main_thread and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
        previous = signal.signal(signal.SIGTERM, _terminate) if ours else None
        try:
            return super().invoke(ctx)
        except RunError as e:
            raise user_error(e) from None
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:
                raise
            # Python 3.11's Path.exists() and is_dir() raise it, so every command met it first in
            # a different check (of --out, --checkpoint, --json, --data ...)
            raise click.ClickException(
                f"path too long for the file system (a name or the whole path): {e.filename}"
            ) from None
        except click.exceptions.NoArgsIsHelpError:  # a bare group (fastdiff export): its help, as fastdiff's
            raise
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            one_line = click.ClickException(e.format_message() + hint)
            one_line.exit_code = e.exit_code
            raise one_line from None
        except KeyboardInterrupt as e:  # exit with the shell's status for the signal, not 1
            what = "terminated" if isinstance(e, Terminated) else "interrupted"
            command = self.get_command(ctx, ctx.invoked_subcommand or "")
            if command is not None and any(p.name == "resume" for p in command.params):
                click.echo(f"{what}: run the same command with --resume to continue", err=True)
            else:
                click.echo(what, err=True)
            raise click.exceptions.Exit(143 if isinstance(e, Terminated) else 130) from None
        finally:
            if previous is not None:  # None: a handler set outside Python, which cannot be put back
                signal.signal(signal.SIGTERM, previous)

    def get_command(self, ctx, name):
        if name not in self.commands_by_name:
            return None
        import importlib

        # numpy before any torch: torch's C start-up imports it and swallows whatever that raises,
        # so a Ctrl-C landing there was lost (the run went on, or died of a half-imported numpy)
        import numpy  # noqa: F401

        _keep_freed_memory()
        if name != "gd-run":
            atexit.unregister(_leave_objects_at_exit)  # once, whatever the calls in one process
            atexit.register(_leave_objects_at_exit)
        module, attr = self.commands_by_name[name]
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastdiff")
def main():
    """fastdiff: fast classifier-guided diffusion sampling (ADM / guided-diffusion compatible)."""


if __name__ == "__main__":  # `python -m fastdiff.cli.main` and `torchrun -m fastdiff.cli.main`
    main()
