"""Triton kernels for ada_group_norm (the kernel layer; see docs/DESIGN.md section 1).

A group of sample n is a [Cg, S] matrix (Cg = C / G channels, S = prod of the trailing dims)
addressed through (channel, spatial) strides, so NCHW, channels_last and [N, C, L] inputs run
without copies. Programs are laid out as (g, n, chunk), so no kernel divides its program id:

* unsplit (one chunk, enough groups to fill the GPU): one program per group computes the
  statistics and then normalizes, in a single launch; a group of at most _RESIDENT_ELEMS elements
  is one tile, loaded once and kept in registers between the statistics and the output;
* split (few groups, large groups: batch 1 at 256x256): per-(group, chunk) partial moments
  (count, mean, M2), then the normalize pass, also chunked, merges the chunk moments itself.

Statistics are fp32 (fp64 for fp64 inputs, which the interpreter uses for gradcheck), kept as
(count, mean, M2) so inputs with a large mean (x = 100 + noise) keep their variance: over several
tiles each thread runs Welford's update on its own elements and the program merges them once at
the end (Chan's formula: one block reduction per channel tile instead of two per tile); a resident
tile and a partial last tile take the exact two-pass (mean, then centred squares).

The backward's parameter gradients (weight, bias, scale, shift) come from per-(n, c) sums in one
small launch, and only when asked for: classifier guidance differentiates by the input alone.
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
# an unsplit group up to this size (padded to powers of two) is one tile; at 4096 and 8192, ptxas
# (triton 3.6 or 3.9) spilled on some resident variants at every warp count tried
_RESIDENT_ELEMS = 2048
_PARAM_BLOCK = 128  # channels per program of the parameter-gradient launch


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
def _program(G):
    """(g, n, k, pid) of this program: the grid is (group, sample, chunk), and pid numbers (n, g)
    as mean and rstd [N, G] do."""
    g = tl.program_id(0)
    n = tl.program_id(1)
    return g, n, tl.program_id(2), n * G + g


@triton.jit
def _group(ptr, n, g, Cg, s_n, s_c):
    """The address of [n, g * Cg]: sample n's group g starts there (64-bit offsets)."""
    return ptr + n.to(tl.int64) * s_n + (g * Cg).to(tl.int64) * s_c


@triton.jit
def _load_tile(ptr, cc, ss, s_c, s_s, mask, ACC: tl.constexpr):
    """Channels cc x positions ss from ptr (a group's start) in ACC, 0 where masked off."""
    return tl.load(ptr + cc[:, None] * s_c + ss[None, :] * s_s, mask=mask, other=0.0).to(ACC)


