// Fused adaptive GroupNorm (+ SiLU) for fastdiff: plain CUDA C++ interface.
//
//   y = act((GN(x) * weight + bias) * (1 + scale) + shift),  statistics in fp32.
//
// This header deliberately has no torch dependency so the kernels can be compiled (and
// checked in CI) with nvcc alone; csrc/binding.cpp is the thin torch adapter.
//
// Layout: x is [N, C, *spatial] with HW = prod(spatial) (1 allowed), either NCHW-contiguous
// or channels-last (NHWC: channel fastest). dy/dx/y use the same layout as x.
// weight/bias are fp32 [C], scale/shift fp32 [N, C] contiguous; any may be nullptr
// (weight = 1, bias = 0, scale = 0, shift = 0). mean/rstd are fp32 [N, G].
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace fastdiff {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class Activation : int { kNone = 0, kSiLU = 1 };

struct AdaGNShape {
  int64_t N = 0;
  int64_t C = 0;
  int64_t HW = 0;
  int64_t G = 0;
  bool channels_last = false;
  DType dtype = DType::kFloat32;
  Activation act = Activation::kNone;
};

// Number of blocks each reduction over H*W is split into (the partial results are combined
// by a second kernel). requested > 0 forces a value (tests); 0 picks one that fills the GPU.
int ada_group_norm_splits(const AdaGNShape& s, int requested);

// Scratch bytes the forward/backward launch needs for a given split count
// (allocate with the caller's allocator; 16-byte aligned).
size_t ada_group_norm_workspace_bytes(const AdaGNShape& s, int splits, bool backward);

// Returns cudaSuccess or the first launch error; cudaErrorInvalidValue for bad arguments.
cudaError_t ada_group_norm_forward(const AdaGNShape& s, const void* x, const float* weight,
                                   const float* bias, const float* scale, const float* shift,
                                   float eps, void* y, float* mean, float* rstd, int splits,
                                   void* workspace, cudaStream_t stream);

// Outputs other than dx may be nullptr (not computed). dweight/dbias are [C], dscale/dshift
// [N, C], all fp32.
cudaError_t ada_group_norm_backward(const AdaGNShape& s, const void* dy, const void* x,
                                    const float* weight, const float* bias, const float* scale,
                                    const float* shift, const float* mean, const float* rstd,
                                    void* dx, float* dweight, float* dbias, float* dscale,
                                    float* dshift, int splits, void* workspace,
                                    cudaStream_t stream);

}  // namespace fastdiff
