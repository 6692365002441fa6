"""Errors of the diffusion layer."""


class SamplingError(RuntimeError):
    """A sampling loop produced NaN/Inf; the message names the first bad step."""
