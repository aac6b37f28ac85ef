"""``python -m residual_fast``: the command line (also under ``torchrun ... -m residual_fast``)."""

import sys

from .cli import main

sys.exit(main())
