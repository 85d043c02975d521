"""``python -m sta_dist``: the ``sta-dist`` command."""

import sys

from .cli import main

sys.exit(main())
