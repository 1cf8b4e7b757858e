"""The command line (``sessiond``, ``python -m workers``, ``run.py``): one module per verb or
group of verbs, each adding itself with ``register(subparsers)``.
"""