@triton.jit
def _store_tile(ptr, cc, ss, s_c, s_s, value, mask):
    """value into channels cc x positions ss from ptr (a group's start), in ptr's dtype."""
    tl.store(ptr + cc[:, None] * s_c + ss[None, :] * s_s, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _chan_merge(c1, m1, v1, c2, m2, v2):
    """Chan's merge of two (count, mean, M2) moments; an empty side (count 0) leaves the other."""
    tot = c1 + c2
    r = tl.where(tot > 0, c2 / tl.maximum(tot, 1.0), 0.0)
    d = m2 - m1
    return tot, m1 + d * r, v1 + v2 + d * d * c1 * r


@triton.jit
def _ctile_moments(
    x_ptr, sxc, sxs, c0, Cg, s_start, s_end, ACC: tl.constexpr, TC: tl.constexpr, TS: tl.constexpr
):
    """(count, mean, M2) of channel tile [c0, c0 + TC) over positions [s_start, s_end).

    Over the full position tiles each element keeps its own Welford moments (a scalar count: no
    reduction, no barrier, no per-element division in the loop); one merge over the tile and an
    exact two-pass over a partial last tile follow.
    """
    cc = c0 + tl.arange(0, TC)
    mc = cc < Cg
    offs_s = tl.arange(0, TS)
    full_end = s_start + (s_end - s_start) // TS * TS
    em = tl.zeros((TC, TS), ACC)
    ev = tl.zeros((TC, TS), ACC)
    t = tl.zeros((), ACC)
    for s0 in range(s_start, full_end, TS):
        ss = s0 + offs_s
        xv = _load_tile(x_ptr, cc, ss, sxc, sxs, mc[:, None], ACC)
        t += 1.0
        d = xv - em
        em += d * (1.0 / t)
        ev += d * (xv - em)
    # rows past the group's channels saw zeros: they leave the merge with count 0
    ec = tl.where(mc[:, None], t, 0.0) + tl.zeros((TC, TS), ACC)
    cnt, mean, m2 = tl.reduce((ec, em, ev), 1, _chan_merge)
    cnt, mean, m2 = tl.reduce((cnt, mean, m2), 0, _chan_merge)
    if full_end < s_end:
        ss = full_end + offs_s
        m = mc[:, None] & (ss < s_end)[None, :]
        xv = _load_tile(x_ptr, cc, ss, sxc, sxs, m, ACC)
        nb = (tl.minimum(Cg - c0, TC) * (s_end - full_end)).to(ACC)
        tm = tl.sum(xv) / nb
        d = tl.where(m, xv - tm, 0.0)
        cnt, mean, m2 = _chan_merge(cnt, mean, m2, nb, tm, tl.sum(d * d))
    return cnt, mean, m2


@triton.jit
def _moments(
    x_ptr,
    sxc,
    sxs,
    Cg,
    s_start,
    s_end,
    ONE_C: tl.constexpr,
    ACC: tl.constexpr,
    TC: tl.constexpr,
    TS: tl.constexpr,
):
    """(count, mean, M2) over channels [0, Cg) and positions [s_start, s_end) of one group.

    ONE_C: the group's channels fit one channel tile (every ADM GroupNorm), so no channel loop;
    ptxas spills a register around the nested loops otherwise.
    """
    if ONE_C:
        cnt, mean, m2 = _ctile_moments(x_ptr, sxc, sxs, 0, Cg, s_start, s_end, ACC, TC, TS)
    else:
        cnt = tl.zeros((), ACC)
        mean = tl.zeros((), ACC)
        m2 = tl.zeros((), ACC)
        for c0 in range(0, Cg, TC):
            tc_, tm, tv = _ctile_moments(x_ptr, sxc, sxs, c0, Cg, s_start, s_end, ACC, TC, TS)
            cnt, mean, m2 = _chan_merge(cnt, mean, m2, tc_, tm, tv)
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
    ONE_C: tl.constexpr,
    ACC: tl.constexpr,
    TC: tl.constexpr,
    TS: tl.constexpr,
    CG_ALIGN: tl.constexpr,
):
    """Split path, pass 1: moments of chunk k of group pid -> part[pid, k, (count, mean, M2)]."""
    Cg = _aligned(Cg, CG_ALIGN)
    g, n, k, pid = _program(G)
    base = _group(x_ptr, n, g, Cg, sxn, sxc)
    s_start = k * CHUNK_S
    cnt, mean, m2 = _moments(
        base, sxc, sxs, Cg, s_start, tl.minimum(s_start + CHUNK_S, S), ONE_C, ACC, TC, TS
    )
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


@triton.jit
def _coefs(
    chan,
    n,
    ch,
    mc,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    TC: tl.constexpr,
):
    """(weight, bias, 1 + scale, shift) of channels ch of sample n; 1, 0, 1, 0 where absent.

    chan: (w_ptr, b_ptr, sc_ptr, sh_ptr, sscn, sscc, sshn, sshc), the kernel's per-channel inputs.
    """
    w_ptr, b_ptr, sc_ptr, sh_ptr, sscn, sscc, sshn, sshc = chan
    w = _load_chan(w_ptr, ch, mc, HAS_W, 1.0, ACC, TC)
    b = _load_chan(b_ptr, ch, mc, HAS_B, 0.0, ACC, TC)
    s1 = 1.0 + _load_chan(sc_ptr + n.to(tl.int64) * sscn, ch * sscc, mc, HAS_SCALE, 0.0, ACC, TC)
    sh = _load_chan(sh_ptr + n.to(tl.int64) * sshn, ch * sshc, mc, HAS_SHIFT, 0.0, ACC, TC)
    return w, b, s1, sh


