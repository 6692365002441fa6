"""CI: compile every Triton kernel at the launch configurations ADM uses, for sm_80 and sm_90, on the CPU.

A kernel that spills registers or wants more shared memory than the GPU has shows up only on that
GPU, so this compiles each variant ahead of time with the ptxas inside triton's wheel (no CUDA, no
GPU) and fails on a compile error, a spill or too much shared memory.

Shapes: a meta-device forward of every preset (fastdiff.ops.patch'd, so the fused ops run where the
models run them), and a few attention shapes of users' own architectures (``USER_ATTENTION``), at
batch 1, 8 and 64, in fp16/bf16/fp32, NCHW and channels_last. Launch
configurations: the real launchers, run on meta tensors with ``JITFunction.run`` recording instead
of launching, so the check cannot drift from their choices; for attention, once per tile candidate
its autotuning may pick.

Attention compiles every distinct specialization. GroupNorm has about 1800 (flags x tile shapes x
dtypes x layouts x archs), too many to compile each run; its tiles keep about the same elements per
thread, so by default one variant per (kernel, flags, vector width, dtype, layout, arch) is compiled,
the one with the most elements per thread and the widest channel tile; ``--all`` compiles them all
(run it when the GroupNorm kernels or their tiles change). Triton's cache keeps compiled variants, so
reruns only compile what changed. CI runs it three times: with the venv's triton, with triton 3.6,
the GPU image's, and with 3.8, torch 2.14's, on the attention kernels (``--only attn``; its
spills were all there) (``PYTHONPATH`` to a ``pip install --target`` of each), whose ptxas spilled
on tiles that 3.9's did not (3.6's on four, 3.8's on five attention backward variants; all retuned).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

# the interpreter would turn the kernels into InterpretedFunctions, which do not compile
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's current default, said out loud

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARCHS = {80: (108, 163 * 1024), 90: (132, 227 * 1024)}  # SMs (A100, H100) and shared memory per block
BATCHES = (1, 8, 64)
# attention shapes users' own architectures reach and no preset does (fastdiff.ops is also a library):
# the worst of a sweep over head dims 8..256 x T 1..1025, T or d not a multiple of 16, which take
# smaller tiles (triton_kernel._UNALIGNED). Wider heads and T = 1 run SDPA (function.py).
USER_ATTENTION = {
    ("attn", (3 * 96, 36), 1, "new"): {"user: d=96 at 6x6"},
    ("attn", (3 * 192, 65), 1, "new"): {"user: d=192 at 8x8+1"},
    ("attn", (3 * 2 * 24, 65), 2, "legacy"): {"user: d=24 at 8x8+1"},
    ("attn", (3 * 40, 65), 1, "new"): {"user: d=40 at 8x8+1"},
    ("attn", (3 * 80, 9), 1, "new"): {"user: d=80 at 3x3"},
    ("attn", (3 * 32, 36), 1, "new"): {"user: d=32 at 6x6"},
}


def _dtypes():
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def adm_calls() -> dict[tuple, set[str]]:
    """{call: presets} for each distinct GroupNorm / attention call of a meta forward of every preset:
    ("gn", per-sample shape, groups, activation, scale-shift?) or ("attn", (3*H*d, T), heads, order)."""
    import torch

    from fastdiff.models.presets import PRESETS, build_preset
    from fastdiff.ops.ada_group_norm.module import GroupNorm
    from fastdiff.ops.attention.module import QKVAttention, QKVAttentionLegacy
    from fastdiff.ops.patch import patch

    calls: dict[tuple, set[str]] = {}
    for name, preset in PRESETS.items():
        model = patch(build_preset(name, device="meta"))
        seen: set[tuple] = set()

        def gn_hook(m, args, seen=seen):
            assert m.affine, "the check builds affine GroupNorm calls only"
            seen.add(("gn", tuple(args[0].shape[1:]), m.num_groups, m.activation, len(args) > 1))

        def attn_hook(m, args, seen=seen):
            seen.add(("attn", tuple(args[0].shape[1:]), m.n_heads, m.order))

        for m in model.modules():
            if isinstance(m, GroupNorm):
                m.register_forward_pre_hook(gn_hook)
            elif isinstance(m, (QKVAttention, QKVAttentionLegacy)):
                m.register_forward_pre_hook(attn_hook)
        net = preset.net
        size, chans = net.image_size, net.in_channels
        meta = dict(device="meta")
        kwargs = {}
        if preset.kind == "superres":
            kwargs["low_res"] = torch.empty(1, chans, net.small_size, net.small_size, **meta)
        if preset.kind != "classifier" and net.num_classes is not None:
            kwargs["y"] = torch.zeros(1, dtype=torch.long, **meta)
        with torch.no_grad():
            model(torch.empty(1, chans, size, size, **meta), torch.zeros(1, **meta), **kwargs)
        for call in seen:
            calls.setdefault(call, set()).add(name)
    return calls


@contextlib.contextmanager
def recording(launches: list):
    """Kernel launches append (kernel, args, kwargs) to ``launches`` instead of running."""
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    with mock.patch.object(JITFunction, "run", run):
        yield


def _meta(shape, dtype, channels_last=False):
    """A meta tensor; channels_last puts the channel dim (1) innermost, for 3-d inputs too."""
    import torch

    if not channels_last:
        return torch.empty(shape, dtype=dtype, device="meta")
    inner = torch.empty([shape[0], *shape[2:], shape[1]], dtype=dtype, device="meta")
    return inner.permute(0, len(shape) - 1, *range(1, len(shape) - 1))


def gn_launches(call, batch, dtype, sms):
    """ada_group_norm's forward and backward launches for one call, NCHW and channels_last."""
    import torch

    from fastdiff.ops.ada_group_norm import triton_kernel as gn

    _, shape, groups, activation, scale_shift = call
    c = shape[0]
    out: list = []
    for channels_last in (False, True):
        x = _meta((batch, *shape), dtype, channels_last)
        w = b = torch.empty(c, device="meta")  # ADM keeps norm parameters in fp32
        sc = sh = None
        if scale_shift:  # ADM's emb_out.chunk(2, 1) of an [N, 2C] projection, as [N, C] views
            emb = torch.empty(batch, 2 * c, dtype=dtype, device="meta")
            sc, sh = emb[:, :c], emb[:, c:]
        with mock.patch.object(gn, "_sms", lambda _x: sms), recording(out):
            _, mean, rstd = gn.forward(x, groups, w, b, sc, sh, 1e-5, activation)
            for param_grads in (True, False):  # training; a gradient by x alone (guidance)
                args = (torch.empty_like(x), x, groups, w, b, sc, sh, mean, rstd, activation)
                gn.backward(*args, param_grads=param_grads)
    return out


