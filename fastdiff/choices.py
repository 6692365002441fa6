"""The names a user picks a sampler, an engine, a compute dtype, a training precision or the
kernels by, without importing torch.

Every command lists them in its --help, which starts in a fraction of a second only while it
imports no torch; the registries (fastdiff.diffusion.SAMPLERS, fastdiff.engines.ENGINES,
fastdiff.engines.sampler.DTYPES) hold the same names in the same order (a test checks).
"""

SAMPLER_NAMES = ("ddim", "ddpm", "dpm++2m")
ENGINE_NAMES = ("eager", "compile", "graph", "graph-loop", "parallel", "onnx", "trt")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
PRECISIONS = ("fp32", "bf16", "fp16")  # training's, fastdiff.training.TrainConfig's own
OPS_MODES = ("auto", "reference", "triton")  # FASTDIFF_OPS's (gd-run --ops sets it)
