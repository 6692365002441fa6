"""Triton kernels for ada_group_norm (the kernel layer; see docs/DESIGN.md section 1).

A group of sample n is a [Cg, S] matrix (Cg = C / G channels, S = prod of the trailing dims)
addressed through (channel, spatial) strides, so NCHW, channels_last and [N, C, L] inputs run
without copies. Programs are laid out as (n * G + g, chunk):

* unsplit (one chunk, enough groups to fill the GPU): one program per group computes the
  statistics and then normalizes, in a single launch;
* split (few groups, large groups: batch 1 at 256x256): per-(group, chunk) partial moments
  (count, mean, M2), then the normalize pass, also chunked, merges the chunk moments itself.

Statistics are fp32 (fp64 for fp64 inputs, which the interpreter uses for gradcheck): each tile
is reduced with an exact two-pass (mean, then centred squares) and tiles are merged with Chan's
formula, so inputs with a large mean (x = 100 + noise) keep their variance.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .._backend import new_output

_MIN_CHUNK_ELEMS = 16384  # below this a chunk costs more in launches/merges than it saves
_MAX_CHUNKS = 512  # a power of two: the normalize pass reads all chunk moments as one block of this size
_TILE_ELEMS = 2048  # elements per tile; tests shrink it to run the multi-tile merges on small shapes


def _flat(t: torch.Tensor):
    """(tensor, stride_n, stride_c, stride_s, S): view [N, C, *] as [N, C, S] without copying when the
    trailing dims are one stride apart (NCHW, channels_last, [N, C, L], expanded grads); else copy."""
    dims = [(sz, st) for sz, st in zip(t.shape[2:], t.stride()[2:]) if sz != 1]
    if any(dims[i][1] != dims[i + 1][1] * dims[i + 1][0] for i in range(len(dims) - 1)):
        t = t.contiguous()
        dims = [(sz, st) for sz, st in zip(t.shape[2:], t.stride()[2:]) if sz != 1]
    stride_s = dims[-1][1] if dims else 1
    return t, t.stride(0), t.stride(1), stride_s, math.prod(t.shape[2:])


def _acc_dtype(x: torch.Tensor):
    return (tl.float64, torch.float64) if x.dtype == torch.float64 else (tl.float32, torch.float32)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tiles(cg: int, s: int):
    """Tile [TC channels, TS positions]: whole group width when it fits, ~2K elements per tile."""
    tc = min(triton.next_power_of_2(cg), 64, _TILE_ELEMS)
    ts = max(1, min(triton.next_power_of_2(s), _TILE_ELEMS // tc))
    return tc, ts


def _cg_align(cg: int, tc: int, stride_c: int) -> int:
    """Channels per group's largest power-of-two factor (at most the tile's width and 8, a 16-byte
    vector), shown to the compiler so loads along contiguous channels (channels_last) vectorise;
    1 where channels are not contiguous (no use there, and no extra compiled variant)."""
    return min(cg & -cg, tc, 8) if stride_c == 1 else 1


def _warps(tile: int, per_warp: int) -> int:
    """Warps for a tile; the backward keeps fewer elements per thread (it holds x, dy and z live:
    ~100 registers at 4 per thread on sm_90 vs ~170 at 8)."""
    return max(1, min(16, tile // per_warp))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sms(x: torch.Tensor) -> int:
    return _num_sms(x.device.index or 0) if x.is_cuda else 1


def _chunks(sms: int, groups: int, cg: int, s: int, ts: int, num_chunks: int | None):
    """(K, chunk_s): split each group's positions into K chunks of chunk_s positions.

    Heuristic: split only when the N*G groups are too few to fill the GPU (about 4 programs per
    SM) and each chunk keeps >= _MIN_CHUNK_ELEMS elements; chunks are then whole tiles.
    ``num_chunks`` forces K (tests), with chunks not aligned to tiles.
    """
    if num_chunks is None:
        target = 4 * sms
        k = 1 if groups >= target else min(_cdiv(target, groups), max(1, cg * s // _MIN_CHUNK_ELEMS))
        k = max(1, min(k, _MAX_CHUNKS, _cdiv(s, ts)))
        chunk_s = _cdiv(_cdiv(s, k), ts) * ts
    else:
        k = max(1, min(num_chunks, _MAX_CHUNKS, s))
        chunk_s = _cdiv(s, k)
    return _cdiv(s, chunk_s), chunk_s


@triton.jit
def _aligned(cg, ALIGN: tl.constexpr):
    """cg itself, as a multiple of ALIGN the compiler can see (group bases and channel masks)."""
    return cg // ALIGN * ALIGN


@triton.jit
def _moments(x_ptr, sxc, sxs, Cg, s_start, s_end, ACC: tl.constexpr, TC: tl.constexpr, TS: tl.constexpr):
    """(count, mean, M2) over channels [0, Cg) and positions [s_start, s_end) of one group."""
    offs_c = tl.arange(0, TC)
    offs_s = tl.arange(0, TS)
    cnt = tl.zeros((), ACC)
    mean = tl.zeros((), ACC)
    m2 = tl.zeros((), ACC)
    for c0 in range(0, Cg, TC):
        cc = c0 + offs_c
        mc = cc < Cg
        nc = tl.minimum(Cg - c0, TC)
        for s0 in range(s_start, s_end, TS):
            ss = s0 + offs_s
            m = mc[:, None] & (ss < s_end)[None, :]
            xv = tl.load(x_ptr + cc[:, None] * sxc + ss[None, :] * sxs, mask=m, other=0.0).to(ACC)
            nb = (nc * tl.minimum(s_end - s0, TS)).to(ACC)
            tmean = tl.sum(xv) / nb
            d = tl.where(m, xv - tmean, 0.0)
            tot = cnt + nb
            delta = tmean - mean
            mean += delta * (nb / tot)
            m2 += tl.sum(d * d) + delta * delta * (cnt * nb / tot)
            cnt = tot
    return cnt, mean, m2


@triton.jit(do_not_specialize=["K"])
def _stats_kernel(
    x_ptr,
    part_ptr,
    G,
    Cg,
    S,
    CHUNK_S,
    K,
    sxn,
    sxc,
    sxs,
    ACC: tl.constexpr,
    TC: tl.constexpr,
    TS: tl.constexpr,
    CG_ALIGN: tl.constexpr,
):
    """Split path, pass 1: moments of chunk k of group pid -> part[pid, k, (count, mean, M2)]."""
    Cg = _aligned(Cg, CG_ALIGN)
    pid = tl.program_id(0)
    k = tl.program_id(1)
    n = pid // G
    g = pid - n * G
    base = x_ptr + n.to(tl.int64) * sxn + (g * Cg).to(tl.int64) * sxc
    s_start = k * CHUNK_S
    cnt, mean, m2 = _moments(base, sxc, sxs, Cg, s_start, tl.minimum(s_start + CHUNK_S, S), ACC, TC, TS)
    out = part_ptr + (pid * K + k) * 3
    tl.store(out, cnt)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _load_chan(ptr, idx, mask, HAS: tl.constexpr, default: tl.constexpr, ACC: tl.constexpr, TC: tl.constexpr):
    if HAS:
        return tl.load(ptr + idx, mask=mask, other=default).to(ACC)
    else:
        return tl.full((TC,), default, ACC)


@triton.jit(do_not_specialize=["K"])
def _fwd_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    sc_ptr,
    sh_ptr,
    part_ptr,
    mean_ptr,
    rstd_ptr,
    G,
    Cg,
    S,
    CHUNK_S,
    K,
    eps,
    sxn,
    sxc,
    sxs,
    syn,
    syc,
    sys,
    sscn,
    sscc,
    sshn,
    sshc,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    FROM_PARTS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    TC: tl.constexpr,
    TS: tl.constexpr,
    CG_ALIGN: tl.constexpr,
):
    """Normalize chunk k of group pid; statistics from the chunk partials or (unsplit) computed here."""
    Cg = _aligned(Cg, CG_ALIGN)
    pid = tl.program_id(0)
    k = tl.program_id(1)
    n = pid // G
    g = pid - n * G
    xb = x_ptr + n.to(tl.int64) * sxn + (g * Cg).to(tl.int64) * sxc
    yb = y_ptr + n.to(tl.int64) * syn + (g * Cg).to(tl.int64) * syc
    if FROM_PARTS:
        kk = tl.arange(0, BLOCK_K)
        mk = kk < K
        pp = part_ptr + (pid * K + kk) * 3
        pc = tl.load(pp, mask=mk, other=0.0)
        pm = tl.load(pp + 1, mask=mk, other=0.0)
        cnt = tl.sum(pc)
        mean = tl.sum(pc * pm) / cnt
        dm = pm - mean
        m2 = tl.sum(tl.load(pp + 2, mask=mk, other=0.0)) + tl.sum(pc * dm * dm)
    else:
        cnt, mean, m2 = _moments(xb, sxc, sxs, Cg, 0, S, ACC, TC, TS)
    rstd = 1.0 / tl.sqrt(m2 / cnt + eps)
    if k == 0:
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)
    s_start = k * CHUNK_S
    s_end = tl.minimum(s_start + CHUNK_S, S)
    offs_c = tl.arange(0, TC)
    offs_s = tl.arange(0, TS)
    for c0 in range(0, Cg, TC):
        cc = c0 + offs_c
        mc = cc < Cg
        ch = g * Cg + cc
        w = _load_chan(w_ptr, ch, mc, HAS_W, 1.0, ACC, TC)
        b = _load_chan(b_ptr, ch, mc, HAS_B, 0.0, ACC, TC)
        s1 = 1.0 + _load_chan(sc_ptr + n.to(tl.int64) * sscn, ch * sscc, mc, HAS_SCALE, 0.0, ACC, TC)
        sh = _load_chan(sh_ptr + n.to(tl.int64) * sshn, ch * sshc, mc, HAS_SHIFT, 0.0, ACC, TC)
        a = (rstd * w * s1)[:, None]  # z = (x - mean) * a + c
        c = (b * s1 + sh)[:, None]
        for s0 in range(s_start, s_end, TS):
            ss = s0 + offs_s
            m = mc[:, None] & (ss < s_end)[None, :]
            xv = tl.load(xb + cc[:, None] * sxc + ss[None, :] * sxs, mask=m, other=0.0).to(ACC)
            z = (xv - mean) * a + c
            if SILU:
                z = z * tl.sigmoid(z)
            tl.store(yb + cc[:, None] * syc + ss[None, :] * sys, z.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dz(xv, dyv, mean, rstd, w, b, s1, sh, SILU: tl.constexpr):
    """(xhat, dL/dz): the pre-activation gradient, recomputing z from x."""
    xhat = (xv - mean) * rstd
    if SILU:
        z = (xhat * w[:, None] + b[:, None]) * s1[:, None] + sh[:, None]
        sig = tl.sigmoid(z)
        dyv = dyv * sig * (1.0 + z * (1.0 - sig))
    return xhat, dyv


@triton.jit
def _chan_sums(
    xb,
    dyb,
    sxc,
    sxs,
    sdc,
    sds,
    cc,
    mc,
    s_start,
    s_end,
    mean,
    rstd,
    w,
    b,
    s1,
    sh,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
    TC: tl.constexpr,
    TS: tl.constexpr,
):
    """Per channel of the tile: (sum dz, sum dz * xhat) over positions [s_start, s_end)."""
    offs_s = tl.arange(0, TS)
    sa = tl.zeros((TC,), ACC)
    sb = tl.zeros((TC,), ACC)
    for s0 in range(s_start, s_end, TS):
        ss = s0 + offs_s
        m = mc[:, None] & (ss < s_end)[None, :]
        xv = tl.load(xb + cc[:, None] * sxc + ss[None, :] * sxs, mask=m, other=0.0).to(ACC)
        dyv = tl.load(dyb + cc[:, None] * sdc + ss[None, :] * sds, mask=m, other=0.0).to(ACC)
        xhat, dz = _dz(xv, dyv, mean, rstd, w, b, s1, sh, SILU)
        dz = tl.where(m, dz, 0.0)
        sa += tl.sum(dz, 1)
        sb += tl.sum(dz * xhat, 1)
    return sa, sb


@triton.jit
def _bwd_sums_kernel(
    x_ptr,
    dy_ptr,
    w_ptr,
    b_ptr,
    sc_ptr,
    sh_ptr,
    mean_ptr,
    rstd_ptr,
    sums_ptr,
    G,
    Cg,
    S,
    NC,
    CHUNK_S,
    sxn,
    sxc,
    sxs,
    sdn,
    sdc,
    sds,
    sscn,
    sscc,
    sshn,
    sshc,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
    TC: tl.constexpr,
    TS: tl.constexpr,
    CG_ALIGN: tl.constexpr,
):
    """Split backward, pass 1: per-(n, c) sums over chunk k -> sums[k, 0 | 1, n, c]."""
    Cg = _aligned(Cg, CG_ALIGN)
    pid = tl.program_id(0)
    k = tl.program_id(1)
    n = pid // G
    g = pid - n * G
    xb = x_ptr + n.to(tl.int64) * sxn + (g * Cg).to(tl.int64) * sxc
    dyb = dy_ptr + n.to(tl.int64) * sdn + (g * Cg).to(tl.int64) * sdc
    mean = tl.load(mean_ptr + pid).to(ACC)
    rstd = tl.load(rstd_ptr + pid).to(ACC)
    s_start = k * CHUNK_S
    s_end = tl.minimum(s_start + CHUNK_S, S)
    offs_c = tl.arange(0, TC)
    out = sums_ptr + k.to(tl.int64) * 2 * NC + n * (G * Cg)
    for c0 in range(0, Cg, TC):
        cc = c0 + offs_c
        mc = cc < Cg
        ch = g * Cg + cc
        w = _load_chan(w_ptr, ch, mc, HAS_W, 1.0, ACC, TC)
        b = _load_chan(b_ptr, ch, mc, HAS_B, 0.0, ACC, TC)
        s1 = 1.0 + _load_chan(sc_ptr + n.to(tl.int64) * sscn, ch * sscc, mc, HAS_SCALE, 0.0, ACC, TC)
        sh = _load_chan(sh_ptr + n.to(tl.int64) * sshn, ch * sshc, mc, HAS_SHIFT, 0.0, ACC, TC)
        sa, sb = _chan_sums(
            xb, dyb, sxc, sxs, sdc, sds, cc, mc, s_start, s_end, mean, rstd, w, b, s1, sh, SILU, ACC, TC, TS
        )
        tl.store(out + ch, sa, mask=mc)
        tl.store(out + NC + ch, sb, mask=mc)


@triton.jit
def _bwd_dx_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    w_ptr,
    b_ptr,
    sc_ptr,
    sh_ptr,
    mean_ptr,
    rstd_ptr,
    sums_ptr,
    G,
    Cg,
    S,
    NC,
    CHUNK_S,
    sxn,
    sxc,
    sxs,
    sdn,
    sdc,
    sds,
    sgn,
    sgc,
    sgs,
    sscn,
    sscc,
    sshn,
    sshc,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    FUSED: tl.constexpr,
    ACC: tl.constexpr,
    TC: tl.constexpr,
    TS: tl.constexpr,
    CG_ALIGN: tl.constexpr,
):
    """dx for chunk k of group pid: dx = rstd * (dz*g - mean(dz*g) - xhat * mean(dz*g*xhat)), g = (1+s)w.

    FUSED (one chunk): the per-channel sums are computed here first (and stored for the parameter
    grads); otherwise they come reduced over chunks in sums[0 | 1, n, c].
    """
    Cg = _aligned(Cg, CG_ALIGN)
    pid = tl.program_id(0)
    k = tl.program_id(1)
    n = pid // G
    g = pid - n * G
    C = G * Cg
    xb = x_ptr + n.to(tl.int64) * sxn + (g * Cg).to(tl.int64) * sxc
    dyb = dy_ptr + n.to(tl.int64) * sdn + (g * Cg).to(tl.int64) * sdc
    dxb = dx_ptr + n.to(tl.int64) * sgn + (g * Cg).to(tl.int64) * sgc
    mean = tl.load(mean_ptr + pid).to(ACC)
    rstd = tl.load(rstd_ptr + pid).to(ACC)
    sums = sums_ptr + n * C
    offs_c = tl.arange(0, TC)
    offs_s = tl.arange(0, TS)
    c1 = tl.zeros((), ACC)
    c2 = tl.zeros((), ACC)
    for c0 in range(0, Cg, TC):
        cc = c0 + offs_c
        mc = cc < Cg
        ch = g * Cg + cc
        w = _load_chan(w_ptr, ch, mc, HAS_W, 1.0, ACC, TC)
        s1 = 1.0 + _load_chan(sc_ptr + n.to(tl.int64) * sscn, ch * sscc, mc, HAS_SCALE, 0.0, ACC, TC)
        if FUSED:
            b = _load_chan(b_ptr, ch, mc, HAS_B, 0.0, ACC, TC)
            sh = _load_chan(sh_ptr + n.to(tl.int64) * sshn, ch * sshc, mc, HAS_SHIFT, 0.0, ACC, TC)
            sa, sb = _chan_sums(
                xb, dyb, sxc, sxs, sdc, sds, cc, mc, 0, S, mean, rstd, w, b, s1, sh, SILU, ACC, TC, TS
            )
            tl.store(sums + ch, sa, mask=mc)
            tl.store(sums + NC + ch, sb, mask=mc)
        else:
            sa = tl.load(sums + ch, mask=mc, other=0.0)
            sb = tl.load(sums + NC + ch, mask=mc, other=0.0)
        c1 += tl.sum(tl.where(mc, s1 * w * sa, 0.0))
        c2 += tl.sum(tl.where(mc, s1 * w * sb, 0.0))
    inv_m = 1.0 / (Cg * S).to(ACC)
    c1 = c1 * inv_m
    c2 = c2 * inv_m
    s_start = k * CHUNK_S
    s_end = tl.minimum(s_start + CHUNK_S, S)
    for c0 in range(0, Cg, TC):
        cc = c0 + offs_c
        mc = cc < Cg
        ch = g * Cg + cc
        w = _load_chan(w_ptr, ch, mc, HAS_W, 1.0, ACC, TC)
        b = _load_chan(b_ptr, ch, mc, HAS_B, 0.0, ACC, TC)
        s1 = 1.0 + _load_chan(sc_ptr + n.to(tl.int64) * sscn, ch * sscc, mc, HAS_SCALE, 0.0, ACC, TC)
        sh = _load_chan(sh_ptr + n.to(tl.int64) * sshn, ch * sshc, mc, HAS_SHIFT, 0.0, ACC, TC)
        gam = (s1 * w)[:, None]
        for s0 in range(s_start, s_end, TS):
            ss = s0 + offs_s
            m = mc[:, None] & (ss < s_end)[None, :]
            xv = tl.load(xb + cc[:, None] * sxc + ss[None, :] * sxs, mask=m, other=0.0).to(ACC)
            dyv = tl.load(dyb + cc[:, None] * sdc + ss[None, :] * sds, mask=m, other=0.0).to(ACC)
            xhat, dz = _dz(xv, dyv, mean, rstd, w, b, s1, sh, SILU)
            dx = rstd * (dz * gam - c1 - xhat * c2)
            tl.store(dxb + cc[:, None] * sgc + ss[None, :] * sgs, dx.to(dx_ptr.dtype.element_ty), mask=m)


def _chan_arg(t: torch.Tensor | None, x: torch.Tensor):
    """(tensor to pass, present, stride_n, stride_c) for an optional [C] or [N, C] tensor."""
    if t is None:
        return x, False, 0, 0
    if t.dim() == 1:
        return t, True, 0, t.stride(0)
    return t, True, t.stride(0), t.stride(1)


def _setup(x, num_groups):
    n, c = x.shape[0], x.shape[1]
    xf, sxn, sxc, sxs, s = _flat(x)
    cg = c // num_groups
    if c * s >= 2**31:
        raise ValueError(f"ada_group_norm: {c * s} elements per sample is over the int32 kernel limit")
    tc, ts = _tiles(cg, s)
    return xf, (sxn, sxc, sxs), n, c, cg, s, tc, ts, _cg_align(cg, tc, sxc)


def forward(x, num_groups, weight, bias, scale, shift, eps, activation, *, num_chunks=None):
    """-> (y, mean, rstd); mean/rstd [N, G] fp32 (fp64 for fp64 x); y like x (dtype, memory format).

    ``num_chunks`` overrides the split heuristic (tests force the split path with it).
    """
    xf, (sxn, sxc, sxs), n, c, cg, s, tc, ts, align = _setup(x, num_groups)
    warps = _warps(tc * ts, 256)
    acc, acc_t = _acc_dtype(x)
    y = new_output(x)  # x's memory format
    if _flat(y)[0] is not y:  # a permuted layout _flat cannot view: the output takes xf's
        y = new_output(xf)
    _, syn, syc, sys, _ = _flat(y)
    mean = new_output((n, num_groups), dtype=acc_t, device=x.device)
    rstd = new_output((n, num_groups), dtype=acc_t, device=x.device)
    if x.numel() == 0:  # empty groups have no statistics, as in torch
        return y, mean.fill_(float("nan")), rstd.fill_(float("nan"))
    groups = n * num_groups
    k, chunk_s = _chunks(_sms(x), groups, cg, s, ts, num_chunks)
    part = new_output((groups, k, 3), dtype=acc_t, device=x.device) if k > 1 else mean
    if k > 1:
        _stats_kernel[(groups, k)](
            xf,
            part,
            num_groups,
            cg,
            s,
            chunk_s,
            k,
            sxn,
            sxc,
            sxs,
            ACC=acc,
            TC=tc,
            TS=ts,
            CG_ALIGN=align,
            num_warps=warps,
        )
    w, has_w, _, _ = _chan_arg(weight, x)
    b, has_b, _, _ = _chan_arg(bias, x)
    sc, has_sc, sscn, sscc = _chan_arg(scale, x)
    sh, has_sh, sshn, sshc = _chan_arg(shift, x)
    _fwd_kernel[(groups, k)](
        xf,
        y,
        w,
        b,
        sc,
        sh,
        part,
        mean,
        rstd,
        num_groups,
        cg,
        s,
        chunk_s,
        k,
        float(eps),
        sxn,
        sxc,
        sxs,
        syn,
        syc,
        sys,
        sscn,
        sscc,
        sshn,
        sshc,
        HAS_W=has_w,
        HAS_B=has_b,
        HAS_SCALE=has_sc,
        HAS_SHIFT=has_sh,
        SILU=activation == "silu",
        FROM_PARTS=k > 1,
        BLOCK_K=_MAX_CHUNKS,
        ACC=acc,
        TC=tc,
        TS=ts,
        CG_ALIGN=align,
        num_warps=warps,
    )
    return y, mean, rstd


def backward(dy, x, num_groups, weight, bias, scale, shift, mean, rstd, activation, *, num_chunks=None):
    """-> (dx, dweight, dbias, dscale, dshift), None where the input was None; dx like x.

    The kernels produce per-(n, c) sums A = sum dz, B = sum dz * xhat (z: pre-activation); the
    parameter grads are tiny [N, C] reductions of those, done in torch.
    """
    xf, (sxn, sxc, sxs), n, c, cg, s, tc, ts, align = _setup(x, num_groups)
    # vector loads along channels (align > 1) at 16 warps make ptxas spill on sm_80; 8 warps do not.
    # With triton 3.6's ptxas, fp32's dx kernel spills at 16 warps and its sums kernel at 8 (a
    # register at 48 in use): each gets its own count
    sums_warps = _warps(tc * ts, 128 if align == 1 else 256)
    dx_warps = _warps(tc * ts, 128 if align == 1 and x.dtype != torch.float32 else 256)
    acc, acc_t = _acc_dtype(x)
    dyf, sdn, sdc, sds, _ = _flat(dy)
    dx = new_output(x)
    if _flat(dx)[0] is not dx:
        dx = new_output(xf)
    _, sgn, sgc, sgs, _ = _flat(dx)
    groups = n * num_groups
    k, chunk_s = _chunks(_sms(x), groups, cg, s, ts, num_chunks) if x.numel() else (1, 1)
    w, has_w, _, _ = _chan_arg(weight, x)
    b, has_b, _, _ = _chan_arg(bias, x)
    sc, has_sc, sscn, sscc = _chan_arg(scale, x)
    sh, has_sh, sshn, sshc = _chan_arg(shift, x)
    flags = dict(
        HAS_W=has_w,
        HAS_B=has_b,
        HAS_SCALE=has_sc,
        HAS_SHIFT=has_sh,
        SILU=activation == "silu",
        ACC=acc,
        TC=tc,
        TS=ts,
        CG_ALIGN=align,
    )
    sums = new_output((k, 2, n, c), dtype=acc_t, device=x.device)
    if x.numel() == 0:
        sums.zero_()
    elif k > 1:
        _bwd_sums_kernel[(groups, k)](
            xf,
            dyf,
            w,
            b,
            sc,
            sh,
            mean,
            rstd,
            sums,
            num_groups,
            cg,
            s,
            n * c,
            chunk_s,
            sxn,
            sxc,
            sxs,
            sdn,
            sdc,
            sds,
            sscn,
            sscc,
            sshn,
            sshc,
            **flags,
            num_warps=sums_warps,
        )
    if k > 1:
        sums = sums.sum(0, keepdim=True)
    if x.numel():
        _bwd_dx_kernel[(groups, k)](
            xf,
            dyf,
            dx,
            w,
            b,
            sc,
            sh,
            mean,
            rstd,
            sums,
            num_groups,
            cg,
            s,
            n * c,
            chunk_s,
            sxn,
            sxc,
            sxs,
            sdn,
            sdc,
            sds,
            sgn,
            sgc,
            sgs,
            sscn,
            sscc,
            sshn,
            sshc,
            FUSED=k == 1,
            **flags,
            num_warps=dx_warps,
        )
    sa, sb = sums[0, 0], sums[0, 1]
    s1 = 1 + scale.to(acc_t) if scale is not None else 1
    wv = weight.to(acc_t) if weight is not None else 1
    bv = bias.to(acc_t) if bias is not None else 0
    return (
        dx,
        None if weight is None else (s1 * sb).sum(0).to(weight.dtype),
        None if bias is None else (s1 * sa).sum(0).to(bias.dtype),
        None if scale is None else (wv * sb + bv * sa).to(scale.dtype),
        None if shift is None else sa.to(shift.dtype, copy=True),
    )