def attn_launches(call, batch, dtype):
    """attention's forward and backward launches for one call, once per tile candidate that
    autotuning may pick (the default first)."""
    import torch

    from fastdiff.ops.attention import triton_kernel as attn

    _, (width, length), heads, order = call
    out: list = []
    qkv = torch.empty(batch, width, length, dtype=dtype, device="meta")
    head_dim = width // (3 * heads)
    count = max(len(attn.candidates(k, head_dim, length, dtype)) for k in ("fwd", "dkdv", "dq"))
    for i in range(count):

        def tiles(kernel, x, d, t, launch, i=i):
            options = attn.candidates(kernel, d, t, x.dtype)
            return options[min(i, len(options) - 1)]

        with mock.patch.object(attn, "_tiles", tiles), recording(out):
            o, lse = attn.forward(qkv, heads, order)
            attn.backward(torch.empty_like(o), qkv, o, lse, heads, order)
    return out


def describe(call, batch, dtype_name):
    if call[0] == "gn":
        _, shape, groups, act, ss = call
        kind = (act or "none") + ("+scale-shift" if ss else "")
        return f"GN {'x'.join(map(str, shape))}/{groups} {kind} b{batch} {dtype_name}"
    _, (width, length), heads, order = call
    return f"attn T={length} d={width // (3 * heads)} H={heads} {order} b{batch} {dtype_name}"


_GN_TILE = ("TC", "TS", "BLOCK_K")  # GroupNorm constexprs a class merges over


