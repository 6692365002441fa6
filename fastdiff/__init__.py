"""fastdiff: ADM (guided-diffusion) sampling, made fast.

Importing the package is cheap and needs neither CUDA, triton nor TensorRT; the
heavy pieces live in the subpackages (models, diffusion, ops, engines, training).
"""

__version__ = "0.1.0"
