"""``python -m workers ...`` is the ``sessiond`` command line."""

import sys

from .cli.main import sessiond

sys.exit(sessiond())
