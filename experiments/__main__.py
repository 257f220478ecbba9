"""``python -m experiments compare|report ...``: see :mod:`experiments.grid`."""

from experiments.grid import main

if __name__ == "__main__":
    raise SystemExit(main())
