"""Allow ``python -m shopfleet``."""

import sys

from shopfleet.cli import main

sys.exit(main())
