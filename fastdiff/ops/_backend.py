"""Which implementation an op runs on a given tensor.

Triton kernels run on CUDA tensors. On CPU tensors each op takes PyTorch's fastest exact path;
``FASTDIFF_OPS=triton`` together with ``TRITON_INTERPRET=1`` runs the kernels there instead, in
Triton's interpreter (how CI proves the kernels: slow, so only where asked for), and
``FASTDIFF_OPS=reference`` turns every fast path off (the models' too, and the CPU's default
engine is ``eager``; an engine asked for by name still runs): on the CPU in fp32 with the eager
engine, guided-diffusion's arithmetic to the bit. The decision is per call, so one process can
mix devices.
"""

from __future__ import annotations

import functools
import importlib.util
import operator
import os
import sys
import warnings

import torch
from torch._C._functorch import TransformType
from torch.autograd import forward_ad

from fastdiff.choices import OPS_MODES


def constant_result(fn):
    """``torch.compiler.assume_constant_result`` without its import of torch._dynamo (with sympy
    and torch.distributed's FSDP, ~1 s: the most of ``fastdiff sample``'s start on the CPU, where
    nothing compiles). Dynamo reads the same mark when it traces; a test pins it to torch's."""
    fn._dynamo_marked_constant = True
    return fn


def _triton_problem() -> str | None:
    """Why triton cannot run the kernels here, or None. Imported, not just looked up, so a present
    but broken triton (a missing shared library, a partial install) falls back like an absent
    one instead of raising from inside the first op."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton.language  # noqa: F401
    except Exception as e:  # whatever a broken install raises, the kernels cannot run
        # hidden from torch as well: torch's dynamo, once imported, takes a triton
        # that imports at all for a whole one and read triton.language from it (an AttributeError
        # from `import fastdiff.ops` on a triton without it, a leftover folder, say)
        for name in [n for n in sys.modules if n == "triton" or n.startswith("triton.")]:
            del sys.modules[name]
        sys.modules["triton"] = None  # what `import triton` then raises ImportError for
        return f"triton does not import ({type(e).__name__}: {e})"
    return None


def _incomplete_triton() -> bool:
    """A triton folder without ``triton/language`` (a leftover of an uninstall), found without
    importing anything: torch's dynamo takes a triton that imports at all for a whole one, so
    this one is imported (and hidden, failing) when fastdiff.ops is, before any torch.compile."""
    spec = importlib.util.find_spec("triton")
    places = (spec.submodule_search_locations or []) if spec is not None else []
    return spec is not None and not any(os.path.isdir(os.path.join(p, "language")) for p in places)


_UNCHECKED = "unchecked"
# Found once, at the first op that asks for a kernel: importing triton takes 0.2 s of every
# process start, and the CPU's paths never launch a kernel. A broken triton that raises an
# ImportError is one torch tells apart by itself.
_TRITON_PROBLEM: str | None = _triton_problem() if _incomplete_triton() else _UNCHECKED

# The dtypes every op's kernels are built for; fp64 runs them only in the interpreter.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    """True when triton imports (not necessarily usable on every device)."""
    return triton_problem() is None


@constant_result
def triton_problem() -> str | None:
    """Why triton is unavailable ("triton is not installed", "triton does not import (...)").
    A constant while torch.compile traces (dynamo traces the calls that read it)."""
    global _TRITON_PROBLEM
    if _TRITON_PROBLEM == _UNCHECKED:
        _TRITON_PROBLEM = _triton_problem()
    return _TRITON_PROBLEM


def env_flag(name: str) -> bool:
    """An on/off environment switch: on when set to anything but "" or "0"."""
    return os.environ.get(name, "0") not in ("", "0")


def triton_interpret() -> bool:
    return env_flag("TRITON_INTERPRET")


def poison_outputs() -> bool:
    """``FASTDIFF_OPS_POISON=1``: kernel outputs start as NaN, so tests catch unwritten elements."""
    return env_flag("FASTDIFF_OPS_POISON")


def new_output(shape_or_like, **kwargs):
    """An output buffer for a kernel to fill (``torch.empty`` / ``empty_like`` arguments), NaN
    first under :func:`poison_outputs`."""
    if isinstance(shape_or_like, torch.Tensor):
        t = torch.empty_like(shape_or_like, **kwargs)
    else:
        t = torch.empty(shape_or_like, **kwargs)
    return t.fill_(float("nan")) if poison_outputs() and t.is_floating_point() else t


class OpInputError(ValueError, RuntimeError):
    """A bad argument to an op, said once before any kernel runs. Also a RuntimeError: that is
    what the torch layer a module stands in for raises for the same mistake, so drop-in code that
    catches either still does."""


class OpTypeError(OpInputError, TypeError):
    """An op argument of the wrong kind (a numpy array or list where a tensor goes, a float or str
    count): also the TypeError torch's functions raise for it, instead of an AttributeError from
    the op's first look at the argument."""


