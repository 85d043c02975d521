"""``python -m sta_dist.integrations.fastvideo install|uninstall|status [--site-dir DIR]``:
write (or remove) a ``.pth`` line in site-packages that activates sta_dist's import hook at
every interpreter start, so FastVideo's ``FASTVIDEO_ATTENTION_BACKEND=SLIDING_TILE_ATTN``
runs sta_dist without a code change. The hook costs nothing until FastVideo imports its
STA module; ``STA_DIST_FASTVIDEO=0`` turns it off for one run."""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig

from .. import hook

PTH = "sta_dist_fastvideo.pth"


def pth_line() -> str:
    """One line, standard library only: load hook.py by path (importing sta_dist would
    import torch at every interpreter start) and activate it."""
    path = os.path.abspath(hook.__file__)
    return ("import importlib.util as _u; _s = _u.spec_from_file_location('sta_dist_fastvideo_hook', "
            f"{path!r}); _m = _u.module_from_spec(_s); _s.loader.exec_module(_m); _m.activate()\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sta_dist.integrations.fastvideo", description=__doc__)
    parser.add_argument("action", choices=("install", "uninstall", "status"))
    parser.add_argument("--site-dir", default=sysconfig.get_paths()["purelib"],
                        help="where the .pth goes (default: this interpreter's site-packages)")
    args = parser.parse_args(argv)
    target = os.path.join(args.site_dir, PTH)
    if args.action == "install":
        os.makedirs(args.site_dir, exist_ok=True)
        with open(target, "w") as f:
            f.write(pth_line())
        print(f"installed {target}: FASTVIDEO_ATTENTION_BACKEND=SLIDING_TILE_ATTN now runs sta_dist")
    elif args.action == "uninstall":
        if os.path.exists(target):
            os.remove(target)
            print(f"removed {target}")
        else:
            print(f"not installed ({target} does not exist)")
    else:
        print(f"{'installed' if os.path.exists(target) else 'not installed'}: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
