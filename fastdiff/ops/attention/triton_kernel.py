"""Flash attention over ADM's qkv layout, read and written in place (the "kernel" layer).

ADM's attention block feeds a [B, 3*H*d, T] conv output straight into attention and wants
[B, H*d, T] back. Both head orders are plain channel offsets, so the kernels take q, k and v
through strides from the qkv tensor itself and write heads straight into [B, H*d, T]: no
permute/contiguous copies and no T x T matrix (online softmax, fp32 running max and sum).

Channel of element i of head h:   q          k                 v
    order "new"                   h*d + i    H*d + h*d + i     2*H*d + h*d + i
    order "legacy"                3*h*d + i  3*h*d + d + i     3*h*d + 2*d + i

Backward is FlashAttention-2's: delta = rowsum(dO * O), then one kernel per key block for
dK/dV (loop over query blocks) and one per query block for dQ (loop over key blocks), so no
atomics and deterministic gradients. Gradients land in a dqkv with qkv's layout.

Tiles: each kernel has a default per (fp32?, head dim) that compiles without spills on sm_80 and
sm_90, shrunk to T; inside ``fastdiff.ops.autotuning`` up to two alternatives (8 warps, half the
query rows per program; :func:`candidates`) are timed on the real launch and the fastest is kept
per (GPU, kernel, dtype, d, T) (``fastdiff/ops/_tuning.py``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastdiff.ops._backend import new_output, triton_interpret
from fastdiff.ops._tuning import Choices, fastest, gpu_name, measuring

_LOG2E = 1.4426950408889634


def _layout(num_heads: int, head_dim: int, order: str):
    """(head_step, k_offset, v_offset) in channels: head h's q starts at h*head_step."""
    if order == "legacy":
        return 3 * head_dim, head_dim, 2 * head_dim
    return head_dim, num_heads * head_dim, 2 * num_heads * head_dim


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by (kernel, fp32?, BLOCK_D); BLOCK_N is dkdv's key block
# and dq's loop step. Each fits sm_80 and sm_90 without spilling (.ci/check_triton_compile.py measures)
# with triton 3.9 (CI's), 3.6 (the GPU image's) and 3.8 (torch 2.14's): each ptxas spills on some
# tiles the others do not.
# fp32 at BLOCK_D 256 also needs its head-dim dots read in chunks (``_d_chunk``).
_CONFIGS = {
    ("fwd", False, 32): (128, 64, 4, 3),
    ("fwd", False, 64): (128, 64, 8, 3),
    ("fwd", False, 128): (128, 32, 8, 2),
    ("fwd", False, 256): (64, 32, 8, 2),
    ("fwd", True, 32): (64, 32, 4, 2),
    ("fwd", True, 64): (64, 16, 4, 2),
    ("fwd", True, 128): (16, 32, 4, 2),
    ("fwd", True, 256): (16, 32, 8, 2),
    ("dkdv", False, 32): (64, 64, 4, 2),
    ("dkdv", False, 64): (64, 64, 8, 2),
    ("dkdv", False, 128): (32, 64, 8, 2),
    ("dkdv", False, 256): (32, 32, 8, 1),
    ("dkdv", True, 32): (32, 64, 4, 2),
    ("dkdv", True, 64): (32, 32, 8, 2),
    ("dkdv", True, 128): (16, 16, 8, 1),
    ("dkdv", True, 256): (16, 16, 8, 1),
    ("dq", False, 32): (64, 64, 4, 2),
    ("dq", False, 64): (64, 64, 8, 2),
    ("dq", False, 128): (32, 64, 8, 2),
    ("dq", False, 256): (32, 32, 8, 1),
    ("dq", True, 32): (64, 32, 8, 2),
    ("dq", True, 64): (32, 32, 8, 2),
    ("dq", True, 128): (16, 16, 8, 1),
    ("dq", True, 256): (16, 32, 8, 2),
}
# T or d not a multiple of 16 (the classifier's attention pool, T = 8*8 + 1; 6x6 images, T = 36;
# d = 24) leaves rows unaligned: no async copies, loads go through registers, so smaller tiles there
_UNALIGNED = {
    ("dkdv", False, 64): (32, 32, 4, 2),
    ("dkdv", False, 128): (32, 32, 8, 2),
    ("dkdv", False, 256): (32, 16, 8, 1),
    ("dkdv", True, 32): (32, 16, 4, 2),
    ("fwd", False, 256): (32, 32, 8, 2),
    ("fwd", True, 128): (16, 32, 8, 2),
    ("dq", False, 64): (32, 32, 4, 2),
    ("dq", False, 128): (32, 32, 8, 2),
    ("dq", False, 256): (16, 16, 8, 1),
    ("dq", True, 32): (32, 16, 8, 1),  # 2 stages spilled 8 B on sm_90 at d = 32 with triton 3.6
    ("dq", True, 64): (32, 16, 4, 2),
}
# and d not a multiple of 16 there either (d = 40 at T = 65: the 64-channel unaligned fp32 dQ tile,
# tuned for d = 64, spills 56 B on sm_90 with triton 3.9's ptxas)
_UNALIGNED_HEADS = {
    ("dq", True, 64): (16, 16, 4, 2),
}
# d not a multiple of 16 at any T: the forward's 4-warp tiles spill 8 B on sm_80 at d = 40 in fp32
# (T = 17 with triton 3.9; T = 64, 256, 1024 with 3.9 and 3.6) and at d = 24 in 16 bits (T = 256,
# 1024 with 3.6), and the latter's half-rows alternative on sm_90 at d = 8, T = 17 (3.9); 8 warps
# spill on neither
_ODD_HEADS = {
    ("fwd", False, 32): (128, 64, 8, 3),
    ("fwd", True, 64): (64, 16, 8, 2),
}
# T up to 16 shrinks every tile to 16 rows, where these warp counts are the ones that do not spill
# (16-bit dQ at head dims 65..128 spilled 8 B on sm_80 with 8 warps at T = 4 or 9; with 4, fp32
# forward and dQ at 33..128 up to 24 B, on sm_80 or sm_90: triton 3.9's ptxas or 3.6's; fp32 dQ up
# to 32 keeps 2 stages here, as its unaligned tile's 1 spilled 8 B on sm_90 with 3.9). 16-bit dK/dV
# at 65..128 takes 1 stage: its one query block leaves nothing to prefetch, and 2 spilled 8 B on
# sm_90 at T = 2, 4, 9 and 15 with triton 3.8.
_SHORT = {
    ("fwd", True, 64): (16, 16, 8, 2),
    ("fwd", True, 128): (16, 16, 8, 2),
    ("dkdv", False, 128): (16, 16, 8, 1),
    ("dq", True, 32): (16, 16, 8, 2),
    ("dq", True, 64): (16, 16, 8, 2),
    ("dq", False, 128): (16, 16, 4, 2),
}
# T up to 32 shrinks the tiles to 16 or 32 rows, where a 4-warp default's 8-warp alternative
# spills (16-bit dK/dV at d = 8 and dQ at d = 24, T = 17, on sm_90 with triton 3.6): not offered
_FEW_ROWS = 32
# defaults whose 8-warp alternative spills at any T, by (kernel, fp32?, BLOCK_D, tile): not offered
# (fp32 dQ's ``_UNALIGNED_HEADS`` tile: 8 B on sm_80 and 16 B on sm_90 at d = 33..60, T = 33..1025,
# with triton 3.8; with 1 stage too, 8 B on sm_90 with 3.6 and 3.8)
_KEEP_WARPS = {("dq", True, 64, (16, 16, 4, 2))}
# T or d not a multiple of 16: half-rows alternatives that spill, by (kernel, fp32?, BLOCK_D) and
# tile, and the tile offered instead (the 16-bit forward at d = 32 and 16, T = 33..63: 32 rows by
# 64 keys spilled 16 B on sm_90 at d = 32 with triton 3.6; by 32 keys, none)
_UNALIGNED_HALF_ROWS = {
    ("fwd", False, 32, (32, 64, 4, 3)): (32, 32, 4, 3),
}


