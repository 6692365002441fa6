// Fused adaptive GroupNorm (+ SiLU) kernels; see ada_group_norm.h for the contract.
//
// Both layouts reduce per (n, c) first: NCHW rows are contiguous, NHWC is read in tiles with
// the channel fastest, so every load is coalesced. Each reduction over H*W is split into S
// chunks written as partials (Chan/Welford states forward, plain fp32 sums backward); a small
// warp-per-group kernel combines channels and chunks, and folds everything into per-(n, c)
// coefficients so the elementwise pass is one FMA-ish expression per element.
//
// Forward:  reduce -> finalize (mean, rstd, coefficients) -> apply (y).
// Backward: prep (coefficients) -> reduce (sum dz, sum dz*xhat) -> finalize (dscale, dshift,
//           dx coefficients) [-> param grads] -> apply (dx).
#include "ada_group_norm.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstring>

namespace fastdiff {
namespace {

constexpr int kBlock = 256;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[V]) {
  if constexpr (sizeof(T) == 2 && V % 2 == 0) {
    // Pairs through 32-bit words keep the pack in registers (no local-memory copy).
    using Word = Pack<uint32_t, V / 2>;
    const Word w = *reinterpret_cast<const Word*>(p);
#pragma unroll
    for (int i = 0; i < V / 2; ++i) {
      T lo, hi;
      const uint16_t l = static_cast<uint16_t>(w.v[i] & 0xffffu);
      const uint16_t h = static_cast<uint16_t>(w.v[i] >> 16);
      memcpy(&lo, &l, 2);
      memcpy(&hi, &h, 2);
      out[2 * i] = to_float(lo);
      out[2 * i + 1] = to_float(hi);
    }
  } else {
    const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_float(pk.v[i]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// Accurate expf on purpose (no fast math): silu feeds the next conv, errors compound.
__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// One reduction state: forward (count, mean, m2), backward (sum dz, sum dz*xhat, unused).
struct Acc {
  float a, b, c;
};

struct FwdOp {
  static constexpr bool kNeedsDy = false;
  __device__ static void add(Acc& s, float x, float, const float4&) {
    // Welford; the approximate divide is ample for the running-mean increment.
    s.a += 1.0f;
    const float d = x - s.b;
    s.b += __fdividef(d, s.a);
    s.c += d * (x - s.b);
  }
  __device__ static Acc merge(const Acc& p, const Acc& q) {
    // Chan et al.; exact when either side is empty.
    const float n = p.a + q.a;
    if (n == 0.0f) return p;
    const float d = q.b - p.b;
    const float fq = __fdividef(q.a, n);  // 2 ulp; avoids the slow-path divide call
    return Acc{n, p.b + d * fq, p.c + q.c + d * d * p.a * fq};
  }
};

// Coefficients per (n, c) for the backward reduce: z = A*(x-mu) + B, xhat = (x-mu)*rstd,
// packed as float4 (A, mu, B, rstd).
template <bool kSilu>
struct BwdOp {
  static constexpr bool kNeedsDy = true;
  __device__ static void add(Acc& s, float x, float dy, const float4& cf) {
    const float xc = x - cf.y;
    float dz = dy;
    if (kSilu) {
      const float z = cf.x * xc + cf.z;
      const float sg = sigmoid(z);
      dz = dy * sg * (1.0f + z * (1.0f - sg));
    }
    s.a += dz;
    s.b += dz * (xc * cf.w);
  }
  __device__ static Acc merge(const Acc& p, const Acc& q) { return Acc{p.a + q.a, p.b + q.b, 0.0f}; }
};

template <class Op>
__device__ __forceinline__ Acc warp_reduce(Acc s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Acc o;
    o.a = __shfl_xor_sync(0xffffffffu, s.a, off);
    o.b = __shfl_xor_sync(0xffffffffu, s.b, off);
    o.c = __shfl_xor_sync(0xffffffffu, s.c, off);
    s = Op::merge(s, o);
  }
  return s;
}

// NCHW: one team of TS threads per (row = n*C + c, split). TS is 32 (a warp) for short rows
// so small H*W does not idle whole blocks, or the block (256) for long rows.
template <class Op, typename T, int V, int TS>
__global__ void __launch_bounds__(kBlock) reduce_rows_kernel(const T* __restrict__ x,
                                                             const T* __restrict__ dy,
                                                             const float4* __restrict__ coef,
                                                             int64_t rows, int64_t hw,
                                                             int64_t chunk, int splits,
                                                             float4* __restrict__ part) {
  constexpr int kTeams = kBlock / TS;
  const int64_t team = static_cast<int64_t>(blockIdx.x) * kTeams + threadIdx.x / TS;
  const int lane = threadIdx.x % TS;
  const bool active = team < rows * splits;
  const int64_t row = active ? team / splits : 0;
  const int64_t sp = active ? team % splits : 0;
  Acc s{0.0f, 0.0f, 0.0f};
  if (active) {
    const float4 cf = Op::kNeedsDy ? coef[row] : make_float4(0.f, 0.f, 0.f, 0.f);
    const int64_t start = sp * chunk;
    const int64_t end = min(start + chunk, hw);
    const T* xr = x + row * hw;
    const T* dr = Op::kNeedsDy ? dy + row * hw : nullptr;
    for (int64_t i = start + static_cast<int64_t>(lane) * V; i < end; i += static_cast<int64_t>(TS) * V) {
      float xv[V];
      float dv[V];
      load_pack<T, V>(xr + i, xv);
      if (Op::kNeedsDy) load_pack<T, V>(dr + i, dv);
#pragma unroll
      for (int k = 0; k < V; ++k) Op::add(s, xv[k], Op::kNeedsDy ? dv[k] : 0.0f, cf);
    }
  }
  if (TS == 32) {
    if (!active) return;  // whole warp shares the team, so the warp exits together
    s = warp_reduce<Op>(s);
    if (lane == 0) part[sp * rows + row] = make_float4(s.a, s.b, s.c, 0.0f);
  } else {
    __shared__ Acc sm[kBlock / 32];
    s = warp_reduce<Op>(s);
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) sm[warp] = s;
    __syncthreads();
    if (warp == 0) {
      s = threadIdx.x < kBlock / 32 ? sm[threadIdx.x] : Acc{0.0f, 0.0f, 0.0f};
      s = warp_reduce<Op>(s);
      if (threadIdx.x == 0 && active) part[sp * rows + row] = make_float4(s.a, s.b, s.c, 0.0f);
    }
  }
}

// NHWC: block (bx, by), bx * by = 256; threadIdx.x covers V consecutive channels, threadIdx.y
// strides over H*W rows of one split; a tree over threadIdx.y combines the column.
template <class Op, typename T, int V>
__global__ void __launch_bounds__(kBlock) reduce_cl_kernel(const T* __restrict__ x,
                                                           const T* __restrict__ dy,
                                                           const float4* __restrict__ coef,
                                                           int64_t n_batch, int64_t channels,
                                                           int64_t hw, int64_t chunk,
                                                           float4* __restrict__ part) {
  __shared__ Acc sm[kBlock * V];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int bx = blockDim.x;
  const int by = blockDim.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * bx + tx) * V;
  const bool valid = c0 < channels;
  const int64_t sp = blockIdx.y;
  const int64_t nc_total = n_batch * channels;
  const int64_t start = sp * chunk;
  const int64_t end = min(start + chunk, hw);
  for (int64_t n = blockIdx.z; n < n_batch; n += gridDim.z) {
    Acc s[V];
    float4 cf[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      s[k] = Acc{0.0f, 0.0f, 0.0f};
      cf[k] = (Op::kNeedsDy && valid) ? coef[n * channels + c0 + k] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    if (valid) {
      for (int64_t r = start + ty; r < end; r += by) {
        const int64_t off = (n * hw + r) * channels + c0;
        float xv[V];
        float dv[V];
        load_pack<T, V>(x + off, xv);
        if (Op::kNeedsDy) load_pack<T, V>(dy + off, dv);
#pragma unroll
        for (int k = 0; k < V; ++k) Op::add(s[k], xv[k], Op::kNeedsDy ? dv[k] : 0.0f, cf[k]);
      }
    }
    const int me = (ty * bx + tx) * V;
#pragma unroll
    for (int k = 0; k < V; ++k) sm[me + k] = s[k];
    __syncthreads();
    for (int step = by / 2; step > 0; step >>= 1) {
      if (ty < step) {
        const int other = ((ty + step) * bx + tx) * V;
#pragma unroll
        for (int k = 0; k < V; ++k) sm[me + k] = Op::merge(sm[me + k], sm[other + k]);
      }
      __syncthreads();
    }
    if (ty == 0 && valid) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const Acc r = sm[me + k];
        part[sp * nc_total + n * channels + c0 + k] = make_float4(r.a, r.b, r.c, 0.0f);
      }
    }
    __syncthreads();  // sm is reused by the next n
  }
}

