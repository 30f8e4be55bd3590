"""``python -m denseseg``: the same as the ``denseseg`` command."""

import sys

from denseseg.cli import main

sys.exit(main())