@triton.jit
def _norm_act(xv, mean, rstd, w, b, s1, sh, SILU: tl.constexpr):
    """act(((x - mean) * rstd * w + b) * (1 + scale) + shift) as one multiply-add per element."""
    z = (xv - mean) * (rstd * w * s1)[:, None] + (b * s1 + sh)[:, None]
    if SILU:
        z = z * tl.sigmoid(z)
    return z


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
    RESIDENT: tl.constexpr,
    ONE_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    TC: tl.constexpr,
    TS: tl.constexpr,
    CG_ALIGN: tl.constexpr,
):
    """Normalize chunk k of group pid; statistics from the chunk partials or (unsplit) computed here.

    RESIDENT: the group is this one [TC, TS] tile, read once (statistics and output from registers).
    """
    Cg = _aligned(Cg, CG_ALIGN)
    g, n, k, pid = _program(G)
    chan = (w_ptr, b_ptr, sc_ptr, sh_ptr, sscn, sscc, sshn, sshc)
    xb = _group(x_ptr, n, g, Cg, sxn, sxc)
    yb = _group(y_ptr, n, g, Cg, syn, syc)
    offs_c = tl.arange(0, TC)
    offs_s = tl.arange(0, TS)
    if RESIDENT:
        mc = offs_c < Cg
        m = mc[:, None] & (offs_s < S)[None, :]
        xv = _load_tile(xb, offs_c, offs_s, sxc, sxs, m, ACC)
        mean = tl.sum(xv) / (Cg * S).to(ACC)
        d = tl.where(m, xv - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d) / (Cg * S).to(ACC) + eps)
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)
        w, b, s1, sh = _coefs(chan, n, g * Cg + offs_c, mc, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, ACC, TC)
        z = _norm_act(xv, mean, rstd, w, b, s1, sh, SILU)
        _store_tile(yb, offs_c, offs_s, syc, sys, z, m)
    else:
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
            cnt, mean, m2 = _moments(xb, sxc, sxs, Cg, 0, S, ONE_C, ACC, TC, TS)
        rstd = 1.0 / tl.sqrt(m2 / cnt + eps)
        if k == 0:
            tl.store(mean_ptr + pid, mean)
            tl.store(rstd_ptr + pid, rstd)
        s_start = k * CHUNK_S
        s_end = tl.minimum(s_start + CHUNK_S, S)
        for c0 in range(0, TC if ONE_C else Cg, TC):  # ONE_C: a single pass, no loop for ptxas
            cc = c0 + offs_c
            mc = cc < Cg
            w, b, s1, sh = _coefs(chan, n, g * Cg + cc, mc, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, ACC, TC)
            for s0 in range(s_start, s_end, TS):
                ss = s0 + offs_s
                m = mc[:, None] & (ss < s_end)[None, :]
                xv = _load_tile(xb, cc, ss, sxc, sxs, m, ACC)
                z = _norm_act(xv, mean, rstd, w, b, s1, sh, SILU)
                _store_tile(yb, cc, ss, syc, sys, z, m)


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
        xv = _load_tile(xb, cc, ss, sxc, sxs, m, ACC)
        dyv = _load_tile(dyb, cc, ss, sdc, sds, m, ACC)
        xhat, dz = _dz(xv, dyv, mean, rstd, w, b, s1, sh, SILU)
        dz = tl.where(m, dz, 0.0)
        sa += tl.sum(dz, 1)
        sb += tl.sum(dz * xhat, 1)
    return sa, sb


@triton.jit
def _store_sums(sums, ch, mc, NC, sa, sb):
    """A chunk's per-channel sums into its slice of sums[k, 0 | 1, n, c] (sums: &[k, 0, n, 0])."""
    tl.store(sums + ch, sa, mask=mc)
    tl.store(sums + NC + ch, sb, mask=mc)


