"""Networks and processes for tests, from guided-diffusion flags (the form the reference cases
and most tests describe models in) or DiffusionConfig keywords; the CLI run in this process and
its one-line errors; the ops tests' accuracy and torch.func checks; a relative error against
reference outputs; signals and kills at a chosen moment of a run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from click.testing import CliRunner

from fastdiff.cli.main import main
from fastdiff.diffusion import DiffusionConfig, GaussianDiffusion
from fastdiff.models import build_network, configs_from_flags


def build_unet(**flags):
    return build_network(configs_from_flags("diffusion", flags)[0])


def build_classifier(**flags):
    return build_network(configs_from_flags("classifier", flags)[0])


def build_superres(**flags):
    return build_network(configs_from_flags("superres", flags)[0])


def make_diffusion(timestep_respacing="", **config) -> GaussianDiffusion:
    """A process from DiffusionConfig keywords and a respacing."""
    return GaussianDiffusion.from_config(DiffusionConfig(**config), timestep_respacing)


def diffusion_from_flags(flags: dict, timestep_respacing=None) -> GaussianDiffusion:
    """The process of a flag dict (a network's flags may be among them), respaced by
    ``timestep_respacing`` or the flags' own."""
    flags = dict(flags)
    respacing = flags.pop("timestep_respacing", "")
    kind = "superres" if "large_size" in flags else "diffusion"
    process = configs_from_flags(kind, flags)[1]
    if timestep_respacing is not None:
        respacing = timestep_respacing
    return GaussianDiffusion.from_config(process, respacing)


def cli(*args):
    """`fastdiff ARGS --device cpu` in this process, each argument as its string."""
    return CliRunner().invoke(main, [*map(str, args), "--device", "cpu"])


def one_line_error(result, *words, status: int = 1):
    """A CLI result that is a user error: exit ``status`` (2 for click's usage errors), no
    traceback, and one line "Error: ..." that names each of ``words``."""
    assert result.exit_code == status, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    for w in words:
        assert w in result.output, (w, result.output)


def func_grad_and_autograd(loss, x):
    """(autograd's gradient of ``loss`` at ``x``, [torch.func.grad's eager, and compiled with
    fullgraph]): an op must give the same gradient through torch.func (the compile engine's
    classifier gradient) as through autograd."""
    xg = x.clone().requires_grad_()
    want = torch.autograd.grad(loss(xg), xg)[0]
    compiled = torch.compile(
        lambda t: torch.func.grad(loss)(t), backend="eager", fullgraph=True, dynamic=False
    )
    return want, [torch.func.grad(loss)(x), compiled(x)]


def compiled_call_targets(fn, *args):
    """(``fn(*args)`` compiled with fullgraph, the names of the functions its graph calls): which
    path an op takes while torch.compile traces it (a custom op's name starts with "fastdiff.")."""
    targets = []

    def record(gm, _inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    return torch.compile(fn, backend=record, fullgraph=True, dynamic=False)(*args), targets


def assert_close_to_reference(out, ref64, ref_lp, factor: float, floor_ulps: float, what: str = ""):
    """A kernel's result against the float64 reference, within a few times the low-precision
    reference's own error on the same inputs, and never below a floor of ulps at the result's scale:
    |out - ref64| <= max(factor * |ref_lp - ref64|, floor_ulps * eps(dtype) * max(1, |ref64|)).
    The floor is the rounding the kernel pays whatever the reference's luck (its max error on one
    input varies several-fold from seed to seed)."""
    assert out.shape == ref64.shape, what
    assert torch.isfinite(out).all(), f"{what}: non-finite (unwritten?) elements"
    scale = max(1.0, ref64.abs().max().item())
    tol = max(
        factor * (ref_lp.double() - ref64).abs().max().item(),
        floor_ulps * torch.finfo(ref_lp.dtype).eps * scale,
    )
    err = (out.double() - ref64).abs().max().item()
    assert err <= tol, f"{what}: max err {err:.3g} > tol {tol:.3g}"


def assert_close_in(tolerances: dict, actual, ref64, ref_lp, dtype, what: str = ""):
    """assert_close_to_reference with the ``(factor, floor_ulps)`` an op's tests give ``dtype``,
    after checking that the result is in ``dtype``."""
    assert actual.dtype == dtype, what
    factor, floor_ulps = tolerances[dtype]
    assert_close_to_reference(actual, ref64, ref_lp, factor, floor_ulps, what)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| over the largest |b| (in float64, so low-precision outputs compare too; a
    zero ``b`` does not divide by zero)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def signal_during_step(trainer, step: int, signum: int = signal.SIGINT) -> None:
    """Send ``signum`` (Ctrl-C's by default) to this process as ``trainer`` starts step ``step``
    (1-based)."""
    run_step = trainer.run_step

    def signalled(x, y):
        if trainer.step + 1 == step:
            os.kill(os.getpid(), signum)
        return run_step(x, y)

    trainer.run_step = signalled


def kill_when(proc: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    """SIGKILL ``proc`` (stderr piped) as soon as ``path`` exists: a run killed mid-way, nothing of
    it cleaned up; its stderr is the failure if it ends first."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