def _unaligned(head_dim: int, length: int) -> bool:
    """Whether the unaligned tiles apply: T not a multiple of 16, or d not one where the block is
    not 64 channels (d = 40 or 48 keep the aligned tiles: the 64-channel unaligned ones, tuned for
    T = 65 at d = 64, spill 16 B in fp32 dQ on sm_90 there, the aligned ones none)."""
    return bool(length % 16 or (head_dim % 16 and max(32, triton.next_power_of_2(head_dim)) != 64))


def _key(kernel: str, head_dim: int, dtype: torch.dtype) -> tuple:
    """The tile tables' key: (kernel, fp32?, head dim padded to a power of two of at least 32)."""
    return kernel, dtype == torch.float32, max(32, triton.next_power_of_2(head_dim))  # d <= 256: function.py


_CHOICES = Choices("attention")  # "gpu|kernel|dtype|d|T" -> [BLOCK_M, BLOCK_N, num_warps, num_stages]


def _config(kernel: str, head_dim: int, length: int, dtype: torch.dtype):
    """The default (BLOCK_M, BLOCK_N, num_warps, num_stages) for kernel "fwd" | "dkdv" | "dq": one
    small fixed config in the interpreter (speed there is per program), else by padded head dim,
    dtype and T, its blocks no longer than T needs (T=64 does not run half-masked 128-row tiles)."""
    if triton_interpret():
        return 32, 32, 1, 1
    key = _key(kernel, head_dim, dtype)
    unaligned = _unaligned(head_dim, length)
    fit = max(16, triton.next_power_of_2(length))
    tables = [_SHORT] if fit == 16 else []
    tables += [_UNALIGNED_HEADS] if unaligned and head_dim % 16 else []
    tables += [_ODD_HEADS] if head_dim % 16 else []
    tables += [_UNALIGNED, _CONFIGS] if unaligned else [_CONFIGS]
    block_m, block_n, warps, stages = next(table[key] for table in tables if key in table)
    return min(block_m, fit), min(block_n, fit), warps, stages


