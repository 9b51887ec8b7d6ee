"""`python -m icpgate` is the `icpgate` command."""

import sys

from .cli.main import main

sys.exit(main())
