"""The run's configuration tree: one frozen, strict model from the CLI (or YAML) down to each actor.

The trainer gets ``data``, ``model``, ``train`` and ``schedule``; the selector gets ``selector``, a union
discriminated by ``strategy`` so that a bad strategy config names exactly the branch and field at fault.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, ClassVar, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DATASETS = ("mnist5k", "digits", "synthetic", "cifar-shaped", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn")
MODELS = ("lenet", "mlp", "resnet18")
FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")  # package.module:function
MODEL_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # a torchvision model name such as mobilenet_v3_small


class Strict(BaseModel):
    """Base for every config and message: unknown fields are errors, instances are immutable, and a number is
    never a boolean (``epochs: true`` is an error, not 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_boolean_numbers(cls, data):
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                if isinstance(value, bool) and field is not None and field.annotation in NUMBERS:
                    raise ValueError(f"{name} == {value!r}, must be a number, not true or false")
        return data


NUMBERS = (int, float, int | None, float | None)


class DataConfig(Strict):
    dataset: str = Field(
        "mnist5k", description="data set: a built-in name, imagefolder:PATH, or package.module:function "
        "returning (train, val, test) datasets"
    )
    data_root: str | None = Field(
        None, description="folder holding torchvision data sets in torchvision's on-disk layout"
    )
    download: bool = Field(False, description="let torchvision download a missing data set")
    val_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="share of the training data held out for validation"
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=0.5, description="share held out for test when the data set has no test split"
    )
    synthetic_n: int = Field(2000, ge=20, description="examples in the synthetic and cifar-shaped data sets")
    augment: bool | None = Field(
        None, description="random crop and flip while training (default: on for CIFAR and SVHN)"
    )
    imbalance_classes: float = Field(
        0.0, ge=0, le=1, description="share of classes made rare in the training split (paper: 0.3)"
    )
    imbalance_drop: float = Field(
        0.0, ge=0, le=1, description="share of those classes' training examples removed (paper: 0.9)"
    )
    image_size: int | None = Field(
        None, ge=1, description="imagefolder only: resize every image to image_size x image_size pixels "
        "(default: none, all images must share one size)"
    )

    @field_validator("dataset")
    @classmethod
    def _dataset_known(cls, value: str) -> str:
        if value in DATASETS or FACTORY.match(value):
            return value
        if value.startswith("imagefolder:") and value[len("imagefolder:"):].strip():
            return value
        raise ValueError(
            f"dataset == {value!r}, must be one of {', '.join(DATASETS)}, imagefolder:PATH or package.module:function"
        )

    @model_validator(mode="after")
    def _image_size_for_imagefolder(self) -> "DataConfig":
        if self.image_size is not None and not self.dataset.startswith("imagefolder:"):
            raise ValueError(
                f"image_size == {self.image_size} applies to imagefolder:PATH data sets only, not to {self.dataset!r}"
            )
        return self


class ModelConfig(Strict):
    name: str = Field(
        "lenet", description="network: lenet, mlp, resnet18, any torchvision classification model name, or "
        "package.module:function(in_shape, n_classes) returning an nn.Module"
    )

    @field_validator("name")
    @classmethod
    def _name_well_formed(cls, value: str) -> str:
        if value in MODELS or MODEL_NAME.match(value) or FACTORY.match(value):
            return value
        raise ValueError(
            f"name == {value!r}, must be one of {', '.join(MODELS)}, a torchvision model name or package.module:function"
        )


class TrainConfig(Strict):
    epochs: int = Field(200, ge=1, description="epoch budget T (paper A.2.1)")
    batch_size: int = Field(32, ge=1, description="mini-batch size B")
    lr: float = Field(0.01, gt=0, description="initial SGD learning rate (cosine annealed)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads of the trainer (default: all cores but one, "
                                   "at least 1: one is left to the selector and Ray)")
    eval_every: int = Field(10, ge=1, description="epochs between validation evaluations")
    lr_schedule: Literal["epoch", "step"] = Field(
        "epoch", description="cosine annealing per epoch (the paper's) or per optimizer step"
    )
    checkpoint_every: int = Field(10, ge=1, description="epochs between checkpoints (and one at the end)")
    workers: int = Field(1, ge=1, description="data-parallel training workers (Ray Train); 1: one trainer actor")
    worker_cpus: float = Field(1.0, gt=0, description="CPUs each Ray Train worker reserves (--workers > 1)")

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device == {value!r}, must be auto, cpu, cuda or cuda:N")