// One warp per (n, g): combine Cg channels x S splits, write mean/rstd and per-channel
// coefficients (A, mu, B, rstd) with y = act(A*(x - mu) + B).
__global__ void __launch_bounds__(kBlock) fwd_finalize_kernel(
    const float4* __restrict__ part, int splits, int64_t n_batch, int64_t channels, int64_t groups,
    int64_t hw, float eps, const float* __restrict__ weight, const float* __restrict__ bias,
    const float* __restrict__ scale, const float* __restrict__ shift, float* __restrict__ mean,
    float* __restrict__ rstd, float4* __restrict__ coef) {
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * (kBlock / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (ng >= n_batch * groups) return;
  const int64_t n = ng / groups;
  const int64_t cg = channels / groups;
  const int64_t c_begin = (ng % groups) * cg;
  const int64_t nc_total = n_batch * channels;
  Acc s{0.0f, 0.0f, 0.0f};
  for (int64_t i = lane; i < cg * splits; i += 32) {
    const int64_t c = c_begin + i / splits;
    const float4 p = part[(i % splits) * nc_total + n * channels + c];
    s = FwdOp::merge(s, Acc{p.x, p.y, p.z});
  }
  s = warp_reduce<FwdOp>(s);
  const float mu = s.b;
  const float var = fmaxf(s.c / static_cast<float>(cg * hw), 0.0f);
  const float r = rsqrtf(var + eps);
  if (lane == 0) {
    mean[ng] = mu;
    rstd[ng] = r;
  }
  for (int64_t c = c_begin + lane; c < c_begin + cg; c += 32) {
    const int64_t nc = n * channels + c;
    const float w = weight ? weight[c] : 1.0f;
    const float b = bias ? bias[c] : 0.0f;
    const float s1 = 1.0f + (scale ? scale[nc] : 0.0f);
    const float sh = shift ? shift[nc] : 0.0f;
    coef[nc] = make_float4(r * w * s1, mu, b * s1 + sh, r);
  }
}

template <typename T, int V, bool kChannelsLast, bool kSilu>
__global__ void __launch_bounds__(kBlock) fwd_apply_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                           const float4* __restrict__ coef,
                                                           int64_t n_batch, uint32_t channels,
                                                           uint32_t hw) {
  const uint32_t per = channels * hw;
  const uint32_t stride = gridDim.x * blockDim.x * V;
  for (int64_t n = blockIdx.y; n < n_batch; n += gridDim.y) {
    const T* xs = x + n * per;
    T* ys = y + n * per;
    const float4* cs = coef + n * channels;
    for (uint32_t i = (blockIdx.x * blockDim.x + threadIdx.x) * V; i < per; i += stride) {
      float v[V];
      load_pack<T, V>(xs + i, v);
      const uint32_t c = kChannelsLast ? i % channels : i / hw;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float4 cf = cs[kChannelsLast ? c + k : c];
        const float z = cf.x * (v[k] - cf.y) + cf.z;
        v[k] = kSilu ? z * sigmoid(z) : z;
      }
      store_pack<T, V>(ys + i, v);
    }
  }
}

