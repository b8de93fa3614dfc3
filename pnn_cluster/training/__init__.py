"""Training: the trainer loop, executors (micro-batch schedules) and callbacks."""

from pnn_cluster.training.trainer import (
    Callback,
    Executor,
    SequentialExecutor,
    StepResult,
    TrainConfig,
    Trainer,
    TrainerState,
)

__all__ = ["Callback", "Executor", "SequentialExecutor", "StepResult", "TrainConfig", "Trainer", "TrainerState"]