class ScheduleConfig(Strict):
    """When rounds happen and how the trainer treats their answers (docs/design.md §3)."""

    budget: float = Field(0.1, gt=0, le=1, description="subset size as a share of the training set")
    kappa: float = Field(
        0.5, ge=0, le=1, description="warm start: share kappa*T of epochs on subsets (0: no warm start)"
    )
    select_every: int = Field(20, ge=1, description="R: epochs between selection rounds")
    lead: int | Literal["auto"] = Field(
        1, description="epochs before a boundary that its round starts (0: synchronous; auto: as few as the "
        "measured round and epoch times allow)"
    )
    on_late: Literal["continue", "wait"] = Field(
        "wait", description="at a boundary whose subset is not ready: wait for it (reproducible: the same seed "
        "gives the same subsets and accuracy) or keep training on the current one (continue: no stall, but "
        "the epoch of adoption depends on timing)"
    )
    divergence_guard: bool = Field(
        True, description="fall back to the previous subset when an adopted subset makes the training loss "
        "exceed max(10 x the loss before adoption, ln(C) / 4) for two epochs in a row without falling by a tenth (off: for ablations)"
    )
    round_timeout_s: float = Field(600.0, gt=0, description="a round not answered by then is failed")
    on_selector_loss: Literal["fail", "continue"] = Field(
        "fail", description="when the selector is gone for good: end the run with an error, or keep training "
        "on the current subset"
    )
    summary_workers: int = Field(
        0, ge=0, description="Ray actors that make the summary passes from a model snapshot (0: the trainer does)"
    )
    summary_threads: int = Field(1, ge=1, description="torch CPU threads of each summary worker")
    summary_precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="dtype of the summary passes' forward (autocast; the summaries are accumulated in "
        "float32): auto picks bf16 on a GPU that supports it (else fp16) and on a CPU with native bfloat16 "
        "(AVX512-BF16, AMX), else fp32; fp32 turns autocast off"
    )
    chunk_examples: int = Field(
        1024, ge=1, description="examples per streamed gradient chunk (and per forward pass of a summary pass)"
    )
    pool: float = Field(
        1.0, gt=0, le=1, description="share of the ground set (mini-batches for PB, examples otherwise) each round "
        "draws at random, summarises and chooses from; 1: all of it, as the paper"
    )

    @field_validator("lead", mode="before")
    @classmethod
    def _lead_value(cls, value):
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"lead == {value!r}, must be a whole number of epochs >= 0 or 'auto'")
        return value

    @property
    def max_lead(self) -> int:
        """The earliest a round may start, in epochs before its boundary (``auto``: right after the last one)."""
        return self.select_every if self.lead == "auto" else self.lead

    @model_validator(mode="after")
    def _lead_within_interval(self) -> "ScheduleConfig":
        if self.lead != "auto" and self.lead > self.select_every:
            raise ValueError(
                f"lead == {self.lead}, must be <= select_every ({self.select_every}): "
                "a round must start after the previous boundary"
            )
        return self


class SelectorBase(Strict):
    # What the strategy is and what it needs, declared once by each strategy's class (class attributes, not
    # config fields). The lists of strategy names below and the selector's ``StrategyPlan`` derive from them.
    paper_name: ClassVar[str] = ""  # its name in the paper's tables
    rounds: ClassVar[bool] = True  # runs selection rounds (FULL and FULL-EARLYSTOP train on all data)
    ground: ClassVar[Literal["example", "batch"]] = "example"  # chooses among examples or fixed mini-batches
    summaries: ClassVar[Literal["none", "example", "batch"]] = "none"  # what the trainer streams each round
    needs_validation: ClassVar[bool] = False  # the validation set's summaries too (``valid`` also asks for them)
    measure_only: ClassVar[bool] = False  # the summaries serve only to measure the Table 8 error
    online: ClassVar[bool] = False  # no rounds: the trainer re-draws a random subset every epoch

    threads: int = Field(1, ge=1, description="torch and BLAS threads of the selector (it shares cores with the trainer)")
    delay_s: float = Field(
        0.0, ge=0, description="extra seconds before each answer (to study late subsets)"
    )
    fault: Literal[
        "none", "wrong_round", "index_out_of_range", "negative_weight", "duplicate_index", "crash"
    ] = Field("none", description="deliberately answer badly (to exercise the trainer's fail-safe)")
    shards: int = Field(
        1, ge=1, description="selector actors that share the selection by class, each owning a set of classes "
        "(1: one selector; docs/scaling.md); fixed when the selector starts"
    )
    shard_cpus: float = Field(
        0.5, gt=0, description="CPUs each shard reserves in its placement-group bundle; a shard computes with "
        "max(1, floor(shard_cpus)) torch and BLAS threads"
    )
    shard_gpus: float = Field(0.0, ge=0, description="GPUs each shard reserves (0: shards compute on the CPU)")
    shard_placement: Literal["SPREAD", "STRICT_SPREAD", "PACK", "STRICT_PACK"] = Field(
        "SPREAD", description="placement-group strategy of the shards' bundles"
    )
    shard_resources: tuple[str, ...] = Field(
        (), description="custom node resources, one per shard: shard i reserves one unit of shard_resources[i], "
        "which pins it to the nodes started with that resource (default: none, placed by shard_placement)"
    )

    @model_validator(mode="after")
    def _one_resource_per_shard(self) -> "SelectorBase":
        if self.shard_resources and len(self.shard_resources) != self.shards:
            raise ValueError(
                f"shard_resources has {len(self.shard_resources)} entries, must have one per shard "
                f"(shards == {self.shards}) or none"
            )
        reserved = [name for name in self.shard_resources if not name.strip() or name in ("CPU", "GPU", "memory")]
        if reserved:
            raise ValueError(f"shard_resources == {list(self.shard_resources)}, must name custom node resources "
                             f"(not empty, CPU, GPU or memory): {reserved}")
        return self


