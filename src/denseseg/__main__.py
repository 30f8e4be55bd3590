"""``python -m denseseg``: the same as the ``denseseg`` command."""

import os
import sys

from denseseg.cli import main

code = main()
if code and os.environ.get("TORCHELASTIC_RUN_ID"):
    # A worker of --nproc / torchrun that failed has printed its one line: leave now. Tearing
    # torch down can take seconds, and a peer that sees the broken collective first makes the
    # launcher SIGTERM this rank, which would then be reported as killed instead of failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