@triton.jit
def _summed_chunks(sums, ch, mc, NC, K, ACC: tl.constexpr, TC: tl.constexpr):
    """Per channel: (sum dz, sum dz * xhat) added up over the K chunks of sums[k, 0 | 1, n, c]
    (sums: &[0, 0, n, 0])."""
    sa = tl.zeros((TC,), ACC)
    sb = tl.zeros((TC,), ACC)
    part = sums
    for _ in range(0, K):
        sa += tl.load(part + ch, mask=mc, other=0.0)
        sb += tl.load(part + NC + ch, mask=mc, other=0.0)
        part += 2 * NC
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
    g, n, k, pid = _program(G)
    chan = (w_ptr, b_ptr, sc_ptr, sh_ptr, sscn, sscc, sshn, sshc)
    xb = _group(x_ptr, n, g, Cg, sxn, sxc)
    dyb = _group(dy_ptr, n, g, Cg, sdn, sdc)
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
        w, b, s1, sh = _coefs(chan, n, ch, mc, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, ACC, TC)
        sa, sb = _chan_sums(
            xb, dyb, sxc, sxs, sdc, sds, cc, mc, s_start, s_end, mean, rstd, w, b, s1, sh, SILU, ACC, TC, TS
        )
        _store_sums(out, ch, mc, NC, sa, sb)


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
    RESIDENT: tl.constexpr,
    STORE_SUMS: tl.constexpr,
    ONE_C: tl.constexpr,
    ACC: tl.constexpr,
    TC: tl.constexpr,
    TS: tl.constexpr,
    CG_ALIGN: tl.constexpr,
):
    """dx for chunk k of group pid: dx = rstd * (dz*g - mean(dz*g) - xhat * mean(dz*g*xhat)), g = (1+s)w.

    FUSED (one chunk): the per-channel sums are computed here first, and stored for the parameter
    grads when STORE_SUMS; otherwise this program adds up the chunks' sums[k, 0 | 1, n, c] itself.
    RESIDENT: the group is this one [TC, TS] tile, so x and dy are read once.
    """
    Cg = _aligned(Cg, CG_ALIGN)
    g, n, k, pid = _program(G)
    chan = (w_ptr, b_ptr, sc_ptr, sh_ptr, sscn, sscc, sshn, sshc)
    C = G * Cg
    xb = _group(x_ptr, n, g, Cg, sxn, sxc)
    dyb = _group(dy_ptr, n, g, Cg, sdn, sdc)
    dxb = _group(dx_ptr, n, g, Cg, sgn, sgc)
    mean = tl.load(mean_ptr + pid).to(ACC)
    rstd = tl.load(rstd_ptr + pid).to(ACC)
    sums = sums_ptr + n * C
    offs_c = tl.arange(0, TC)
    offs_s = tl.arange(0, TS)
    if RESIDENT:
        mc = offs_c < Cg
        ch = g * Cg + offs_c
        m = mc[:, None] & (offs_s < S)[None, :]
        xv = _load_tile(xb, offs_c, offs_s, sxc, sxs, m, ACC)
        dyv = _load_tile(dyb, offs_c, offs_s, sdc, sds, m, ACC)
        w, b, s1, sh = _coefs(chan, n, ch, mc, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, ACC, TC)
        xhat, dz = _dz(xv, dyv, mean, rstd, w, b, s1, sh, SILU)
        dz = tl.where(m, dz, 0.0)
        sa = tl.sum(dz, 1)
        sb = tl.sum(dz * xhat, 1)
        if STORE_SUMS:
            _store_sums(sums, ch, mc, NC, sa, sb)
        gam = tl.where(mc, s1 * w, 0.0)
        c1 = tl.sum(gam * sa) / (Cg * S).to(ACC)
        c2 = tl.sum(gam * sb) / (Cg * S).to(ACC)
        dx = rstd * (dz * gam[:, None] - c1 - xhat * c2)
        _store_tile(dxb, offs_c, offs_s, sgc, sgs, dx, m)
    else:
        c1 = tl.zeros((), ACC)
        c2 = tl.zeros((), ACC)
        for c0 in range(0, TC if ONE_C else Cg, TC):  # ONE_C: a single pass, no loop for ptxas
            cc = c0 + offs_c
            mc = cc < Cg
            ch = g * Cg + cc
            w, b, s1, sh = _coefs(chan, n, ch, mc, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, ACC, TC)
            if FUSED:
                sa, sb = _chan_sums(
                    xb, dyb, sxc, sxs, sdc, sds, cc, mc, 0, S, mean, rstd, w, b, s1, sh, SILU, ACC, TC, TS
                )
                if STORE_SUMS:
                    _store_sums(sums, ch, mc, NC, sa, sb)
            else:
                sa, sb = _summed_chunks(sums, ch, mc, NC, tl.num_programs(2), ACC, TC)
            c1 += tl.sum(tl.where(mc, s1 * w * sa, 0.0))
            c2 += tl.sum(tl.where(mc, s1 * w * sb, 0.0))
        c1 = c1 / (Cg * S).to(ACC)
        c2 = c2 / (Cg * S).to(ACC)
        s_start = k * CHUNK_S
        s_end = tl.minimum(s_start + CHUNK_S, S)
        for c0 in range(0, Cg, TC):
            cc = c0 + offs_c
            mc = cc < Cg
            w, b, s1, sh = _coefs(chan, n, g * Cg + cc, mc, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT, ACC, TC)
            gam = (s1 * w)[:, None]
            for s0 in range(s_start, s_end, TS):
                ss = s0 + offs_s
                m = mc[:, None] & (ss < s_end)[None, :]
                xv = _load_tile(xb, cc, ss, sxc, sxs, m, ACC)
                dyv = _load_tile(dyb, cc, ss, sdc, sds, m, ACC)
                xhat, dz = _dz(xv, dyv, mean, rstd, w, b, s1, sh, SILU)
                dx = rstd * (dz * gam - c1 - xhat * c2)
                _store_tile(dxb, cc, ss, sgc, sgs, dx, m)