// Thread per (n, c): backward coefficients from the saved statistics.
__global__ void bwd_prep_kernel(int64_t n_batch, int64_t channels, int64_t groups,
                                const float* __restrict__ weight, const float* __restrict__ bias,
                                const float* __restrict__ scale, const float* __restrict__ shift,
                                const float* __restrict__ mean, const float* __restrict__ rstd,
                                float4* __restrict__ coef) {
  const int64_t nc = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (nc >= n_batch * channels) return;
  const int64_t n = nc / channels;
  const int64_t c = nc % channels;
  const int64_t ng = n * groups + c / (channels / groups);
  const float w = weight ? weight[c] : 1.0f;
  const float b = bias ? bias[c] : 0.0f;
  const float s1 = 1.0f + (scale ? scale[nc] : 0.0f);
  const float sh = shift ? shift[nc] : 0.0f;
  const float r = rstd[ng];
  coef[nc] = make_float4(r * w * s1, mean[ng], b * s1 + sh, r);
}

// One warp per (n, g). With S1 = sum dz, S2 = sum dz*xhat per (n, c):
//   dshift = S1, dscale = w*S2 + b*S1, dxhat = dz*(1+s)*w,
//   dx = rstd*(dxhat - mean(dxhat) - xhat*mean(dxhat*xhat)) = P*dz + Q*(x - mu) + R.
__global__ void __launch_bounds__(kBlock) bwd_finalize_kernel(
    const float4* __restrict__ part, int splits, int64_t n_batch, int64_t channels, int64_t groups,
    int64_t hw, const float* __restrict__ weight, const float* __restrict__ bias,
    const float* __restrict__ scale, const float* __restrict__ mean, const float* __restrict__ rstd,
    float2* __restrict__ sums, float* __restrict__ dscale, float* __restrict__ dshift,
    float4* __restrict__ dcoef) {
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * (kBlock / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (ng >= n_batch * groups) return;
  const int64_t n = ng / groups;
  const int64_t cg = channels / groups;
  const int64_t c_begin = (ng % groups) * cg;
  const int64_t nc_total = n_batch * channels;
  float g1 = 0.0f;
  float g2 = 0.0f;
  for (int64_t c = c_begin + lane; c < c_begin + cg; c += 32) {
    const int64_t nc = n * channels + c;
    float s1 = 0.0f;
    float s2 = 0.0f;
    for (int sp = 0; sp < splits; ++sp) {
      const float4 p = part[sp * nc_total + nc];
      s1 += p.x;
      s2 += p.y;
    }
    sums[nc] = make_float2(s1, s2);
    const float w = weight ? weight[c] : 1.0f;
    const float b = bias ? bias[c] : 0.0f;
    if (dshift) dshift[nc] = s1;
    if (dscale) dscale[nc] = w * s2 + b * s1;
    const float k = (1.0f + (scale ? scale[nc] : 0.0f)) * w;
    g1 += k * s1;
    g2 += k * s2;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    g1 += __shfl_xor_sync(0xffffffffu, g1, off);
    g2 += __shfl_xor_sync(0xffffffffu, g2, off);
  }
  const float inv_m = 1.0f / static_cast<float>(cg * hw);
  const float r = rstd[ng];
  const float q = -r * r * g2 * inv_m;
  const float rr = -r * g1 * inv_m;
  for (int64_t c = c_begin + lane; c < c_begin + cg; c += 32) {
    const int64_t nc = n * channels + c;
    const float w = weight ? weight[c] : 1.0f;
    const float p = r * (1.0f + (scale ? scale[nc] : 0.0f)) * w;
    dcoef[nc] = make_float4(p, q, rr, mean[ng]);
  }
}

// Thread per channel: dweight = sum_n (1+s)*S2, dbias = sum_n (1+s)*S1 (fixed order).
__global__ void bwd_param_kernel(int64_t n_batch, int64_t channels, const float* __restrict__ scale,
                                 const float2* __restrict__ sums, float* __restrict__ dweight,
                                 float* __restrict__ dbias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  float dw = 0.0f;
  float db = 0.0f;
  for (int64_t n = 0; n < n_batch; ++n) {
    const int64_t nc = n * channels + c;
    const float k = 1.0f + (scale ? scale[nc] : 0.0f);
    const float2 s = sums[nc];
    dw += k * s.y;
    db += k * s.x;
  }
  if (dweight) dweight[c] = dw;
  if (dbias) dbias[c] = db;
}

template <typename T, int V, bool kChannelsLast, bool kSilu>
__global__ void __launch_bounds__(kBlock) bwd_apply_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
    const float4* __restrict__ coef, const float4* __restrict__ dcoef, int64_t n_batch,
    uint32_t channels, uint32_t hw) {
  const uint32_t per = channels * hw;
  const uint32_t stride = gridDim.x * blockDim.x * V;
  for (int64_t n = blockIdx.y; n < n_batch; n += gridDim.y) {
    const T* xs = x + n * per;
    const T* ds = dy + n * per;
    T* os = dx + n * per;
    const float4* cs = coef + n * channels;
    const float4* dcs = dcoef + n * channels;
    for (uint32_t i = (blockIdx.x * blockDim.x + threadIdx.x) * V; i < per; i += stride) {
      float xv[V];
      float dv[V];
      load_pack<T, V>(xs + i, xv);
      load_pack<T, V>(ds + i, dv);
      const uint32_t c = kChannelsLast ? i % channels : i / hw;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const uint32_t ck = kChannelsLast ? c + k : c;
        const float4 d = dcs[ck];  // (P, Q, R, mu)
        const float xc = xv[k] - d.w;
        float dz = dv[k];
        if (kSilu) {
          const float4 cf = cs[ck];
          const float z = cf.x * xc + cf.z;
          const float sg = sigmoid(z);
          dz *= sg * (1.0f + z * (1.0f - sg));
        }
        xv[k] = d.x * dz + d.y * xc + d.z;
      }
      store_pack<T, V>(os + i, xv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

int sm_count() {
  static int cache[128] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 128) return 108;
  if (cache[dev] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || v <= 0) v = 108;
    cache[dev] = v;
  }
  return cache[dev];
}

int elem_bytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }
int max_vec(DType t) { return 16 / elem_bytes(t); }
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align16(size_t v) { return (v + 15) & ~static_cast<size_t>(15); }

