"""fastdiff's compat modules under guided-diffusion's package names, for one process.

``install()`` puts ``guided_diffusion`` and its modules (``MODULES``: every module of the
original) in ``sys.modules`` as aliases of fastdiff's own module objects, so assigning
``script_util.NUM_CLASSES`` reaches the builders, and a finder ahead of every other that
answers an import of any other ``guided_diffusion.*`` module with an ImportError naming what is
provided, rather than reaching a real checkout on ``sys.path``. ``blobfile`` is served by a
local-files stand-in when the real package is not installed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

PACKAGE = "guided_diffusion"

# Submodule of the original -> the fastdiff module that provides its names.
MODULES = {
    "script_util": "fastdiff.compat.guided_diffusion",
    "dist_util": "fastdiff.compat.dist_util",
    "logger": "fastdiff.compat.logger",
    "unet": "fastdiff.compat.unet",
    "gaussian_diffusion": "fastdiff.compat.gaussian_diffusion",
    "respace": "fastdiff.compat.respace",
    "losses": "fastdiff.diffusion.losses",
    "nn": "fastdiff.compat.nn",
    "resample": "fastdiff.compat.resample",
    "image_datasets": "fastdiff.compat.image_datasets",
    "fp16_util": "fastdiff.compat.fp16_util",
    "train_util": "fastdiff.compat.train_util",
}


class _OnlyProvided(importlib.abc.MetaPathFinder):
    """Refuses any other ``guided_diffusion.*`` name (a user's module next to a real checkout)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == PACKAGE or fullname.startswith(PACKAGE + "."):
            provided = ", ".join(f"{PACKAGE}.{name}" for name in MODULES)
            raise ModuleNotFoundError(
                f"fastdiff provides {provided}; {fullname} is not among them", name=fullname
            )
        return None


def install() -> types.ModuleType:
    """Make ``import guided_diffusion...`` give fastdiff's modules in this process; returns the
    package. Idempotent."""
    package = sys.modules.get(PACKAGE)
    if getattr(package, "__fastdiff__", False):
        return package
    package = types.ModuleType(PACKAGE, "guided-diffusion's names, served by fastdiff.compat.")
    package.__path__ = []  # a package: submodules resolve through sys.modules and the finder
    package.__fastdiff__ = True
    for name in [k for k in sys.modules if k == PACKAGE or k.startswith(PACKAGE + ".")]:
        del sys.modules[name]  # a real checkout imported earlier must not answer
    for name, target in MODULES.items():
        module = importlib.import_module(target)
        sys.modules[f"{PACKAGE}.{name}"] = module
        setattr(package, name, module)
    sys.modules[PACKAGE] = package
    sys.meta_path.insert(0, _OnlyProvided())
    if importlib.util.find_spec("blobfile") is None:
        sys.modules["blobfile"] = importlib.import_module("fastdiff.compat.blobfile")
    return package
