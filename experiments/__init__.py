"""The experiment runner: a grid of tasks x methods x seeds, each cell one ``train.py fit`` process.

    python -m experiments compare --tasks mnist_rotate mnist_label_shift \\
        --methods fedavg floral1 floral1_oracle --seeds 0 1 2 --rounds 100 --out results/mnist
    python -m experiments report  ...same arguments...   # the table of what is recorded, running nothing

It runs from a checkout (it needs ``train.py`` and ``conf/``), so it is not part of the installed package.
Modules: :mod:`experiments.cells` (the tasks, the methods and each cell's command), :mod:`experiments.record`
(reading a run's own record and judging whether it finished), :mod:`experiments.grid` (running cells side by
side, resuming them, progress, failures) and :mod:`experiments.report` (the table and the curves).
"""