bool valid_shape(const AdaGNShape& s) {
  return s.N > 0 && s.C > 0 && s.HW > 0 && s.G > 0 && s.C % s.G == 0 && s.C * s.HW < (int64_t{1} << 31) &&
         (s.dtype == DType::kFloat32 || s.dtype == DType::kFloat16 || s.dtype == DType::kBFloat16);
}

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

int vec_width(const AdaGNShape& s, const void* a, const void* b, const void* c) {
  const int v = max_vec(s.dtype);
  const int64_t inner = s.channels_last ? s.C : s.HW;
  return (inner % v == 0 && aligned16(a) && aligned16(b) && aligned16(c)) ? v : 1;
}

// NHWC tile shape: enough channel lanes for the vectorised channels, rest over rows.
void cl_block(const AdaGNShape& s, int v, int* bx, int* by) {
  const int64_t cols = cdiv(s.C, v);
  int x = 1;
  while (x < 32 && x < cols) x <<= 1;
  *bx = x;
  *by = kBlock / x;
}

int64_t split_chunk(const AdaGNShape& s, int splits, int v) {
  int64_t chunk = cdiv(s.HW, splits);
  if (!s.channels_last) chunk = cdiv(chunk, v) * v;
  return chunk;
}

template <typename T, class Op>
void launch_reduce(const AdaGNShape& s, const T* x, const T* dy, const float4* coef, int v,
                   int splits, float4* part, cudaStream_t st) {
  const int64_t chunk = split_chunk(s, splits, v);
  constexpr int kVmax = 16 / sizeof(T);
  const int vmax = kVmax;
  if (s.channels_last) {
    int bx, by;
    cl_block(s, v, &bx, &by);
    const dim3 grid(static_cast<unsigned>(cdiv(cdiv(s.C, v), bx)), static_cast<unsigned>(splits),
                    static_cast<unsigned>(std::min<int64_t>(s.N, 65535)));
    const dim3 block(bx, by);
    if (v == vmax) {
      reduce_cl_kernel<Op, T, kVmax><<<grid, block, 0, st>>>(x, dy, coef, s.N, s.C, s.HW, chunk, part);
    } else {
      reduce_cl_kernel<Op, T, 1><<<grid, block, 0, st>>>(x, dy, coef, s.N, s.C, s.HW, chunk, part);
    }
    return;
  }
  const int64_t rows = s.N * s.C;
  const bool wide = chunk >= 2048;
  const int64_t teams = rows * splits;
  const unsigned grid = static_cast<unsigned>(wide ? teams : cdiv(teams, kBlock / 32));
#define FASTDIFF_ROWS(VV, TS) \
  reduce_rows_kernel<Op, T, VV, TS><<<grid, kBlock, 0, st>>>(x, dy, coef, rows, s.HW, chunk, splits, part)
  if (v == vmax) {
    if (wide) FASTDIFF_ROWS(kVmax, 256); else FASTDIFF_ROWS(kVmax, 32);
  } else {
    if (wide) FASTDIFF_ROWS(1, 256); else FASTDIFF_ROWS(1, 32);
  }
#undef FASTDIFF_ROWS
}