def candidates(kernel: str, head_dim: int, length: int, dtype: torch.dtype) -> list[tuple]:
    """The tiles autotuning may pick, the default first: 8 warps where the default has 4 (never
    fewer: the defaults' warp counts keep their registers from spilling; never for T up to
    ``_FEW_ROWS``, whose small tiles spill with 8, nor for ``_KEEP_WARPS``) and, for the 16-bit
    forward and dQ up to head dim 128, half the query rows per program (twice the programs for
    small grids; dK/dV, fp32 and d=256 tiles spill when halved, with triton 3.9's ptxas or 3.6's;
    ``_UNALIGNED_HALF_ROWS`` reshapes the halved tiles that spill).
    fp32 at head dim > 128 keeps its one tile (the only one found without spills).
    .ci/check_triton_compile.py compiles every one of them."""
    default = _config(kernel, head_dim, length, dtype)
    if triton_interpret() or (dtype == torch.float32 and head_dim > 128):
        return [default]
    block_m, block_n, warps, stages = default
    more_warps = length > _FEW_ROWS and (*_key(kernel, head_dim, dtype), default) not in _KEEP_WARPS
    options = [default] + ([(block_m, block_n, 8, stages)] if more_warps else [])
    if kernel != "dkdv" and dtype != torch.float32 and head_dim <= 128 and block_m >= 32:
        half = (block_m // 2, block_n, warps, stages)
        if _unaligned(head_dim, length):
            half = _UNALIGNED_HALF_ROWS.get((*_key(kernel, head_dim, dtype), half), half)
        options.insert(1, half)
    return list(dict.fromkeys(options))


def _tiles(kernel: str, x: torch.Tensor, head_dim: int, length: int, launch) -> tuple:
    """The tiles for this launch: the recorded choice for (GPU, kernel, dtype, d, T), else, inside
    ``autotuning``, the fastest candidate of ``launch(tiles)`` (each launch writes the same full
    outputs, so timing them is harmless), else the default."""
    options = candidates(kernel, head_dim, length, x.dtype)
    if len(options) == 1 or not x.is_cuda:
        return options[0]
    dtype = str(x.dtype).removeprefix("torch.")
    key = f"{gpu_name(x.device)}|{kernel}|{dtype}|d{head_dim}|T{length}"
    chosen = _CHOICES.get(key)
    if isinstance(chosen, list) and tuple(chosen) in options:
        return tuple(chosen)
    if not measuring(x):
        return options[0]
    best = fastest(options, launch) or options[0]
    _CHOICES.put(key, list(best))
    return best


def _dot_meta(dtype: torch.dtype) -> dict:
    """fp32 dots as three TF32 tensor-core products ("tf32x3": about fp32's accuracy; "ieee" runs
    on FMA units and spills); 16-bit: the default. In triton's interpreter bf16 dots give wrong
    numbers, so they run upcast to fp32 there."""
    upcast = dtype == torch.bfloat16 and triton_interpret()
    return dict(PRECISION="ieee" if upcast else "tf32x3" if dtype == torch.float32 else None, UPCAST=upcast)


@triton.jit
def _mm(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot, operands upcast to fp32 where asked: triton's interpreter gets bf16 dots wrong."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _mm_chunked(
    a, a_ok, a_c, b, b_ok, b_c, D, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, PRECISION, UPCAST
):
    """A @ B summed over the head dim, the operands read from memory D_CHUNK channels at a time:
    a [R, 1] and b [1, C] point at channel 0 of A's rows and B's columns; a_c, b_c step a channel."""
    acc = tl.zeros([a.shape[0], b.shape[1]], tl.float32)
    for c0 in range(0, BLOCK_D, D_CHUNK):
        d = c0 + tl.arange(0, D_CHUNK)
        d_ok = d < D
        x = tl.load(a + d[None, :] * a_c, mask=a_ok & d_ok[None, :], other=0.0)
        y = tl.load(b + d[:, None] * b_c, mask=d_ok[:, None] & b_ok, other=0.0)
        acc = _mm(x, y, acc, PRECISION, UPCAST)
    return acc


@triton.jit(do_not_specialize=["H"])
def _fwd_kernel(
    qkv,
    out,
    lse,
    T,
    D,
    head_step,
    k_off,
    v_off,
    H,
    qk_scale,
    s_b,
    s_c,
    s_t,
    o_b,
    o_c,
    o_t,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    base = qkv + b * s_b + (h * head_step).to(tl.int64) * s_c
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D

    if D_CHUNK == BLOCK_D:
        q = tl.load(
            base + offs_d[None, :] * s_c + offs_m[:, None] * s_t,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, T, BLOCK_N):
        n = start_n + offs_n
        n_ok = n < T
        if D_CHUNK == BLOCK_D:
            kt = tl.load(
                base + (k_off + offs_d[:, None]) * s_c + n[None, :] * s_t,
                mask=d_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            s = _mm(q, kt, None, PRECISION, UPCAST)
        else:
            q_rows, k_cols = base + offs_m[:, None] * s_t, base + k_off * s_c + n[None, :] * s_t
            s = _mm_chunked(
                q_rows, m_ok[:, None], s_c, k_cols, n_ok[None, :], s_c, D, BLOCK_D, D_CHUNK, PRECISION, UPCAST
            )
        s = s * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            base + (v_off + offs_d[None, :]) * s_c + n[:, None] * s_t,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = _mm(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_base = out + b * o_b + (h * D).to(tl.int64) * o_c
    tl.store(
        o_base + offs_d[None, :] * o_c + offs_m[:, None] * o_t,
        acc.to(out.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    # natural-log logsumexp of the scaled scores (m_i and log2(l_i) are in log2 units)
    tl.store(lse + bh.to(tl.int64) * T + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_ok)


@triton.jit(do_not_specialize=["H"])
def _bwd_delta_kernel(
    dout,
    out,
    delta,
    T,
    D,
    H,
    g_b,
    g_c,
    g_t,
    o_b,
    o_c,
    o_t,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    ch = ((bh % H) * D).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    do = tl.load(dout + b * g_b + (ch + offs_d[None, :]) * g_c + offs_m[:, None] * g_t, mask=mask, other=0.0)
    o = tl.load(out + b * o_b + (ch + offs_d[None, :]) * o_c + offs_m[:, None] * o_t, mask=mask, other=0.0)
    tl.store(
        delta + bh.to(tl.int64) * T + offs_m, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=offs_m < T
    )


@triton.jit(do_not_specialize=["H"])
def _bwd_dkdv_kernel(
    qkv,
    dout,
    lse,
    delta,
    dqkv,
    T,
    D,
    head_step,
    k_off,
    v_off,
    H,
    qk_scale,
    sm_scale,
    s_b,
    s_c,
    s_t,
    g_b,
    g_c,
    g_t,
    r_b,
    r_c,
    r_t,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    ch = (h * head_step).to(tl.int64)
    base = qkv + b * s_b + ch * s_c
    g_base = dout + b * g_b + (h * D).to(tl.int64) * g_c
    row = bh.to(tl.int64) * T
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < T
    d_ok = offs_d < D
    nd_mask = n_ok[:, None] & d_ok[None, :]

    if D_CHUNK == BLOCK_D:
        k = tl.load(base + (k_off + offs_d[None, :]) * s_c + offs_n[:, None] * s_t, mask=nd_mask, other=0.0)
        v = tl.load(base + (v_off + offs_d[None, :]) * s_c + offs_n[:, None] * s_t, mask=nd_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, T, BLOCK_M):
        m = start_m + offs_m
        m_ok = m < T
        dm_mask = d_ok[:, None] & m_ok[None, :]
        qt_ptrs = base + offs_d[:, None] * s_c + m[None, :] * s_t
        do_ptrs = g_base + offs_d[:, None] * g_c + m[None, :] * g_t
        if D_CHUNK == BLOCK_D:
            qt = tl.load(qt_ptrs, mask=dm_mask, other=0.0)
            do_t = tl.load(do_ptrs, mask=dm_mask, other=0.0).to(qt.dtype)
        lse_m = tl.load(lse + row + m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta_m = tl.load(delta + row + m, mask=m_ok, other=0.0)
        # transposed scores: keys on rows, queries on columns. Read in chunks, dO^T and Q^T are
        # loaded whole only for the update that needs each, one after the other.
        if D_CHUNK == BLOCK_D:
            st = _mm(k, qt, None, PRECISION, UPCAST)
        else:
            k_rows, q_cols = base + k_off * s_c + offs_n[:, None] * s_t, base + m[None, :] * s_t
            st = _mm_chunked(
                k_rows, n_ok[:, None], s_c, q_cols, m_ok[None, :], s_c, D, BLOCK_D, D_CHUNK, PRECISION, UPCAST
            )
            do_t = tl.load(do_ptrs, mask=dm_mask, other=0.0).to(qkv.dtype.element_ty)
        pt = tl.where(m_ok[None, :], tl.exp2(st * qk_scale - lse_m[None, :]), 0.0)
        dv = _mm(pt.to(do_t.dtype), tl.trans(do_t), dv, PRECISION, UPCAST)
        if D_CHUNK == BLOCK_D:
            dpt = _mm(v, do_t, None, PRECISION, UPCAST)
        else:
            v_rows, g_cols = base + v_off * s_c + offs_n[:, None] * s_t, g_base + m[None, :] * g_t
            dpt = _mm_chunked(
                v_rows, n_ok[:, None], s_c, g_cols, m_ok[None, :], g_c, D, BLOCK_D, D_CHUNK, PRECISION, UPCAST
            )
            qt = tl.load(qt_ptrs, mask=dm_mask, other=0.0)
        dst = pt * (dpt - delta_m[None, :])
        dk = _mm(dst.to(qt.dtype), tl.trans(qt), dk, PRECISION, UPCAST)

    r_base = dqkv + b * r_b + ch * r_c
    out_ty = dqkv.dtype.element_ty
    tl.store(
        r_base + (k_off + offs_d[None, :]) * r_c + offs_n[:, None] * r_t,
        (dk * sm_scale).to(out_ty),
        mask=nd_mask,
    )
    tl.store(r_base + (v_off + offs_d[None, :]) * r_c + offs_n[:, None] * r_t, dv.to(out_ty), mask=nd_mask)


@triton.jit(do_not_specialize=["H"])
def _bwd_dq_kernel(
    qkv,
    dout,
    lse,
    delta,
    dqkv,
    T,
    D,
    head_step,
    k_off,
    v_off,
    H,
    qk_scale,
    sm_scale,
    s_b,
    s_c,
    s_t,
    g_b,
    g_c,
    g_t,
    r_b,
    r_c,
    r_t,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    ch = (h * head_step).to(tl.int64)
    base = qkv + b * s_b + ch * s_c
    row = bh.to(tl.int64) * T
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D
    md_mask = m_ok[:, None] & d_ok[None, :]

    g_base = dout + b * g_b + (h * D).to(tl.int64) * g_c
    if D_CHUNK == BLOCK_D:
        q = tl.load(base + offs_d[None, :] * s_c + offs_m[:, None] * s_t, mask=md_mask, other=0.0)
        do = tl.load(g_base + offs_d[None, :] * g_c + offs_m[:, None] * g_t, mask=md_mask, other=0.0).to(
            q.dtype
        )
    lse_m = tl.load(lse + row + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta_m = tl.load(delta + row + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, T, BLOCK_N):
        n = start_n + offs_n
        n_ok = n < T
        dn_mask = d_ok[:, None] & n_ok[None, :]
        kt = tl.load(base + (k_off + offs_d[:, None]) * s_c + n[None, :] * s_t, mask=dn_mask, other=0.0)
        if D_CHUNK == BLOCK_D:
            vt = tl.load(base + (v_off + offs_d[:, None]) * s_c + n[None, :] * s_t, mask=dn_mask, other=0.0)
            s = _mm(q, kt, None, PRECISION, UPCAST)
            dp = _mm(do, vt, None, PRECISION, UPCAST)
        else:
            q_rows, k_cols = base + offs_m[:, None] * s_t, base + k_off * s_c + n[None, :] * s_t
            s = _mm_chunked(
                q_rows, m_ok[:, None], s_c, k_cols, n_ok[None, :], s_c, D, BLOCK_D, D_CHUNK, PRECISION, UPCAST
            )
            g_rows, v_cols = g_base + offs_m[:, None] * g_t, base + v_off * s_c + n[None, :] * s_t
            dp = _mm_chunked(
                g_rows,
                m_ok[:, None],
                g_c,
                v_cols,
                n_ok[None, :],
                s_c,
                D,
                BLOCK_D,
                D_CHUNK,
                PRECISION,
                UPCAST,
            )
        p = tl.where(n_ok[None, :], tl.exp2(s * qk_scale - lse_m[:, None]), 0.0)
        ds = p * (dp - delta_m[:, None])
        dq = _mm(ds.to(kt.dtype), tl.trans(kt), dq, PRECISION, UPCAST)

    tl.store(
        dqkv + b * r_b + (ch + offs_d[None, :]) * r_c + offs_m[:, None] * r_t,
        (dq * sm_scale).to(dqkv.dtype.element_ty),
        mask=md_mask,
    )


def _d_chunk(dtype: torch.dtype, block_d: int, kernel: str = "fwd", unaligned: bool = False) -> int:
    """Head-dim channels per step of the dots that sum over d (q.k, dO.v). A warp holds all d of
    its rows of the left operand, replicated across the warps that split the other side; at fp32
    d=256 tf32x3's hi/lo halves of that make 256 registers per thread, so there the operands are
    re-read from memory (L1/L2) 32 channels at a time, in a loop that is not unrolled (unrolled,
    the chunks' loads are all issued at once and spill again), instead of held for the whole loop.
    With T or d not a multiple of 16 (``_unaligned``), fp32 dQ at d=128 spills at the smallest tiles
    too: chunked; and fp32 dK/dV at d > 128, whose loads of dO and Q go through registers there,
    takes 16 channels (32 spilled 32 B on sm_80 at d = 144..256, T = 17..1025 off 16, with triton 3.8)."""
    if dtype != torch.float32:
        return block_d
    if unaligned and kernel == "dkdv" and block_d > 128:
        return 16
    return 32 if block_d > 128 or (unaligned and kernel == "dq" and block_d == 128) else block_d


def _dims(qkv: torch.Tensor, num_heads: int):
    """(B, d, T, BLOCK_D): the head dim padded to a power of two (tl.dot needs >= 16)."""
    bs, width, length = qkv.shape
    head_dim = width // (3 * num_heads)
    return bs, head_dim, length, max(16, triton.next_power_of_2(head_dim))


def forward(qkv: torch.Tensor, num_heads: int, order: str):
    """-> (out [B, H*d, T] in qkv's dtype, lse fp32 [B*H, T] natural-log logsumexp)."""
    bs, head_dim, length, block_d = _dims(qkv, num_heads)
    head_step, k_off, v_off = _layout(num_heads, head_dim, order)
    out = new_output((bs, num_heads * head_dim, length), dtype=qkv.dtype, device=qkv.device)
    lse = new_output((bs * num_heads, length), dtype=torch.float32, device=qkv.device)

    def launch(tiles):
        block_m, block_n, warps, stages = tiles
        _fwd_kernel[(triton.cdiv(length, block_m), bs * num_heads)](
            qkv,
            out,
            lse,
            length,
            head_dim,
            head_step,
            k_off,
            v_off,
            num_heads,
            _LOG2E / math.sqrt(head_dim),
            *qkv.stride(),
            *out.stride(),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            D_CHUNK=_d_chunk(qkv.dtype, block_d),
            **_dot_meta(qkv.dtype),
            num_warps=warps,
            num_stages=stages,
        )

    launch(_tiles("fwd", qkv, head_dim, length, launch))
    return out, lse


def backward(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int, order: str
) -> torch.Tensor:
    """-> dqkv [B, 3*H*d, T] in qkv's dtype and layout."""
    bs, head_dim, length, block_d = _dims(qkv, num_heads)
    head_step, k_off, v_off = _layout(num_heads, head_dim, order)
    delta = new_output((bs * num_heads, length), dtype=torch.float32, device=qkv.device)
    block_m, _, warps, _ = _config("dq", head_dim, length, qkv.dtype)  # any rows per program will do
    _bwd_delta_kernel[(triton.cdiv(length, block_m), bs * num_heads)](
        dout,
        out,
        delta,
        length,
        head_dim,
        num_heads,
        *dout.stride(),
        *out.stride(),
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    dqkv = new_output(qkv)
    sm_scale = 1 / math.sqrt(head_dim)
    args = (
        qkv,
        dout,
        lse,
        delta,
        dqkv,
        length,
        head_dim,
        head_step,
        k_off,
        v_off,
        num_heads,
        sm_scale * _LOG2E,
        sm_scale,
        *qkv.stride(),
        *dout.stride(),
        *dqkv.stride(),
    )
    for name, kernel in (("dkdv", _bwd_dkdv_kernel), ("dq", _bwd_dq_kernel)):

        def launch(tiles, kernel=kernel, name=name):
            block_m, block_n, warps, stages = tiles
            rows = block_n if name == "dkdv" else block_m  # dK/dV per key block, dQ per query block
            kernel[(triton.cdiv(length, rows), bs * num_heads)](
                *args,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                BLOCK_D=block_d,
                D_CHUNK=_d_chunk(qkv.dtype, block_d, name, _unaligned(head_dim, length)),
                **_dot_meta(qkv.dtype),
                num_warps=warps,
                num_stages=stages,
            )

        launch(_tiles(name, qkv, head_dim, length, launch))
    return dqkv
