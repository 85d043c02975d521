"""Import hook that serves sta_dist's modules under a client's module names.

Standard library only: the ``.pth`` line that ``python -m sta_dist.integrations.fastvideo
install`` writes loads this file by path at every interpreter start, so it must cost
nothing until the client itself imports the module (then sta_dist and torch load).
``STA_DIST_FASTVIDEO=0`` turns it off without uninstalling.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys

SERVED = {
    # FastVideo's selector resolves this name, and its denoising stage compares the
    # selected backend with this module's class: both must get sta_dist's.
    "fastvideo.attention.backends.sliding_tile_attn": "sta_dist.integrations.fastvideo.backend",
}
FALLBACK = {
    # FastVideo's CUDA platform imports the kernel package before it selects STA; served
    # only where the real package is not installed.
    "fastvideo_kernel": "sta_dist.integrations.fastvideo.kernel",
}
AFTER_IMPORT = {
    # patched once FastVideo has defined them (search at any resolution, tile mode)
    "fastvideo.pipelines.stages.denoising": "sta_dist.integrations.fastvideo.search:patch_denoising_stage",
    "fastvideo.distributed.communication_op": "sta_dist.integrations.fastvideo.parallel:patch_communication_op",
    "fastvideo.attention.layer": "sta_dist.integrations.fastvideo.parallel:patch_attention_layer",
}


class _Alias(importlib.abc.Loader):
    """Loads ``target`` and hands that module out under the requested name."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        pass


class _After(importlib.abc.Loader):
    """Runs the real loader, then ``callback(module)``."""

    def __init__(self, loader, callback: str):
        self.loader, self.callback = loader, callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        target, _, func = self.callback.partition(":")
        getattr(importlib.import_module(target), func)(module)


class Finder(importlib.abc.MetaPathFinder):
    """``first=True``: consulted before the path finder (served names, after-import
    patches); ``first=False``: after it (fallbacks for packages that are not installed)."""

    def __init__(self, first: bool):
        self.first = first

    def find_spec(self, fullname, path=None, target=None):
        if os.environ.get("STA_DIST_FASTVIDEO", "1") == "0":
            return None
        if not self.first:
            if fullname in FALLBACK:
                return importlib.machinery.ModuleSpec(fullname, _Alias(FALLBACK[fullname]))
            return None
        if fullname in SERVED:
            return importlib.machinery.ModuleSpec(fullname, _Alias(SERVED[fullname]))
        if fullname in AFTER_IMPORT:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _After(spec.loader, AFTER_IMPORT[fullname])
            return spec
        return None


def activate() -> None:
    """Put the finders on ``sys.meta_path`` (once per process)."""
    if any(getattr(f, "_sta_dist_hook", False) for f in sys.meta_path):
        return
    first, last = Finder(first=True), Finder(first=False)
    first._sta_dist_hook = last._sta_dist_hook = True  # type: ignore[attr-defined]
    sys.meta_path.insert(0, first)
    sys.meta_path.append(last)
