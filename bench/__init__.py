"""The benchmark suite of floral-lightning: ``python -m bench`` (see ``bench/run.py``).

Sections: ``layers`` (training-step cost of the forward paths), ``round`` (Trainer round vs a hand-written
loop, FLoRAL vs FedAvg), ``evaluation`` (all clients at once vs one FedAvg model), ``scaling`` (registered
and sampled clients) and ``startup`` (process launch to first training step). Accuracy comparisons
of methods are the grid runner's (``python -m experiments``), not a benchmark.
"""
