"""Adaptive subsets for your own model, data and training loop.

.. code-block:: python

    from trainer import AdaptiveSubset

    with AdaptiveSubset(model, train_set, strategy="gradmatch-pb", budget=0.1, epochs=200,
                        select_every=20, kappa=0.5, batch_size=32) as subset:
        for epoch, batches in subset:
            for x, y, w in batches:                # w: (B,) weights, mean 1 over the subset
                loss = (w * F.cross_entropy(model(x), y, reduction="none")).mean()
                opt.zero_grad(); loss.backward(); opt.step()
    print(subset.summary())

The client makes the batches. Per-example strategies reshuffle the adopted subset every epoch; the PB
variants choose among fixed mini-batches, a seeded partition of the example ids (``seed``) made once per run
and trained as they are. Summaries come from a forward hook on the model's classifier layer (its last
``nn.Linear`` whose ``out_features`` is the number of classes, or ``last_layer=``); the model is not changed.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from protocol.config import RunConfig, ScheduleConfig, TrainConfig
from trainer.cli import ConfigError, config_error, load_yaml
from trainer.client.batches import DatasetError, LoaderFetch, WithForward, item_label, split_batch
from trainer.client.cluster import start_service
from trainer.client.group import FollowerRounds, Group
from trainer.client.layers import find_classifier
from trainer.client.rounds import RoundClient
from trainer.client.sampler import SubsetBatchSampler
from trainer.client.schedule import CheckedConfig, check_run
from trainer.client.subsets import batch_weights
from trainer.client.summaries import SummarySource, to_device
from trainer.client.watch import Watch, tensorboard_module
from trainer.client.workers import SummaryPool

STATE_VERSION = 1



def build_config(config=None, options: dict | None = None) -> RunConfig:
    """A ``RunConfig`` from a whole config (a ``RunConfig``, a ``CheckedConfig``, a dict or a YAML path) and keyword
    options.

    Keywords are field names of the config tree: ``seed``, the fields of ``train`` and ``schedule``, and
    ``strategy`` with the options of that strategy (``lam``, ``eps``, ``valid``...).
    """
    if isinstance(config, CheckedConfig):
        config = config.config
    if isinstance(config, RunConfig):
        tree = config.model_dump()
    elif isinstance(config, dict):
        tree = dict(config)
    elif config is not None:
        tree = load_yaml(str(config), "config")
    else:
        tree = {}
    for name, value in (options or {}).items():
        if name in ("seed", "tensorboard"):
            tree[name] = value
        elif name in TrainConfig.model_fields:
            tree.setdefault("train", {})[name] = value
        elif name in ScheduleConfig.model_fields:
            tree.setdefault("schedule", {})[name] = value
        else:  # a strategy or one of its options: the selector branch says which are valid
            selector = tree.setdefault("selector", {})
            if name == "strategy" and selector.get("strategy") not in (None, value):
                selector.clear()
            selector[name] = value
    if isinstance(tree.get("selector"), dict) and "strategy" not in tree["selector"]:
        tree["selector"]["strategy"] = RunConfig().selector.strategy
    try:
        return RunConfig.model_validate(tree)
    except Exception as exc:
        raise config_error(exc, keywords=True) from None


def dataset_labels(dataset: Dataset, name: str, label_key: str = "labels") -> torch.Tensor:
    """The (n,) int64 labels of a map-style dataset: its ``targets`` (or its ``label_key`` column, for a Hugging
    Face ``datasets.Dataset``) when it has them, else read item by item (``item[1]``, or ``item[label_key]`` of a
    dict)."""
    try:
        n = len(dataset)
    except TypeError:
        raise DatasetError(f"{name}: {type(dataset).__name__} has no len(); must be a map-style Dataset") from None
    if n == 0:
        raise DatasetError(f"{name}: is empty; must hold at least one example")
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        labels = dataset.tensors[1]
    elif hasattr(dataset, "targets") and len(getattr(dataset, "targets")) == n:
        labels = dataset.targets
    elif label_key in (getattr(dataset, "column_names", None) or ()):
        labels = dataset[label_key]
    else:
        labels = [_item_label(dataset, i, name, label_key) for i in range(n)]
    labels = torch.as_tensor(np.asarray(labels))
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise DatasetError(f"{name}: labels must be one int per example, got {labels.dtype} of shape "
                           f"{tuple(labels.shape)}")
    return labels.long()


def _item_label(dataset: Dataset, i: int, name: str, label_key: str = "labels") -> int:
    item = dataset[i]
    label = item_label(item, label_key)
    if label is None:
        raise DatasetError(f"{name}[{i}] is {type(item).__name__}; items must be (input, int label) or dicts with "
                           f"the label under {label_key!r} (label_key=)")
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.dtype.is_floating_point:
        label = int(label)
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise DatasetError(f"{name}[{i}] label is {label!r} ({type(label).__name__}); must be an int")
    return int(label)


def _inputs(dataset: Dataset, name: str, collate_fn=None, num_workers: int = 0, label_key: str = "labels"):
    """A function of example ids returning their inputs as one batch (the un-augmented view for summaries): a
    tensor dataset's rows, else the items loaded by ``num_workers`` DataLoader workers and collated by
    ``collate_fn`` (default: PyTorch's), without their labels (``trainer.client.batches.LoaderFetch``)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0].__getitem__
    return LoaderFetch(dataset, name, collate_fn, num_workers, label_key)


class _IdBatches:
    """A batch sampler over precomputed lists of example ids."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches = batches

    def __iter__(self):
        return (b.tolist() for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class AdaptiveSubset:
    """Selection rounds for any PyTorch training loop.

    Parameters
    ----------
    model : nn.Module
        Any classifier whose output is the logits of a final ``nn.Linear`` (see ``last_layer``).
    train_set : Dataset
        Map-style, yielding ``(input, int label)``.
    config : RunConfig, dict or str, optional
        A whole config tree (or the path of a YAML file); keyword options override it. A
        ``trainer.client.schedule.CheckedConfig`` (``check_run``: what ``python -m trainer.run`` hands its trainer)
        given without keyword options, for a ``train_set`` of its size, is used as it is: its schedule is not
        checked again.
    summary_set : Dataset, optional
        The same examples as ``train_set`` without augmentation, for the summary passes (default: train_set).
    val_set : Dataset, optional
        For strategies that match the validation gradient (``valid=True``, GLISTER).
    last_layer : nn.Linear or str, optional
        The classifier layer, or its name in ``model.named_modules()``.
    n_classes : int, optional
        Default: ``len(train_set.classes)`` when it has them, else the largest label + 1.
    num_workers, pin_memory
        Passed to the training ``DataLoader`` (tensor datasets are indexed directly); ``num_workers`` also loads
        the summary passes' items.
    collate_fn : callable, optional
        Makes a batch of items (default: PyTorch's ``default_collate``), for training and summary batches. A
        collated batch is ``(inputs, labels, ...)`` or a dict holding the labels under ``label_key``; inputs
        may be a tensor, a dict (the model is called as ``model(**inputs)``) or anything ``forward`` takes.
    forward : callable, optional
        ``forward(model, inputs)`` returns the logits (or an output with ``.logits``); default ``model(inputs)``,
        or ``model(**inputs)`` for a dict.
    label_key : str
        Where dict items and dict batches hold the label (default ``"labels"``).
    selector : ActorHandle, optional
        A running selector actor to use (the client takes it as it is and never stops it); by default one is
        started with ``trainer.client.cluster.start_service`` (and released on ``close``).
    group : trainer.client.group.Group or None, optional
        Data-parallel training (e.g. inside a Ray Train worker): by default the initialised
        ``torch.distributed`` group, if it has more than one process. Rank 0 alone runs the rounds and
        shares each new subset; every rank gets the same batches, each its share of every batch's examples,
        with weights scaled so that DDP's mean of the ranks' gradients is the whole batch's gradient.
    ray : str, optional
        Which Ray to use when none is connected: ``"local"`` (a private one), ``"cluster"`` (the one ``ray start``
        recorded or ``RAY_ADDRESS`` names), ``"HOST:PORT"``, or ``"auto"`` as ``python -m trainer.run`` decides.
        A cluster that cannot be joined raises ``trainer.client.cluster.RayUnavailable``.
    watch : bool
        Write the ``tensorboard`` directory (a config field) and publish the rounds as Ray metrics
        (``trainer.client.watch``); default True. The built-in trainer turns it off: its driver does both.
    on_round : callable, optional
        Called with each round's record (a dict, as in :attr:`records`) once it is final, on the rank that runs
        the rounds.
    **options
        Fields of the config tree: ``strategy``, ``budget``, ``epochs``, ``select_every``, ``kappa``, ``lead``,
        ``on_late``, ``batch_size``, ``seed``, ``valid``, ``lam``, ``summary_precision``... Bad values raise
        ``ConfigError``. ``tensorboard="DIR"`` writes TensorBoard event files: each round's stall, selector seconds,
        gradient error and subset size, and each epoch's loss, lr and accuracy given to :meth:`report_loss` (needs
        ``gradmatch[tensorboard]``).
    """

    def __init__(self, model: nn.Module, train_set: Dataset, *, config=None, summary_set: Dataset | None = None,
                 val_set: Dataset | None = None, last_layer: nn.Linear | str | None = None,
                 n_classes: int | None = None, num_workers: int = 0, pin_memory: bool = False, selector=None,
                 phase=None, group="auto", ray: str = "auto", collate_fn=None, forward=None, label_key: str = "labels",
                 watch: bool = True, on_round: Callable[[dict], None] | None = None, **options):
        self.clock = StartStopClock()
        checked = config if isinstance(config, CheckedConfig) and not options else None
        self.config = checked.config if checked is not None else build_config(config, options)
        self.group = Group.current() if group == "auto" else group
        leader = self.group is None or self.group.leader
        watch = bool(watch and leader)
        if watch and self.config.tensorboard:
            tensorboard_module("tensorboard=")  # a missing extra fails before anything starts
        if not isinstance(model, nn.Module):
            raise TypeError(f"model is {type(model).__name__}, must be a torch.nn.Module")
        for what, value in (("collate_fn", collate_fn), ("forward", forward)):
            if value is not None and not callable(value):
                raise TypeError(f"{what} is {type(value).__name__}, must be callable or None")
        self.model, self.train_set = model, train_set
        self.collate_fn, self.label_key = collate_fn, label_key
        self.labels = dataset_labels(train_set, "train_set", label_key)
        self.n_classes = n_classes or len(getattr(train_set, "classes", ())) or int(self.labels.max()) + 1
        _check_range(self.labels, self.n_classes, "train_set")
        if self.config.selector.shards > self.n_classes:
            raise ConfigError(f"shards {self.config.selector.shards}: more shards than the {self.n_classes} classes "
                              f"(selection is sharded by class); use shards={self.n_classes} or fewer")
        strategy = self.config.selector.strategy
        if checked is None or checked.n_train != len(self.labels):  # else checked once, where the run began
            _, errors, notes = check_run(self.config, len(self.labels))
            if errors:
                raise ConfigError(errors[0].render(keyword_of, "="))
            for note in notes:
                warnings.warn(note.render(keyword_of, "="), stacklevel=2)
        summary_set = train_set if summary_set is None else summary_set
        if len(summary_set) != len(train_set):
            raise DatasetError(f"summary_set has {len(summary_set)} examples, must have as many as train_set "
                               f"({len(train_set)}): the same examples without augmentation")
        val_labels = None
        if val_set is not None:
            val_labels = dataset_labels(val_set, "val_set", label_key)
            _check_range(val_labels, self.n_classes, "val_set")
        self.device = _model_device(model)
        train_inputs = _inputs(summary_set, "summary_set", collate_fn, num_workers, label_key)
        sample = to_device(train_inputs(torch.arange(min(2, len(self.labels)))), self.device)
        self.layer = find_classifier(model, self.n_classes, sample, last_layer, forward)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self._service, self._closed = None, False  # the selector (and Ray) started here, if any
        self._watch, self._watched = None, [0, 0]  # the watch, and the round records and harmful events it has had
        self.selector, self.workers = selector, None
        summarised = model if forward is None else WithForward(model, forward)  # the summary passes' model
        val_inputs = _inputs(val_set, "val_set", collate_fn, num_workers, label_key) if val_set is not None else None
        source = SummarySource(summarised, train_inputs, self.labels, self.device, val_inputs, val_labels, self.layer,
                               precision=self.config.schedule.summary_precision)
        try:
            if selector is None and leader:
                self._service = start_service(self.config.selector, ray=ray,
                                              device="cpu" if self.device.type == "cpu" else "auto")
                selector = self.selector = self._service.selector
            schedule = self.config.schedule
            if leader and schedule.summary_workers:
                self.workers = SummaryPool(schedule.summary_workers, summarised, train_inputs, self.labels, self.layer,
                                           threads=schedule.summary_threads, precision=schedule.summary_precision)
            if leader:
                self.rounds = RoundClient(selector, self.config, len(self.labels), source, phase, workers=self.workers,
                                          n_classes=self.n_classes)
                self.rounds.on_record = on_round
            if self.group is not None:  # the other ranks learn the plan from rank 0
                plan = self.group.share(self.rounds.plan if leader else None)
                if not leader:
                    self.rounds = FollowerRounds(plan, self.config, len(self.labels))
            if watch:
                self._watch = Watch(self.config.tensorboard, strategy, what="tensorboard=")
        except BaseException:
            self.close()
            raise
        self._shared = None  # the subset last shared with the other ranks
        self.epoch = self.step = 0
        self._epoch_done = self._epoch_open = False  # the epoch trained to its end / handed out by next_epoch
        self._finished = False
        self._sampler = None

    # the loop ----------------------------------------------------------------------------------
    @property
    def epoch_plan(self):
        return self.rounds.epoch_plan

    @property
    def strategy_plan(self):
        """What the selector said of its strategy (``protocol.messages.StrategyPlan``): rounds or not, ground set,
        time budget; the same on every rank."""
        return self.rounds.plan

    @property
    def planned_steps(self) -> int:
        """The optimizer steps of the whole epoch plan: every mini-batch of the training set in each full epoch,
        and in each subset epoch the budget's mini-batches (PB) or its examples in mini-batches."""
        batch_size, rounds = self.config.train.batch_size, self.rounds
        full_steps = math.ceil(len(self.labels) / batch_size)
        subset_steps = rounds.ground.n_select if rounds.ground.batches is not None else math.ceil(rounds.k / batch_size)
        return self.epoch_plan.full * full_steps + self.epoch_plan.subset * subset_steps

    @property
    def measure_s(self) -> float:
        """Seconds of summary passes made only to measure the gradient error (not training time)."""
        return self.rounds.stats.measure_s

    def __iter__(self) -> Iterator[tuple[int, Iterator]]:
        """Yield ``(epoch, batches)`` for each epoch still to train; rounds run at the boundaries."""
        while (started := self.next_epoch()) is not None:
            epoch, subset = started
            yield epoch, self._batches(subset, epoch)
            self._epoch_done = True

    def next_epoch(self):
        """End the epoch under way (if any), run the boundary before the next one (adopt a due subset, start a
        round) and return ``(epoch, subset)``: a ``trainer.client.subsets.Subset``; None once every epoch of the plan
        has been trained (the run is then finished). The own iterator and :meth:`batch_sampler` advance by it."""
        if self._epoch_done or self._epoch_open:
            self.epoch += 1
            self._epoch_done = self._epoch_open = False
        if self.epoch >= self.epoch_plan.total:
            self.finish()
            return None
        self.subset = self._share(self.rounds.start_epoch(self.epoch, self.step))
        self._epoch_open = True
        self._feed_watch()
        self.clock.first_step()
        return self.epoch, self.subset

    def epoch_order(self, subset) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This epoch's mini-batches of ``subset`` (example ids, in training order; this rank's share of each,
        data-parallel) and each one's weights, mean 1 over the whole batch (``batch_weights``). Draws from the
        seeded shuffle generator: call once per epoch."""
        order = subset.epoch_batches(self.config.train.batch_size, self.generator)
        weights = [batch_weights(subset.weights[ids]) for ids in order]
        if self.group is not None:
            parts = [self.group.part(ids, w) for ids, w in zip(order, weights)]
            order, weights = [ids for ids, _ in parts], [w for _, w in parts]
        return order, weights

    def batch_sampler(self, advance_on_iter: bool = True):
        """A batch sampler for your own ``DataLoader`` (``batch_sampler=``): each ``iter()`` runs the next epoch's
        boundary and yields that epoch's mini-batches of example ids; :meth:`weights` gives a batch's weights.
        One per client. See ``trainer.integrations.sampler.SubsetBatchSampler``."""
        if self._sampler is None:
            self._sampler = SubsetBatchSampler(self, advance_on_iter)
        elif self._sampler.advance_on_iter != advance_on_iter:
            raise ValueError(f"batch_sampler(advance_on_iter={advance_on_iter}): this client's sampler was made "
                             f"with advance_on_iter={self._sampler.advance_on_iter}; there is one per client")
        return self._sampler

    def weights(self, ids) -> torch.Tensor:
        """The weights (B,) of a batch the :meth:`batch_sampler` gave, from its example ids, mean 1 over the batch;
        on the ids' device (a list: the model's)."""
        if self._sampler is None:
            raise RuntimeError("weights(ids): no epoch started yet; iterate the DataLoader that uses "
                               "subset.batch_sampler() first")
        return self._sampler.weights(ids)

    def _share(self, subset):
        """Data-parallel: rank 0's subset on every rank, sent only when it changed since the last epoch."""
        if self.group is None:
            return subset
        if self.group.leader:
            key = (subset.round, subset.n_examples, subset.fixed)  # full epochs, the initial subset, each round's
            news = self.group.share(None if self._shared is not None and key == self._shared[0] else subset)
            if news is not None:
                self._shared = (key, subset)
        elif (news := self.group.share(None)) is not None:
            self._shared = (None, news)
        return self._shared[1]

    def _batches(self, subset, epoch: int):
        """``(x, y, w)`` for each mini-batch of ``subset`` in this epoch's order; ``w`` has mean 1 over the batch,
        so ``(w * loss).mean()`` is the reference's ``sum w l / sum w`` per mini-batch (``batch_weights``).

        Data-parallel, each rank yields its share of every batch (``Group.part``), weights scaled to match."""
        order, weights = self.epoch_order(subset)
        if isinstance(self.train_set, TensorDataset):
            inputs, labels = self.train_set.tensors[0], self.train_set.tensors[1]
            pairs = ((inputs[ids], labels[ids]) for ids in order)
        else:
            loader = DataLoader(self.train_set, batch_sampler=_IdBatches(order), num_workers=self.num_workers,
                                pin_memory=self.pin_memory, collate_fn=self.collate_fn)
            pairs = (split_batch(batch, self.label_key) for batch in loader)
        for w, (x, y) in zip(weights, pairs):
            yield (to_device(x, self.device), torch.as_tensor(y).to(self.device), w.to(self.device))
            self.step += 1
        self._epoch_done = True
        self.clock.last_step(again=True)

    def report_loss(self, loss: float, lr: float | None = None, acc: float | None = None) -> None:
        """The mean training loss of the epoch just trained (optional): it arms the divergence guard, which undoes
        an adopted subset that drives the loss above ``max(10 x the loss before it, ln(C) / 4)`` for two epochs, not falling,
        in a row (``divergence_guard=False`` turns it off; ``summary()["rounds_harmful"]`` counts them).
        With ``tensorboard=`` the loss, ``lr`` and ``acc`` (when given) are written at step = epoch."""
        if self.group is None or self.group.leader:
            self.rounds.observe_loss(self.epoch, float(loss))
        if self._watch is not None:
            self._watch.epochs([{"epoch": self.epoch, "loss": float(loss), "lr": lr, "val_acc": acc}])
            self._feed_watch()

    def _feed_watch(self) -> None:
        """The round records and harmful events the watch has not had yet (the leader's; the records are final
        once appended)."""
        if self._watch is None:
            return
        records, harmful = self.rounds.stats.records, self.rounds.harmful
        self._watch.rounds(records[self._watched[0]:])
        self._watch.harmful(harmful[self._watched[1]:])
        self._watched = [len(records), len(harmful)]

    def finish(self) -> None:
        """End of training: the round still out is recorded as unused, rounds never started as skipped."""
        if not self._finished:
            self._finished = True
            self.clock.last_step()
            self.rounds.finish(self.epoch + int(self._epoch_done))  # epochs trained: a stop skips no later round
            self._feed_watch()

    def summary(self) -> dict:
        """Rounds adopted, rejected and skipped, late adoptions, staleness, stall, selector and summary time,
        the mean gradient error, the share of examples never trained on, epochs and steps so far; ``start_s``
        (entering ``AdaptiveSubset`` to the first epoch) and, after ``close()``, ``stop_s`` (the last step to the
        end of ``close()``)."""
        return {**self.rounds.summary(), **self.clock.summary(),
                "epochs_run": self.epoch + int(self._epoch_done), "steps": self.step,
                "epochs_full": self.epoch_plan.full, "epochs_subset": self.epoch_plan.subset,
                "strategy": self.config.selector.strategy, "n_train": len(self.labels)}

    @property
    def records(self) -> list[dict]:
        """One record per round so far (``protocol.records.RoundRecord`` as dicts)."""
        return self.rounds.stats.records

    # checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The selection state at an epoch end: the next epoch, steps, the shuffle generator, the current subset
        and weights, the round schedule position, the ever-trained mask and the records."""
        return {"version": STATE_VERSION, "epoch": self.epoch + int(self._epoch_done), "step": self.step,
                "generator": self.generator.get_state(), "rounds": self.rounds.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"selection state version == {state.get('version')!r}, must be {STATE_VERSION}")
        saved = len(state["rounds"]["ever_used"])  # one flag per training example
        if saved != len(self.labels):
            raise ValueError(f"selection state of a training set of {saved} examples, this client's has "
                             f"{len(self.labels)}: load it into a client of the same data")
        self.epoch, self.step, self._epoch_done = int(state["epoch"]), int(state["step"]), False
        self._epoch_open = False
        self._shared = None
        self.generator.set_state(state["generator"])
        self.rounds.load_state_dict(state["rounds"])
        if self._watch is not None:  # the restored rounds were watched by the client that saved them
            self._watched = [len(self.rounds.stats.records), len(self.rounds.harmful)]

    # life cycle --------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the selector (when started here) and the Ray started here; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.clock.last_step()
        rounds = getattr(self, "rounds", None)
        if self._watch is not None:
            self._feed_watch()
            self._watch.close()
        if rounds is not None:
            rounds.shutdown()
        if getattr(self, "workers", None) is not None:
            self.workers.close()
        if self._service is not None:
            self._service.close()
        self.clock.closed()

    def __enter__(self) -> "AdaptiveSubset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StartStopClock:
    """What a user waits for around training: ``start_s`` from entering ``AdaptiveSubset`` (or ``began``, a
    ``time.time()``) to the first epoch handed out, ``stop_s`` from the last step (the end of the last epoch,
    or ``close()`` when training stopped early) to the end of ``close()``. Wall clock (``time.time``), so that a
    driver can compare the instants an actor reports with its own."""

    def __init__(self, began: float | None = None):
        self.began = time.time() if began is None else began
        self.first_step_at: float | None = None
        self.last_step_at: float | None = None
        self.closed_at: float | None = None

    def first_step(self) -> None:
        if self.first_step_at is None:
            self.first_step_at = time.time()

    def last_step(self, again: bool = False) -> None:
        """The end of the last step: the first call counts, or each call with ``again`` (the end of each epoch's
        batches, so that what follows the last one, evaluation and checkpoints, counts as stopping)."""
        if again or self.last_step_at is None:
            self.last_step_at = time.time()

    def closed(self) -> None:
        self.closed_at = time.time()

    def summary(self) -> dict:
        """``start_s`` and ``stop_s``: None until their instants have come."""
        start = None if self.first_step_at is None else self.first_step_at - self.began
        stop = None if self.closed_at is None or self.last_step_at is None else self.closed_at - self.last_step_at
        return {"start_s": start, "stop_s": stop}


def keyword_of(path: str) -> str:
    """The keyword of ``AdaptiveSubset`` that sets the dotted config path ``path`` (its last part)."""
    return path.rpartition(".")[2]


def _check_range(labels: torch.Tensor, n_classes: int, name: str) -> None:
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= n_classes:
        raise DatasetError(f"{name}: labels in [{low}, {high}], must be in [0, {n_classes}) for {n_classes} classes")


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


__all__ = ["AdaptiveSubset", "ConfigError", "DatasetError", "build_config"]