@triton.jit(do_not_specialize=["N", "K"])
def _param_grads_kernel(
    sums_ptr,
    w_ptr,
    b_ptr,
    sc_ptr,
    dw_ptr,
    db_ptr,
    dsc_ptr,
    dsh_ptr,
    N,
    C,
    K,
    sscn,
    sscc,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dweight, dbias [C] and dscale, dshift [N, C] from the chunks' sums[k, 0 | 1, n, c] (A = sum dz,
    B = sum dz * xhat): dweight = sum_n (1+s) B, dbias = sum_n (1+s) A, dscale = w B + b A, dshift = A.
    """
    cc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = cc < C
    NC = N * C
    w = _load_chan(w_ptr, cc, mc, HAS_W, 1.0, ACC, BLOCK_C)
    b = _load_chan(b_ptr, cc, mc, HAS_B, 0.0, ACC, BLOCK_C)
    dw = tl.zeros((BLOCK_C,), ACC)
    db = tl.zeros((BLOCK_C,), ACC)
    for n in range(0, N):
        sa, sb = _summed_chunks(sums_ptr + n * C, cc, mc, NC, K, ACC, BLOCK_C)
        s1 = 1.0 + _load_chan(sc_ptr + n * sscn, cc * sscc, mc, HAS_SCALE, 0.0, ACC, BLOCK_C)
        dw += s1 * sb
        db += s1 * sa
        if HAS_SCALE:
            tl.store(dsc_ptr + n * C + cc, (w * sb + b * sa).to(dsc_ptr.dtype.element_ty), mask=mc)
        if HAS_SHIFT:
            tl.store(dsh_ptr + n * C + cc, sa.to(dsh_ptr.dtype.element_ty), mask=mc)
    if HAS_W:
        tl.store(dw_ptr + cc, dw.to(dw_ptr.dtype.element_ty), mask=mc)
    if HAS_B:
        tl.store(db_ptr + cc, db.to(db_ptr.dtype.element_ty), mask=mc)


def _chan_arg(t: torch.Tensor | None, x: torch.Tensor):
    """(tensor to pass, present, stride_n, stride_c) for an optional [C] or [N, C] tensor."""
    if t is None:
        return x, False, 0, 0
    if t.dim() == 1:  # the kernels index weight/bias densely: a strided [C] view is copied
        return t.contiguous(), True, 0, 1
    return t, True, t.stride(0), t.stride(1)


def _setup(x, num_groups):
    n, c = x.shape[0], x.shape[1]
    xf, sxn, sxc, sxs, s = _flat(x)
    if c * s >= 2**31:
        raise ValueError(f"ada_group_norm: {c * s} elements per sample is over the int32 kernel limit")
    if n > 65535:  # the batch is the grid's second dimension
        raise ValueError(f"ada_group_norm: a batch of {n} is over the kernel limit of 65535")
    return xf, (sxn, sxc, sxs), n, c, c // num_groups, s


def _plan(x, groups: int, cg: int, s: int, num_chunks: int | None):
    """(K, chunk_s, TC, TS, resident): chunks per group and the tile. An unsplit group whose padded
    size fits _RESIDENT_ELEMS is one tile, so each kernel reads it once."""
    tc, ts = _tiles(cg, s)
    if x.numel() == 0:
        return 1, 1, tc, ts, False
    k, chunk_s = _chunks(_sms(x), groups, cg, s, ts, num_chunks)
    whole = triton.next_power_of_2(cg), triton.next_power_of_2(s)
    if k == 1 and whole[0] * whole[1] <= _RESIDENT_ELEMS:
        return k, chunk_s, *whole, True
    return k, chunk_s, tc, ts, False


def forward(x, num_groups, weight, bias, scale, shift, eps, activation, *, num_chunks=None):
    """-> (y, mean, rstd); mean/rstd [N, G] fp32 (fp64 for fp64 x); y like x (dtype, memory format).

    ``num_chunks`` overrides the split heuristic (tests force the split path with it).
    """
    xf, (sxn, sxc, sxs), n, c, cg, s = _setup(x, num_groups)
    groups = n * num_groups
    k, chunk_s, tc, ts, resident = _plan(x, groups, cg, s, num_chunks)
    align = _cg_align(cg, tc, sxc)
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
    part = new_output((groups, k, 3), dtype=acc_t, device=x.device) if k > 1 else mean
    if k > 1:
        _stats_kernel[(num_groups, n, k)](
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
            ONE_C=cg <= tc,
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
    _fwd_kernel[(num_groups, n, k)](
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
        RESIDENT=resident,
        ONE_C=cg <= tc,
        BLOCK_K=_MAX_CHUNKS,
        ACC=acc,
        TC=tc,
        TS=ts,
        CG_ALIGN=align,
        num_warps=warps,
    )
    return y, mean, rstd


def backward(
    dy,
    x,
    num_groups,
    weight,
    bias,
    scale,
    shift,
    mean,
    rstd,
    activation,
    *,
    param_grads=True,
    num_chunks=None,
):
    """-> (dx, dweight, dbias, dscale, dshift), None where the input was None or ``param_grads`` is
    False (a gradient by the input alone: classifier guidance); dx like x.

    The kernels produce per-(n, c) sums A = sum dz, B = sum dz * xhat (z: pre-activation), per
    chunk; the parameter grads are reductions of those in one more launch.
    """
    xf, (sxn, sxc, sxs), n, c, cg, s = _setup(x, num_groups)
    groups = n * num_groups
    k, chunk_s, tc, ts, resident = _plan(x, groups, cg, s, num_chunks)
    align = _cg_align(cg, tc, sxc)
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
    sums = new_output((k, 2, n, c), dtype=acc_t, device=x.device) if k > 1 or param_grads else mean
    if x.numel() == 0:
        sums.zero_()
    elif k > 1:
        _bwd_sums_kernel[(num_groups, n, k)](
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
    if x.numel():
        _bwd_dx_kernel[(num_groups, n, k)](
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
            RESIDENT=resident,
            STORE_SUMS=param_grads and k == 1,  # split: the sums kernel stored them
            ONE_C=cg <= tc,
            **flags,
            num_warps=dx_warps,
        )
    if not param_grads:
        return dx, None, None, None, None
    return (dx, *_param_grads(sums, weight, bias, scale, shift, acc))


def _param_grads(sums, weight, bias, scale, shift, acc):
    """(dweight, dbias, dscale, dshift) from the chunks' sums [K, 2, N, C], None where absent."""
    k, _, n, c = sums.shape
    grads = [
        None if t is None else new_output(tuple(t.shape), dtype=t.dtype, device=sums.device)
        for t in (weight, bias, scale, shift)
    ]
    if c == 0:
        return tuple(grads)
    w, has_w, _, _ = _chan_arg(weight, sums)
    b, has_b, _, _ = _chan_arg(bias, sums)
    sc, has_sc, sscn, sscc = _chan_arg(scale, sums)
    _param_grads_kernel[(_cdiv(c, _PARAM_BLOCK),)](
        sums,
        w,
        b,
        sc,
        *(sums if g is None else g for g in grads),
        n,
        c,
        k,
        sscn,
        sscc,
        HAS_W=has_w,
        HAS_B=has_b,
        HAS_SCALE=has_sc,
        HAS_SHIFT=shift is not None,
        ACC=acc,
        BLOCK_C=_PARAM_BLOCK,
    )
    return tuple(grads)
