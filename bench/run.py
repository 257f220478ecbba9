"""The benchmark suite: one Markdown table on stdout and ``bench/results.json``.

    python -m bench                        # full sizes (several minutes)
    python -m bench --quick                # tiny sizes and few repeats (well under 2 minutes)
    python -m bench --only layers          # one section (repeatable: --only round --only scaling)
    python -m bench --out /tmp/results.json
    python -m bench --threads 0            # torch's own thread count (default: 1 intra-op thread)

Sections (each module's docstring says exactly how it measures):

- ``layers`` (bench/layers.py): training-step time of the naive, factorised and merged paths / bare base;
- ``round`` (bench/rounds.py): one round through Trainer + FederatedCallback / a hand-written PyTorch loop;
- ``fedavg_vs_floral`` (bench/rounds.py): FLoRAL round time / FedAvg round time;
- ``tasks`` (bench/tasks.py): s/round of every shipped task, FLoRAL and FedAvg, Trainer and hand-written floor
  (and vectorised rounds on the small tasks);
- ``evaluation`` (bench/evaluation.py): all clients' test sets with per-sample mixtures / one FedAvg model;
- ``scaling`` (bench/scaling.py): round time and memory as registered and sampled clients grow;
- ``startup`` (bench/startup.py): launching ``train.py fit`` to its first training step;
- ``distributed`` (bench/distributed.py, only with ``--only distributed``): round time with 1 and 2 CPU
  processes, the round-end collective's share of a round and its bytes.

Every timing is a median over interleaved repeats after a warm-up (``time.perf_counter``; process CPU time
is recorded beside it). The suite runs torch with ONE intra-op thread by default: on a machine where other
processes use the cores, several intra-op threads per process wait on each other at every parallel op and
timings inflate many-fold and erratically (measured here: a CifarCNN step 31 ms with 1 thread, 270 ms with
2 threads under a load average of 4 on 2 cores). One thread makes the ratios stable; it also makes compute
slower relative to fixed Python overheads than several threads would on an idle machine, so compare runs
at the same ``--threads`` only (the JSON records it, with the load average at start and end).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.common import ROOT, Section, bench_command, machine_info, quiet_lightning

SECTIONS = ("layers", "round", "fedavg_vs_floral", "tasks", "evaluation", "scaling", "startup")
#: sections run only when named with --only (they launch several processes per configuration)
OPT_IN = ("distributed",)


def _layers(quick: bool) -> list[Section]:
    from bench import layers

    return [layers.run(quick)]


def _rounds(quick: bool) -> list[Section]:
    from bench import rounds

    return rounds.run(quick)


def _tasks(quick: bool) -> list[Section]:
    from bench import tasks

    return [tasks.run(quick)]


def _evaluation(quick: bool) -> list[Section]:
    from bench import evaluation

    return [evaluation.run(quick)]


def _scaling(quick: bool) -> list[Section]:
    from bench import scaling

    return [scaling.run(quick)]


def _distributed(quick: bool) -> list[Section]:
    from bench import distributed

    return distributed.run(quick)


def _startup(quick: bool) -> list[Section]:
    from bench import startup

    return [startup.run(quick)]


# which function produces which sections (round and fedavg_vs_floral share one measurement)
RUNNERS: list[tuple[tuple[str, ...], Callable[[bool], list[Section]]]] = [
    (("layers",), _layers),
    (("round", "fedavg_vs_floral"), _rounds),
    (("tasks",), _tasks),
    (("evaluation",), _evaluation),
    (("scaling",), _scaling),
    (("startup",), _startup),
    (("distributed",), _distributed),
]


def run_sections(only: set[str], quick: bool, threads: int) -> dict[str, Section]:
    """Run the requested sections in suite order, stamping each figure with the command that reproduces it."""
    out: dict[str, Section] = {}
    for names, runner in RUNNERS:
        if not only & set(names):
            continue
        start = time.perf_counter()
        sections = runner(quick)
        elapsed = time.perf_counter() - start
        for section in sections:
            if section.name not in only:
                continue
            section.seconds = elapsed
            command = bench_command(section.name, quick) + ("" if threads == 1 else f" --threads {threads}")
            for figure in section.figures:
                figure.command = command
            out[section.name] = section
        print(f"[bench] {'+'.join(names)}: {elapsed:.1f} s", file=sys.stderr, flush=True)
    return out


def _cell(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if abs(value) < 1e4 else f"{value:,.0f}"


def markdown_table(sections: dict[str, Section]) -> str:
    """Every figure of every section as one Markdown table."""
    lines = [
        "| section | figure | value | unit | ratio | target | met |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for name, section in sections.items():
        for f in section.figures:
            target = "-" if f.target is None else f"<= {f.target}"
            met = "-" if f.met is None else ("yes" if f.met else "**NO**")
            lines.append(
                f"| {name} | {f.name} | {_cell(f.value, 2)} | {f.unit} | {_cell(f.ratio)} | {target} | {met} |"
            )
    return "\n".join(lines)


def load_warning(threads: int) -> str | None:
    """A warning when other processes already occupy the cores this run's threads need."""
    if not hasattr(os, "getloadavg") or threads < 2:
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load + threads <= cores + 0.5:
        return None
    return (
        f"load average {load:.1f} on {cores} cores with {threads} torch threads: other processes compete for "
        "the cores, which inflates multi-threaded timings erratically; consider --threads 1"
    )


def results_json(
    sections: dict[str, Section], args: argparse.Namespace, info: dict, wall: float, notes: list[str]
) -> dict:
    """The JSON document: machine, settings, every section's method, parameters and figures, a summary."""
    targeted = [(n, f) for n, s in sections.items() for f in s.figures if f.target is not None]
    if hasattr(os, "getloadavg"):
        info["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return {
        "suite": "floral-lightning benchmarks",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "machine": info,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "wall_seconds": round(wall, 1),
        "notes": notes,
        "summary": {
            "targets": len(targeted),
            "met": sum(bool(f.met) for _, f in targeted),
            "missed": [f"{n}: {f.name}" for n, f in targeted if not f.met],
        },
        "sections": {name: section.as_dict() for name, section in sections.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats")
    choices = SECTIONS + OPT_IN
    parser.add_argument("--only", action="append", choices=choices, metavar="SECTION", help=f"one of {choices}")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"), help="where to write the JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0: torch's default")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the subprocesses (memory, start-up) follow suit
    quiet_lightning()
    info = machine_info()  # now: its load average is the one at the start
    notes = []
    warning = load_warning(torch.get_num_threads())
    if warning:
        print(f"[bench] warning: {warning}", file=sys.stderr)
        notes.append(warning)
    start = time.perf_counter()
    sections = run_sections(set(args.only or SECTIONS), args.quick, args.threads)
    wall = time.perf_counter() - start
    print(markdown_table(sections))
    results = results_json(sections, args, info, wall, notes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['summary']['met']}/{results['summary']['targets']} targets met; {wall:.0f} s; wrote {out}")
    return results


if __name__ == "__main__":
    main()
