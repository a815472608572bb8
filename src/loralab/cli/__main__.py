"""`python -m loralab.cli` (the studies' worker processes start themselves this way)."""

import sys

from . import main

sys.exit(main())
