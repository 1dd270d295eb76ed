"""The contract between a launch plan and the processes it starts: the environment
variables `ftl launch` / `ftl slurm` set and every `ftl train` rank reads, and the exit
codes a rank reports back. Both sides import these names from here, nothing else."""

from __future__ import annotations

ENV_WORLD = "FTL_WORLD_SIZE"  # the world size the plan launched (each rank checks it joined it)
ENV_STRATEGY = "FTL_STRATEGY"  # the strategy the plan configured accelerate for
ENV_LAUNCH_DIR = "FTL_LAUNCH_DIR"  # ranks leave their exit code there (exit-<rank>)

EXIT_USER_ERROR = 2  # a problem the user can fix: recipe, data, command line
EXIT_STOPPED = 3  # stopped by a signal after saving a checkpoint: resume with --resume auto
