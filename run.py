#!/usr/bin/env python3
"""The session service's command line; ``python run.py --help`` lists the verbs."""

import sys

from workers.cli import main

if __name__ == "__main__":
    sys.exit(main())