dim3 apply_grid(const AdaGNShape& s, int v) {
  return dim3(static_cast<unsigned>(cdiv(s.C * s.HW, int64_t{kBlock} * v)),
              static_cast<unsigned>(std::min<int64_t>(s.N, 65535)));
}

template <typename T, int V, bool CL>
void launch_fwd_apply_v(const AdaGNShape& s, const T* x, T* y, const float4* coef, cudaStream_t st) {
  const dim3 grid = apply_grid(s, V);
  const auto c = static_cast<uint32_t>(s.C);
  const auto hw = static_cast<uint32_t>(s.HW);
  if (s.act == Activation::kSiLU) {
    fwd_apply_kernel<T, V, CL, true><<<grid, kBlock, 0, st>>>(x, y, coef, s.N, c, hw);
  } else {
    fwd_apply_kernel<T, V, CL, false><<<grid, kBlock, 0, st>>>(x, y, coef, s.N, c, hw);
  }
}

template <typename T, int V, bool CL>
void launch_bwd_apply_v(const AdaGNShape& s, const T* dy, const T* x, T* dx, const float4* coef,
                        const float4* dcoef, cudaStream_t st) {
  const dim3 grid = apply_grid(s, V);
  const auto c = static_cast<uint32_t>(s.C);
  const auto hw = static_cast<uint32_t>(s.HW);
  if (s.act == Activation::kSiLU) {
    bwd_apply_kernel<T, V, CL, true><<<grid, kBlock, 0, st>>>(dy, x, dx, coef, dcoef, s.N, c, hw);
  } else {
    bwd_apply_kernel<T, V, CL, false><<<grid, kBlock, 0, st>>>(dy, x, dx, coef, dcoef, s.N, c, hw);
  }
}

