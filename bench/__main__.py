"""``python -m bench``: run the benchmark suite (options: ``--quick``, ``--only SECTION``, ``--out PATH``)."""

from bench.run import main

main()