def check_tensor(op: str, name: str, value, *, optional: bool = False) -> None:
    """One :class:`OpTypeError` naming ``name`` unless ``value`` is a tensor (or None, if optional)."""
    if not (isinstance(value, torch.Tensor) or (optional and value is None)):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise OpTypeError(f"{op}: {name} must be {kind}, got {type(value).__name__}")


def check_count(op: str, name: str, value) -> int:
    """``value`` as a Python int (an int, a numpy integer, a one-element integer tensor), or one
    :class:`OpTypeError` naming ``name``: a float count fails deep inside torch's reshapes."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise OpTypeError(f"{op}: {name} must be an int, got {value!r}")


def ops_mode() -> str:
    """``FASTDIFF_OPS``: auto (default), reference (debugging, A/B checks) or triton."""
    mode = os.environ.get("FASTDIFF_OPS", "").lower() or "auto"
    if mode not in OPS_MODES:
        raise ValueError(f"FASTDIFF_OPS must be one of {', '.join(OPS_MODES)}, got {mode!r}")
    return mode


def force_reference() -> bool:
    return ops_mode() == "reference"


@constant_result
def in_func_transform() -> bool:
    """Inside ``torch.func.grad`` / ``vmap`` (the compile engine takes the classifier's gradient
    with ``torch.func.grad``, which traces into one graph): a custom op's registered autograd is
    invisible there (pytorch/pytorch#168393), so each op takes its plain PyTorch path instead.

    Evaluated as a constant while torch.compile traces: dynamo wraps the interpreter stack in an
    object that is never None, which sent the whole compiled step (the UNet too) to the plain
    paths; dynamo enters ``torch.func.grad``'s level for real while tracing, so the value holds."""
    return torch._C._functorch.peek_interpreter_stack() is not None


@constant_result
def nested_func_grad() -> bool:
    """Inside two ``torch.func.grad`` (or ``vjp``) levels, a second derivative (a gradient
    penalty written with torch.func): SDPA's fused backward has no derivative of its own, so
    attention takes its reference there. A constant while torch.compile traces."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    grads = [i for i in retrieve_all_functorch_interpreters() if i.key() == TransformType.Grad]
    return len(grads) > 1


@constant_result
def autocast_available(device_type: str) -> bool:
    """``torch.amp.is_autocast_available``, a constant while torch.compile traces: the dynamo of
    torch 2.11 cannot trace it, and the compile engine's whole-step graph would break there."""
    return torch.amp.is_autocast_available(device_type)


def forward_ad_active() -> bool:
    """Inside forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad.dual_level``): a
    custom op has no forward derivative, so its output would carry no tangent, silently (nor do
    SDPA's fused CPU kernels have one); each op takes its reference path instead."""
    return forward_ad._current_level >= 0


@constant_result
def onnx_exporting() -> bool:
    """Inside ``torch.onnx.export``: ONNX has no translation for a custom op (the export failed on
    "unrecognized namespace fastdiff"), so each op takes its plain PyTorch path there. A constant
    while dynamo traces (the dynamo exporter traces through torch.export)."""
    return "torch.onnx" in sys.modules and torch.onnx.is_in_onnx_export()


def traced() -> bool:
    """Inside a trace that records ops into a graph: torch.compile or torch.export (dynamo),
    ``torch.jit.trace``, ``torch.onnx.export``, or ``make_fx`` (fastdiff's own ONNX export traces
    with it): a layout chosen for eager speed there would only add nodes to the graph. make_fx is
    looked up only where its module is loaded, since importing it imports sympy (0.3 s)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or onnx_exporting():
        return True
    proxy = sys.modules.get("torch.fx.experimental.proxy_tensor")
    return proxy is not None and proxy.get_proxy_mode() is not None


def wants_triton(t: torch.Tensor) -> bool:
    """Whether ``FASTDIFF_OPS`` and ``t``'s device ask for the Triton kernel, triton usable or not."""
    mode = ops_mode()
    if mode == "reference":
        return False
    return t.is_cuda or (t.device.type == "cpu" and mode == "triton" and triton_interpret())


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernel should handle tensor ``t`` (triton is imported only where a
    kernel is asked for)."""
    return wants_triton(t) and triton_available() and not onnx_exporting()


def triton_missing(t: torch.Tensor) -> str | None:
    """Why the kernel asked for on ``t`` cannot run (for :func:`notice_fallback`), or None."""
    return triton_problem() if wants_triton(t) else None


@functools.cache
def notice_fallback(op: str, reason: str, instead: str = "the PyTorch reference") -> None:
    """One line, once per (op, reason): a PyTorch path is running instead of a kernel."""
    warnings.warn(f"fastdiff.ops.{op}: {reason}; using {instead}", stacklevel=3)
