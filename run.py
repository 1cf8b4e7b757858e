#!/usr/bin/env python3
"""The session service's command line from a checkout: ``python run.py VERB`` is ``sessiond VERB``.

One verb more than the installed ``sessiond``: ``python run.py bench`` runs the benchmarks in
this checkout's ``bench/`` directory (``make bench`` calls it).
"""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        from bench.run import command_line

        sys.exit(command_line(sys.argv[2:]))
    from workers.cli.main import main

    sys.exit(main())