class FullSelector(SelectorBase):
    paper_name, rounds = "FULL", False
    strategy: Literal["full"] = Field("full", description="FULL: train on all data, no selection")


class FullEarlyStopSelector(SelectorBase):
    paper_name, rounds = "FULL-EARLYSTOP", False
    strategy: Literal["full-earlystop"] = Field(
        "full-earlystop", description="FULL-EARLYSTOP: full training stopped at a time budget"
    )
    time_budget_s: float = Field(gt=0, description="seconds of training wall time before stopping")


class RandomSelector(SelectorBase):
    paper_name, summaries, measure_only = "RANDOM", "example", True
    strategy: Literal["random"] = Field(
        "random", description="RANDOM: one seeded uniform subset, fixed for the whole run"
    )


class RandomOnlineSelector(SelectorBase):
    paper_name, online = "RANDOM-ONLINE", True
    strategy: Literal["random-online"] = Field(
        "random-online", description="RANDOM-ONLINE: a seeded uniform subset re-drawn every epoch"
    )


class OMPOptions(SelectorBase):
    lam: float = Field(0.5, ge=0, description="ridge regularisation lambda of OMP (per-class GRAD-MATCH: 0.5)")
    eps: float = Field(1e-10, ge=0, description="OMP stops when the regularised error is below eps")
    positive: bool = Field(True, description="non-negative weights")
    valid: bool = Field(False, description="match the validation gradient instead of the training one")

    @field_validator("lam", "eps")
    @classmethod
    def _finite(cls, value: float, info) -> float:
        if not math.isfinite(value):
            raise ValueError(f"{info.field_name} == {value}, must be finite")
        return value


class GradMatchPBSelector(OMPOptions):
    paper_name, ground, summaries = "GRAD-MATCH-PB", "batch", "batch"
    strategy: Literal["gradmatch-pb"] = Field("gradmatch-pb", description="selection strategy")
    lam: float = Field(0.0, ge=0, description="ridge regularisation lambda of OMP (0 for PB, as the reference "
                       "implementation: after a warm start the target is small and lambda would shrink the weights)")


class GradMatchSelector(OMPOptions):
    paper_name, summaries = "GRAD-MATCH", "example"
    strategy: Literal["gradmatch"] = Field(
        "gradmatch", description="GRAD-MATCH: per-class, per-gradient OMP over examples"
    )


class CraigSelector(SelectorBase):
    paper_name, summaries = "CRAIG", "example"
    strategy: Literal["craig"] = Field("craig", description="CRAIG: per-class facility location over examples")


class CraigPBSelector(SelectorBase):
    paper_name, ground, summaries = "CRAIG-PB", "batch", "batch"
    strategy: Literal["craig-pb"] = Field("craig-pb", description="CRAIG-PB: facility location over mini-batches")


class GlisterSelector(SelectorBase):
    paper_name, summaries, needs_validation = "GLISTER", "example", True
    strategy: Literal["glister"] = Field(
        "glister", description="GLISTER: greedy one-step look-ahead on the validation loss"
    )
    greedy_steps: int = Field(100, ge=1, description="gain re-evaluations per round (more: closer to pure greedy)")