// Dispatch on (vector width, layout) for the two elementwise passes.
template <typename T, int VMAX, bool CL>
void apply_dispatch(const AdaGNShape& s, int v, const T* x, T* y, const float4* coef, const T* dy,
                    const float4* dcoef, cudaStream_t st) {
  if (dy == nullptr) {
    if (v == VMAX) launch_fwd_apply_v<T, VMAX, CL>(s, x, y, coef, st);
    else launch_fwd_apply_v<T, 1, CL>(s, x, y, coef, st);
  } else {
    if (v == VMAX) launch_bwd_apply_v<T, VMAX, CL>(s, dy, x, y, coef, dcoef, st);
    else launch_bwd_apply_v<T, 1, CL>(s, dy, x, y, coef, dcoef, st);
  }
}

template <typename T>
void launch_apply(const AdaGNShape& s, int v, const T* x, T* y, const float4* coef, const T* dy,
                  const float4* dcoef, cudaStream_t st) {
  constexpr int kVmax = 16 / sizeof(T);
  if (s.channels_last) apply_dispatch<T, kVmax, true>(s, v, x, y, coef, dy, dcoef, st);
  else apply_dispatch<T, kVmax, false>(s, v, x, y, coef, dy, dcoef, st);
}

struct FwdWorkspace {
  float4* part;
  float4* coef;
};