class Variant:
    """One (kernel, specialization, options, arch): what triton would compile for a launch."""

    def __init__(self, fn, arch, signature, constexprs, attrs, options):
        self.fn, self.arch = fn, arch
        self.signature, self.constexprs, self.attrs, self.options = signature, constexprs, attrs, options
        names = list(fn.signature.parameters)
        declared = {p.name for p in fn.params if p.is_constexpr}
        self.kernel = f"{fn.fn.__module__.split('.')[-2]}.{fn.__name__}"
        self.dtype = next(t for t in signature.values() if t.startswith("*"))[1:]
        self.consts = {names[k[0]]: v for k, v in constexprs.items() if names[k[0]] in declared}
        self.ones = ones = [names[k[0]] for k in constexprs if names[k[0]] not in declared]
        odd = [names[k[0]] for k, a in attrs.items() if signature[names[k[0]]] == "i32" and not a]
        self.label = " ".join(
            [self.dtype]
            + [f"{k}={v}" for k, v in self.consts.items() if k not in ("ACC", "UPCAST")]
            + [f"w{options.num_warps}", f"s{options.num_stages}"]
            + ([f"=1:{','.join(ones)}"] if ones else [])
            + ([f"%16!:{','.join(odd)}"] if odd else [])
        )
        self.uses: list[str] = []
        self.merged = 1

    def key(self):
        return (
            self.kernel,
            self.arch,
            repr(self.signature),
            repr(sorted(self.constexprs.items())),
            repr(sorted(self.attrs.items())),
            repr(self.options),
        )

    def gn_class(self):
        """GroupNorm variants that differ only in tile shape (and so warps and ints' alignment)."""
        flags = tuple((k, v) for k, v in self.consts.items() if k not in _GN_TILE)
        ones = tuple(n for n in self.ones if n != "Cg")
        return (self.kernel, self.arch, repr(self.signature), flags, ones, self.options.num_stages)

    def per_thread(self):
        return (self.consts["TC"] * self.consts["TS"] // (32 * self.options.num_warps), self.consts["TC"])

    def job(self):
        return (
            self.fn.fn.__module__,
            self.fn.__name__,
            self.arch,
            self.signature,
            self.constexprs,
            self.attrs,
            self.options.__dict__,
        )


_binders: dict = {}
_specialized: dict = {}


def specialize(fn, args, kwargs, arch) -> Variant:
    """What ``JITFunction.run`` computes before compiling, for a target instead of the current GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    if (fn, arch) not in _binders:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        _binders[fn, arch] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = _binders[fn, arch]
    kwargs = dict(kwargs, debug=kwargs.get("debug", fn.debug) or False)
    bound, spec, options = binder(*args, **kwargs)
    key = (fn, arch, repr(spec), repr(sorted(options.items())))  # what triton's own kernel cache keys on
    if key not in _specialized:
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
        _specialized[key] = Variant(fn, arch, signature, constexprs, attrs, options)
    return _specialized[key]


def resources(cubin: bytes) -> tuple[int, int]:
    """(registers, local bytes per thread) of a cubin, from cuobjdump in triton's wheel. Triton
    kernels keep no local arrays, so local memory is register spill (triton's ``n_spills`` is it / 4)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], check=True, capture_output=True, text=True
        ).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    return int(fields["REG"]), int(fields["LOCAL"]) + int(fields["STACK"])


def compile_variant(job):
    """Variant.job() -> (registers, spill bytes, shared bytes, tensor-core instruction, error or None);
    plain data in and out, so it runs in worker processes. The instruction is "wgmma" (Hopper's
    warpgroup MMA), "mma" (mma.sync, Ampere's, which sm_90 falls back to for small tiles) or "-"."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name, arch, signature, constexprs, attrs, options = job
    try:
        fn = getattr(importlib.import_module(module), name)
        src = ASTSource(fn, signature, constexprs, attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        regs, spill = resources(kernel.asm["cubin"])
        ptx = kernel.asm["ptx"]
        mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "-"
        return regs, spill, kernel.metadata.shared, mma, None
    except Exception as e:  # a failed compile is a result to report, not a crash
        lines = str(e).strip().splitlines()
        return 0, 0, 0, "-", f"{type(e).__name__}: {lines[0] if lines else ''}"


def collect(calls, only):
    """{key: Variant} over every call x batch x dtype x arch, uses recorded."""
    variants: dict[tuple, Variant] = {}
    for call, presets in sorted(calls.items(), key=str):
        if only and call[0] != only:
            continue
        for batch in BATCHES:
            for dname, dtype in _dtypes().items():
                use = f"{describe(call, batch, dname)} ({','.join(sorted(presets))})"
                for arch, (sms, _) in ARCHS.items():
                    if call[0] == "gn":
                        launches = gn_launches(call, batch, dtype, sms)
                    else:
                        launches = attn_launches(call, batch, dtype)
                    for fn, args, kwargs in launches:
                        v = specialize(fn, args, kwargs, arch)
                        v = variants.setdefault(v.key(), v)
                        if use not in v.uses:
                            v.uses.append(use)
    return variants


def select(variants, everything):
    """The variants to compile: all of attention's; one per GroupNorm class unless ``everything``."""
    picked: dict[tuple, Variant] = {}
    for key, v in variants.items():
        if everything or v.kernel.startswith("attention."):
            picked[key] = v
            continue
        cls = v.gn_class()
        best = picked.get(cls)
        if best is None or v.per_thread() > best.per_thread():
            if best is not None:
                v.merged += best.merged
                v.uses = best.uses + v.uses
            picked[cls] = v
        else:
            best.merged += 1
            best.uses += v.uses
    return sorted(picked.values(), key=lambda v: (v.kernel, v.label, v.arch))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    ap.add_argument("--all", action="store_true", help="every GroupNorm tile variant too (slow)")
    ap.add_argument("--only", choices=("gn", "attn"), help="one op's kernels")
    ap.add_argument("--uses", action="store_true", help="list every call that launches each variant")
    opts = ap.parse_args()
    if importlib.util.find_spec("triton") is None:
        print("check_triton_compile: triton is not installed; skipping (nothing to compile)")
        return 0
    t0 = time.time()
    preset_calls = adm_calls()
    calls = preset_calls | USER_ATTENTION
    variants = collect(calls, opts.only)
    todo = select(variants, opts.all)
    t1 = time.time()
    presets = set().union(*preset_calls.values())
    import triton

    print(
        f"triton {triton.__version__}: "
        f"{len(preset_calls)} GroupNorm/attention calls in {len(presets)} presets and"
        f" {len(USER_ATTENTION)} users' attention shapes x batch {BATCHES} x fp16/bf16/fp32"
        f" x sm_80/sm_90: {len(variants)} kernel variants, {len(todo)} to compile ({t1 - t0:.0f}s)"
    )
    jobs = [v.job() for v in todo]
    if opts.jobs > 1:
        with ProcessPoolExecutor(opts.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(compile_variant, jobs))
    else:
        results = [compile_variant(job) for job in jobs]
    rows, bad = [], 0
    for v, (regs, spill, shared, mma, err) in zip(todo, results):
        limit = ARCHS[v.arch][1]
        problems = [err] if err else []
        if spill and not err:
            problems.append(f"spills {spill} B")
        if shared > limit and not err:
            problems.append(f"shared {shared / 1024:.1f} KB > {limit // 1024} KB")
        bad += bool(problems)
        fits = "yes" if not problems else "NO: " + "; ".join(problems)
        rows.append(
            (v.kernel, v.label, f"sm_{v.arch}", str(regs), str(spill), f"{shared / 1024:.1f}", mma, fits, v)
        )
    head = ("kernel", "variant", "arch", "regs", "spill B", "smem KB", "mma", "fits")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths)) + "  {}"
    print(fmt.format(*head))
    for r in rows:
        print(fmt.format(*r[:8]))
        v = r[8]
        merged = f" [{v.merged} tile variants, this one the largest per thread]" if v.merged > 1 else ""
        if opts.uses or not r[7].startswith("yes"):
            print("\n".join(f"      used by {u}" for u in v.uses) + merged)
        else:
            more = f" (+{len(v.uses) - 1} more)" if len(v.uses) > 1 else ""
            print(f"      e.g. {v.uses[0]}{more}{merged}")
    hopper = [r for r in rows if r[2] == "sm_90" and r[6] != "-"]
    wgmma = sum(r[6] == "wgmma" for r in hopper)
    print(f"sm_90 variants with tensor-core dots: {wgmma} of {len(hopper)} on wgmma, the rest on mma.sync")
    print(
        f"{len(rows)} compiled in {time.time() - t1:.0f}s, max {max(int(r[3]) for r in rows)} registers:"
        f" {bad} failing" + ("" if bad else "; everything compiles, fits and does not spill")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
