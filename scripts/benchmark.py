"""An honest optimizer benchmark: every optimizer tuned alike, compared at the end of full runs, across
budgets and model sizes, with the speedup as data saved and its interval (docs/comparing.md).

    python scripts/benchmark.py                                 # configs/benchmark/cpu.yaml, about 2 hours
    python scripts/benchmark.py --dry-run                       # the run count and the estimated time only
    python scripts/benchmark.py --preset smoke --out /tmp/bsmoke  # the whole pipeline in minutes
    python scripts/benchmark.py trials=16 seeds=[1,2,3,4]       # preset keys, overridden
    python scripts/benchmark.py --preset my.yaml --hydra +launcher=slurm --hydra hydra.launcher.partition=gpu
    python scripts/benchmark.py --report-only --report docs/benchmark   # the report again, from the runs

Run it again to continue a killed benchmark: finished runs are read from their directories, not repeated.
The protocol is in trainer/lab/benchmark/ (one module per idea); its presets are in configs/benchmark/.
"""

import sys

from trainer.lab.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