# The one table of strategies: each selector class, whose ``strategy`` Literal is the strategy's name and whose
# class attributes say what it needs (``SelectorBase``). Every other list of names derives from it.
SELECTOR_TABLE: tuple[type[SelectorBase], ...] = (
    FullSelector, FullEarlyStopSelector, RandomSelector, RandomOnlineSelector, GradMatchPBSelector,
    GradMatchSelector, CraigSelector, CraigPBSelector, GlisterSelector,
)
SelectorConfig = Annotated[Union[tuple(SELECTOR_TABLE)], Field(discriminator="strategy")]


def strategy_name(selector: type[SelectorBase]) -> str:
    """The ``strategy`` tag of a selector class: ``strategy_name(GradMatchSelector) == "gradmatch"``."""
    (name,) = get_args(selector.model_fields["strategy"].annotation)
    return name


STRATEGIES = tuple(strategy_name(selector) for selector in SELECTOR_TABLE)
ROUND_STRATEGIES = tuple(strategy_name(selector) for selector in SELECTOR_TABLE if selector.rounds)
PB_STRATEGIES = tuple(strategy_name(selector) for selector in SELECTOR_TABLE if selector.ground == "batch")
PAPER_NAMES = {strategy_name(selector): selector.paper_name for selector in SELECTOR_TABLE}
FULL, FULL_EARLYSTOP = strategy_name(FullSelector), strategy_name(FullEarlyStopSelector)
RANDOM, RANDOM_ONLINE = strategy_name(RandomSelector), strategy_name(RandomOnlineSelector)
GRADMATCH, GRADMATCH_PB = strategy_name(GradMatchSelector), strategy_name(GradMatchPBSelector)
CRAIG, CRAIG_PB, GLISTER = strategy_name(CraigSelector), strategy_name(CraigPBSelector), strategy_name(GlisterSelector)
# seed stream of RANDOM's fixed subset and of a cold start's initial random subset (apart from every round's):
# the trainer and the selector draw the same subset from ``numpy.random.default_rng([seed, RANDOM_STREAM])``
RANDOM_STREAM = 2**31


class StrategyChange(Strict):
    """From boundary ``epoch`` on, the selector runs ``selector`` (a live reconfiguration)."""

    epoch: int = Field(ge=0)
    selector: SelectorConfig

    @field_validator("selector")
    @classmethod
    def _has_rounds(cls, selector):
        if selector.strategy not in ROUND_STRATEGIES or selector.strategy == RANDOM_ONLINE:
            raise ValueError(
                f"strategy == {selector.strategy!r} cannot be scheduled; must be one of "
                f"{', '.join(s for s in ROUND_STRATEGIES if s != RANDOM_ONLINE)}"
            )
        return selector


class RunConfig(Strict):
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of splits, initial weights, subsets")
    out: str | None = Field(None, description="run directory (default: runs/<time>-<strategy>)")
    tensorboard: str | None = Field(None, description="directory for the run's TensorBoard event files (default: none)")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    selector: SelectorConfig = GradMatchPBSelector()
    strategy_schedule: tuple[StrategyChange, ...] = Field(
        (), description="live strategy changes; an entry at epoch 0 replaces `selector`"
    )

    @field_validator("tensorboard")
    @classmethod
    def _names_a_directory(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must name a directory")
        return value

    @model_validator(mode="before")
    @classmethod
    def _schedule_starts_the_run(cls, data):
        """An entry at epoch 0 is the selector the run starts with (unless a different one is given)."""
        if not isinstance(data, dict) or not data.get("strategy_schedule"):
            return data
        first = data["strategy_schedule"][0]
        first = first.model_dump() if isinstance(first, BaseModel) else first
        if not isinstance(first, dict) or first.get("epoch") != 0:
            return data
        selector = data.get("selector")
        selector = selector.model_dump() if isinstance(selector, BaseModel) else selector
        if selector is not None and selector != first.get("selector"):
            raise ValueError(
                f"strategy_schedule starts at epoch 0 with {first.get('selector')} but selector is {selector}: "
                "give the first strategy in one place"
            )
        return {**data, "selector": first.get("selector")}

    @model_validator(mode="after")
    def _schedule_ordered(self) -> "RunConfig":
        epochs = [change.epoch for change in self.strategy_schedule]
        if epochs != sorted(set(epochs)):
            raise ValueError(f"strategy_schedule epochs == {epochs}, must be strictly increasing")
        if self.strategy_schedule and self.selector.strategy not in ROUND_STRATEGIES:
            raise ValueError(f"strategy_schedule needs a strategy with rounds, not {self.selector.strategy!r}")
        return self
