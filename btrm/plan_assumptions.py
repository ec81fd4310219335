"""What the memory plan assumes where neither a visible GPU nor an option says: shared by btrm.plan and its
light command line (btrm.plan_cli), which must not import the plan before its inputs are checked."""

DEFAULT_GPUS = 8  # without a visible GPU: the 8-GPU node trainer.yaml's budget is sized for
DEFAULT_GPU_MEMORY_GIB = 80.0  # without a visible GPU: H100-80GB, the smallest card the defaults target
