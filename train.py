"""Entry point: `python train.py [group=option ...] [key=value ...] [+experiment=NAME]`.

Hydra composes configs/train.yaml with the chosen group options; trainer/entry/run.py does the rest.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from trainer.config import register_configs
from trainer.entry.cli import precheck

register_configs()


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from trainer.entry.run import run
    from trainer.errors import RunFailed

    try:
        return run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except RunFailed:  # one job of a sweep: its `error:` line is printed, and the other jobs go on
        if "optuna" in HydraConfig.get().sweeper._target_:
            raise  # Optuna's sweeper records a job that raised as a FAIL trial (a NaN return breaks its tell)
        return float("nan")  # Hydra's basic sweeper stops at a job that raised; NaN marks it failed


if __name__ == "__main__":
    precheck(sys.argv[1:])  # one-line errors for bad overrides, before Hydra creates a run directory
    main()
