"""``python -m harness [overrides]``: one run, an experiment, or a sweep (``-m``).

python -m harness                                 # the default run
python -m harness experiment=fcfs_vs_maxutil      # GUARANTEED_NO_EVICT vs MAX_UTILIZATION
python -m harness -m workload.rate=1,2,4 capacity_scheduler=guaranteed_no_evict,max_utilization
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from harness.config import register_configs, register_resolvers

register_configs()
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from harness.app import main as run

    return run(cfg)


if __name__ == "__main__":
    main()