struct BwdWorkspace {
  float4* part;
  float4* coef;
  float4* dcoef;
  float2* sums;
};

FwdWorkspace fwd_workspace(const AdaGNShape& s, int splits, void* ws) {
  auto* base = static_cast<char*>(ws);
  const size_t nc = static_cast<size_t>(s.N * s.C);
  FwdWorkspace w;
  w.part = reinterpret_cast<float4*>(base);
  w.coef = reinterpret_cast<float4*>(base + align16(splits * nc * sizeof(float4)));
  return w;
}

BwdWorkspace bwd_workspace(const AdaGNShape& s, int splits, void* ws) {
  auto* base = static_cast<char*>(ws);
  const size_t nc = static_cast<size_t>(s.N * s.C);
  BwdWorkspace w;
  size_t off = 0;
  w.part = reinterpret_cast<float4*>(base + off);
  off += align16(splits * nc * sizeof(float4));
  w.coef = reinterpret_cast<float4*>(base + off);
  off += align16(nc * sizeof(float4));
  w.dcoef = reinterpret_cast<float4*>(base + off);
  off += align16(nc * sizeof(float4));
  w.sums = reinterpret_cast<float2*>(base + off);
  return w;
}

template <typename T>
cudaError_t forward_impl(const AdaGNShape& s, const void* xv, const float* weight, const float* bias,
                         const float* scale, const float* shift, float eps, void* yv, float* mean,
                         float* rstd, int splits, void* workspace, cudaStream_t st) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  const FwdWorkspace w = fwd_workspace(s, splits, workspace);
  const int v = vec_width(s, x, y, nullptr);
  launch_reduce<T, FwdOp>(s, x, nullptr, nullptr, v, splits, w.part, st);
  const unsigned fgrid = static_cast<unsigned>(cdiv(s.N * s.G, kBlock / 32));
  fwd_finalize_kernel<<<fgrid, kBlock, 0, st>>>(w.part, splits, s.N, s.C, s.G, s.HW, eps, weight, bias,
                                                scale, shift, mean, rstd, w.coef);
  launch_apply<T>(s, v, x, y, w.coef, nullptr, nullptr, st);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_impl(const AdaGNShape& s, const void* dyv, const void* xv, const float* weight,
                          const float* bias, const float* scale, const float* shift, const float* mean,
                          const float* rstd, void* dxv, float* dweight, float* dbias, float* dscale,
                          float* dshift, int splits, void* workspace, cudaStream_t st) {
  const T* dy = static_cast<const T*>(dyv);
  const T* x = static_cast<const T*>(xv);
  T* dx = static_cast<T*>(dxv);
  const BwdWorkspace w = bwd_workspace(s, splits, workspace);
  const int v = vec_width(s, x, dy, dx);
  const int64_t nc = s.N * s.C;
  bwd_prep_kernel<<<static_cast<unsigned>(cdiv(nc, kBlock)), kBlock, 0, st>>>(
      s.N, s.C, s.G, weight, bias, scale, shift, mean, rstd, w.coef);
  if (s.act == Activation::kSiLU) {
    launch_reduce<T, BwdOp<true>>(s, x, dy, w.coef, v, splits, w.part, st);
  } else {
    launch_reduce<T, BwdOp<false>>(s, x, dy, w.coef, v, splits, w.part, st);
  }
  const unsigned fgrid = static_cast<unsigned>(cdiv(s.N * s.G, kBlock / 32));
  bwd_finalize_kernel<<<fgrid, kBlock, 0, st>>>(w.part, splits, s.N, s.C, s.G, s.HW, weight, bias, scale,
                                                mean, rstd, w.sums, dscale, dshift, w.dcoef);
  if (dweight || dbias) {
    bwd_param_kernel<<<static_cast<unsigned>(cdiv(s.C, kBlock)), kBlock, 0, st>>>(s.N, s.C, scale, w.sums,
                                                                                   dweight, dbias);
  }
  launch_apply<T>(s, v, x, dx, w.coef, dy, w.dcoef, st);
  return cudaGetLastError();
}

}  // namespace

