"""`python -m slm.cli ...`, the same as the `slm` command."""

import sys

from slm.cli import main

sys.exit(main())
