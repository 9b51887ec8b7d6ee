"""`python -m icpgate` is the `icpgate` command."""

import sys

from .cli import main

sys.exit(main())
