"""``seeded_run.py SEED SCRIPT ARGS...``: run a guided-diffusion script (the original's, unedited)
with Python's, numpy's and torch's RNGs seeded to SEED as its work starts, at the log line that
begins it (sampling, loading the base samples, the data loader). Written for fastdiff's tests:
the two codebases' network builders draw differently, so seeding afterwards makes plain
``python`` on a checkout and ``fastdiff gd-run`` draw the same labels, noise and data."""

import random
import runpy
import sys

import numpy as np
import torch as th
from guided_diffusion import logger

WORK_STARTS = ("sampling...", "creating samples...", "creating data loader...")


def main():
    seed, script = int(sys.argv[1]), sys.argv[2]
    log = logger.log

    def seeding_log(*args, **kwargs):
        log(*args, **kwargs)
        if args and args[0] in WORK_STARTS:
            random.seed(seed)
            np.random.seed(seed)
            th.manual_seed(seed)

    logger.log = seeding_log  # the scripts call logger.log through the module
    sys.argv = sys.argv[2:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