int ada_group_norm_splits(const AdaGNShape& s, int requested) {
  if (requested > 0) return std::min(requested, 65535);
  if (!valid_shape(s)) return 1;
  const int64_t target = int64_t{sm_count()} * 2048;  // resident threads to aim for
  const int v = max_vec(s.dtype);
  int64_t want;
  int64_t cap;
  if (s.channels_last) {
    int bx, by;
    cl_block(s, v, &bx, &by);
    const int64_t blocks = s.N * cdiv(cdiv(s.C, v), bx);
    want = cdiv(target, blocks * kBlock);
    cap = std::min<int64_t>(cdiv(s.HW, int64_t{by} * 16), 512);  // >= ~16 rows per thread
  } else {
    want = cdiv(target, s.N * s.C * kBlock);
    cap = std::min<int64_t>(s.HW / 4096, 64);  // >= 4096 elements per split
  }
  return static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
}

size_t ada_group_norm_workspace_bytes(const AdaGNShape& s, int splits, bool backward) {
  const size_t nc = static_cast<size_t>(std::max<int64_t>(s.N * s.C, 0));
  const size_t part = align16(static_cast<size_t>(std::max(splits, 1)) * nc * sizeof(float4));
  if (!backward) return part + align16(nc * sizeof(float4));
  return part + 2 * align16(nc * sizeof(float4)) + align16(nc * sizeof(float2));
}

cudaError_t ada_group_norm_forward(const AdaGNShape& s, const void* x, const float* weight,
                                   const float* bias, const float* scale, const float* shift,
                                   float eps, void* y, float* mean, float* rstd, int splits,
                                   void* workspace, cudaStream_t stream) {
  if (!valid_shape(s) || splits < 1 || !x || !y || !mean || !rstd || !workspace) return cudaErrorInvalidValue;
  switch (s.dtype) {
    case DType::kFloat32:
      return forward_impl<float>(s, x, weight, bias, scale, shift, eps, y, mean, rstd, splits, workspace,
                                 stream);
    case DType::kFloat16:
      return forward_impl<__half>(s, x, weight, bias, scale, shift, eps, y, mean, rstd, splits, workspace,
                                  stream);
    case DType::kBFloat16:
      return forward_impl<__nv_bfloat16>(s, x, weight, bias, scale, shift, eps, y, mean, rstd, splits,
                                         workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t ada_group_norm_backward(const AdaGNShape& s, const void* dy, const void* x,
                                    const float* weight, const float* bias, const float* scale,
                                    const float* shift, const float* mean, const float* rstd,
                                    void* dx, float* dweight, float* dbias, float* dscale,
                                    float* dshift, int splits, void* workspace,
                                    cudaStream_t stream) {
  if (!valid_shape(s) || splits < 1 || !dy || !x || !dx || !mean || !rstd || !workspace) {
    return cudaErrorInvalidValue;
  }
  switch (s.dtype) {
    case DType::kFloat32:
      return backward_impl<float>(s, dy, x, weight, bias, scale, shift, mean, rstd, dx, dweight, dbias,
                                  dscale, dshift, splits, workspace, stream);
    case DType::kFloat16:
      return backward_impl<__half>(s, dy, x, weight, bias, scale, shift, mean, rstd, dx, dweight, dbias,
                                   dscale, dshift, splits, workspace, stream);
    case DType::kBFloat16:
      return backward_impl<__nv_bfloat16>(s, dy, x, weight, bias, scale, shift, mean, rstd, dx, dweight,
                                          dbias, dscale, dshift, splits, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastdiff
