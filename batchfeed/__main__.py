"""``python -m batchfeed`` is the ``batchfeed`` command."""

import sys

from batchfeed.cli import main

sys.exit(main())
