"""The frozen configuration of a run. `run_experiment.py` builds it from flags; notebooks and
tests build it directly. Library code reads only this, never flags."""

from __future__ import annotations

import dataclasses
import json

from digits import model

GRADS = ("manual", "autodiff", "both")
OPTIMIZERS = ("gd", "sgd", "momentum", "nesterov", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "exponential", "warmup_cosine")
MODES = ("train", "gradcheck", "eval", "predict", "benchmark")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run depends on. Defaults are the seed network (784-10-10, 500 GD steps)."""

    # data
    dataset: str = "mnist"
    data_source: str = "auto"
    cache_dir: str = ""
    idx_dir: str = ""
    tfds_data_dir: str = ""
    tfds_download: bool = False
    validation_size: int = 10000
    train_examples: int = 0  # 0: the whole training split; >0: its first N (quick experiments)
    # model
    layer_sizes: tuple[int, ...] = (784, 10, 10)
    activation: str = "relu"
    output: str = "softmax"
    cost: str = "cross_entropy"
    init: str = "uniform"
    init_scale: float = 0.5
    l2: float = 0.0
    l2_per_example: bool = False  # Nielsen's network2: the penalty is lambda / n * 0.5 sum w^2
    # optimisation
    grad: str = "manual"
    optimizer: str = "gd"
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_rate: float = 0.5
    decay_steps: int = 0  # 0: one epoch
    batch_size: int = 0  # 0: full batch
    epochs: int = 0
    steps: int = 500  # used when epochs == 0
    steps_per_call: int = 0  # 0: up to the next evaluation
    eval_every: int = 0  # 0: every epoch (mini-batch) or every 50 steps (full batch)
    audit_every: int = 0
    seed: int = 0
    x64: bool = False
    num_seeds: int = 1
    sweep_learning_rates: tuple[float, ...] = ()
    # outputs
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 3

    def spec(self, train_size: int) -> model.MLPSpec:
        """The model spec; the L2 coefficient is divided by n when `l2_per_example` (Nielsen)."""
        l2 = self.l2 / train_size if self.l2_per_example else self.l2
        return model.MLPSpec(
            self.layer_sizes, self.activation, self.output, self.cost, self.init, self.init_scale, l2
        )

    @property
    def learning_rates(self) -> tuple[float, ...]:
        return self.sweep_learning_rates or (self.learning_rate,)

    @property
    def num_models(self) -> int:
        return self.num_seeds * len(self.learning_rates)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def training_fingerprint(self) -> str:
        """What must match for a workdir to be resumed (paths and bookkeeping may differ).

        The length of training may change (to train a finished run longer) unless a schedule
        depends on it.
        """
        ignored = {"cache_dir", "idx_dir", "tfds_data_dir", "tfds_download", "checkpoint_every",
                   "keep_checkpoints", "eval_every", "steps_per_call"}
        if self.schedule in ("constant", "exponential"):
            ignored |= {"epochs", "steps"}
        return json.dumps({k: v for k, v in self.to_dict().items() if k not in ignored}, sort_keys=True)
