"""Command-line flags and YAML files -> one validated ``RunConfig``.

Precedence: built-in defaults < ``--config FILE.yaml`` < flags given on the command line. Each flag is
declared once below with the config path it sets (its ``dest``); a validation error's location is mapped
back to its flag in one place (``config_error``), so bad input raises ``ConfigError`` whose one-line message
names the flag (or config key), the value and the rule.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from pydantic import ValidationError

from protocol.config import DATASETS, MODELS, STRATEGIES, RunConfig


class ConfigError(ValueError):
    """Bad command-line or config-file input; the message is one line for the user."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m trainer.run", argument_default=argparse.SUPPRESS,
                description="Train on GRAD-MATCH subsets chosen by a Ray selector beside a Ray trainer.")
    add = p.add_argument
    add("--config", metavar="FILE", help="YAML file with any part of the config tree (default: none)")
    add("--resume", metavar="DIR", help="continue the interrupted run in DIR from its last checkpoint, with the "
        "config it was started with (default: none)")
    add("--dataset", dest="data.dataset", metavar="NAME",
        help=f"{', '.join(DATASETS)}, imagefolder:PATH or package.module:function (default: mnist5k)")
    add("--data-root", dest="data.data_root", metavar="DIR", help="folder of torchvision data sets (default: none)")
    add("--download", dest="data.download", action="store_true", help="let torchvision download (default: off)")
    add("--image-size", dest="data.image_size", metavar="PX",
        help="imagefolder: resize every image to PX x PX (default: all images must share one size)")
    add("--imbalance-classes", dest="data.imbalance_classes", metavar="F",
        help="share of classes made rare in the training split, paper: 0.3 (default: 0)")
    add("--imbalance-drop", dest="data.imbalance_drop", metavar="F",
        help="share of the rare classes' training examples removed, paper: 0.9 (default: 0)")
    add("--model", dest="model.name", metavar="NAME",
        help=f"{', '.join(MODELS)}, a torchvision model name or package.module:function (default: lenet)")
    add("--strategy", dest="selector.strategy", metavar="NAME",
        help=f"selection strategy [{', '.join(STRATEGIES)}] (default: gradmatch-pb)")
    add("--valid", dest="selector.valid", action="store_true",
        help="match the validation gradient instead of the training one (default: off)")
    add("--shards", dest="selector.shards", metavar="S",
        help="selector actors sharing the selection by class, at most the number of classes (default: 1)")
    add("--time-budget-s", dest="selector.time_budget_s", metavar="S",
        help="full-earlystop: seconds of training wall time before stopping (default: required)")
    add("--match-run", metavar="DIR", help="full-earlystop: stop after the wall time of the run in DIR (default: none)")
    add("--strategy-schedule", metavar="E:NAME,...",
        help="live strategy changes, e.g. '0:random,20:gradmatch-pb' (default: none)")
    add("--budget", dest="schedule.budget", metavar="F", help="subset size as a share of the training set (default: 0.1)")
    add("--kappa", dest="schedule.kappa", metavar="F",
        help="warm start: subsets from nominal epoch int(kappa*T) on, after round(int(kappa*T)*budget) full "
             "epochs (as the reference trains), 0: no warm start (default: 0.5)")
    add("--select-every", dest="schedule.select_every", metavar="R", help="epochs between selection rounds (default: 20)")
    add("--lead", dest="schedule.lead", metavar="E",
        help="epochs before a boundary that its round starts, 0: synchronous, auto: as few as the measured "
             "round and epoch times allow (default: 1)")
    add("--on-late", dest="schedule.on_late", metavar="MODE",
        help="at a boundary whose subset is not ready: wait for it (reproducible) or continue on the current "
             "one (not reproducible) [wait, continue] (default: wait)")
    add("--divergence-guard", dest="schedule.divergence_guard", metavar="BOOL",
        help="undo an adopted subset that drives the training loss above max(10x the loss before it, ln(C)/4) "
             "for two epochs without falling [true, false] (default: true)")
    add("--summary-workers", dest="schedule.summary_workers", metavar="W",
        help="Ray actors that make the summary passes from a model snapshot while training goes on (default: 0)")
    add("--summary-precision", dest="schedule.summary_precision", metavar="P",
        help="dtype of the summary passes' forward, summaries kept in float32 [auto, fp32, bf16, fp16] "
             "(default: fp32)")
    add("--pool", dest="schedule.pool", metavar="F",
        help="share of the mini-batches (PB) or examples each round draws at random and summarises; "
             "1: all, as the paper (default: 1)")
    add("--round-timeout-s", dest="schedule.round_timeout_s", metavar="S",
        help="a round not answered by then fails and its selector is restarted (default: 600)")
    add("--on-selector-loss", dest="schedule.on_selector_loss", metavar="MODE",
        help="when the selector is gone for good [fail, continue] (default: fail)")
    add("--epochs", dest="train.epochs", metavar="T", help="epoch budget T (default: 200)")
    add("--batch-size", dest="train.batch_size", metavar="B", help="mini-batch size (default: 32)")
    add("--lr", dest="train.lr", metavar="LR", help="initial SGD learning rate, cosine annealed (default: 0.01)")
    add("--lr-schedule", dest="train.lr_schedule", metavar="PER",
        help="cosine annealing per nominal [epoch] of T (a warm run's subset epochs continue at lr(kappa*T)) "
             "or per optimizer [step] (default: epoch)")
    add("--checkpoint-every", dest="train.checkpoint_every", metavar="E",
        help="epochs between checkpoints, and one at the end (default: 10)")
    add("--seed", dest="seed", metavar="N", help="seed of splits, weights and subsets (default: 0)")
    add("--device", dest="train.device", metavar="DEV", help="auto, cpu, cuda or cuda:N (default: auto)")
    add("--workers", dest="train.workers", metavar="N",
        help="data-parallel training on N Ray Train workers, rank 0 talks to the selector (default: 1)")
    add("--threads", dest="train.threads", metavar="N", help="torch CPU threads of the trainer (default: all cores but one, at least 1)")
    add("--out", dest="out", metavar="DIR", help="run directory (default: runs/<time>-<strategy>)")
    add("--tensorboard", dest="tensorboard", metavar="DIR",
        help="write TensorBoard event files of the epochs and rounds to DIR; needs gradmatch[tensorboard] "
             "(default: none)")
    add("--dashboard", action="store_true",
        help="start the private Ray's dashboard on 127.0.0.1 and print its address; a cluster's dashboard is "
             "started by `ray start --dashboard-host` (default: off)")
    add("--ray", metavar="WHICH", help="local: start a private Ray; cluster: join the cluster `ray start` recorded or "
        "RAY_ADDRESS names (an error when there is none); HOST:PORT: join that cluster (default: RAY_ADDRESS's "
        "cluster, else the one `ray start` recorded while it runs, else a private Ray)")
    return p


def _flags() -> dict[str, tuple[str, ...]]:
    """flag -> the config path it sets, read off the parser's declarations."""
    return {a.option_strings[0]: tuple(a.dest.split(".")) for a in build_parser()._actions
            if a.option_strings and "." in a.dest or a.dest in ("seed", "out", "tensorboard")}


FLAGS = _flags()
EXTRA_FLAGS = {("strategy_schedule",): "--strategy-schedule"}


def parse_args(argv: list[str] | None = None) -> dict:
    """The flags given, as ``{dest: value}`` (``config``, ``resume``, ``match_run`` or a dotted config path)."""
    return vars(build_parser().parse_args(argv))


def parse_config(argv: list[str] | None = None, args: dict | None = None) -> RunConfig:
    """Parse ``argv`` into a validated ``RunConfig``; raises ``ConfigError`` on bad input."""
    args = dict(parse_args(argv) if args is None else args)
    args.pop("resume", None)
    args.pop("ray", None)
    args.pop("dashboard", None)
    tree = load_yaml(args.pop("config"), "--config") if "config" in args else {}
    if "match_run" in args:
        args["selector.time_budget_s"] = _matched_wall_s(args.pop("match_run"))
    if "strategy_schedule" in args:
        tree["strategy_schedule"] = _parse_schedule(args.pop("strategy_schedule"))
    for dest, value in args.items():
        _set(tree, tuple(dest.split(".")), value)
    if isinstance(tree.get("selector"), dict) and "strategy" not in tree["selector"]:
        tree["selector"]["strategy"] = RunConfig().selector.strategy  # options given for the default strategy
    _absolute_paths(tree)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise config_error(exc) from None


def _absolute_paths(tree: dict) -> None:
    """Data paths made absolute, so actors whose working directory differs read the same files."""
    data = tree.get("data")
    if not isinstance(data, dict):
        return
    if isinstance(data.get("data_root"), str) and data["data_root"]:
        data["data_root"] = str(Path(data["data_root"]).expanduser().absolute())
    dataset = data.get("dataset")
    if isinstance(dataset, str) and dataset.startswith("imagefolder:") and dataset[len("imagefolder:"):].strip():
        data["dataset"] = "imagefolder:" + str(Path(dataset[len("imagefolder:"):]).expanduser().absolute())


def _matched_wall_s(run: str) -> float:
    """The training wall time of an earlier run, read from its summary."""
    path = Path(run) / "summary.json"
    try:
        return float(json.loads(path.read_text())["wall_s"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--match-run {run}: cannot read wall_s from {path}: {exc}") from None


def _parse_schedule(text: str) -> list[dict]:
    """``"0:random,20:gradmatch-pb"`` -> ``[{"epoch": 0, "selector": {"strategy": "random"}}, ...]``."""
    entries = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        epoch, sep, name = item.partition(":")
        if not sep or not epoch.strip().isdigit() or not name.strip():
            raise ConfigError(f"--strategy-schedule {text!r}: entry {item!r} must be EPOCH:STRATEGY")
        entries.append({"epoch": int(epoch), "selector": {"strategy": name.strip()}})
    if not entries:
        raise ConfigError(f"--strategy-schedule {text!r}: must hold at least one EPOCH:STRATEGY entry")
    return entries


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (where plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (line {key_node.start_mark.line + 1}); give each key once",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str, name: str = "--config") -> dict:
    """A YAML file holding a mapping of config sections; every failure is a one-line ``ConfigError``."""
    try:
        tree = yaml.load(Path(path).read_text(), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except OSError as exc:
        raise ConfigError(f"{name} {path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name} {path}: not a text file (must be YAML in UTF-8)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name} {path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{name} {path}: must hold a mapping of config sections, got {type(tree).__name__}")
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    node = tree
    for name in path[:-1]:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {name!r} must be a mapping")
    if path == ("selector", "strategy") and node.get("strategy") not in (None, value):
        node.clear()  # options of another strategy do not carry over
    node[path[-1]] = value


def _name_of(loc: tuple[str, ...], keywords: bool) -> str | None:
    """The flag (or, for the Python API, the keyword) that sets config path ``loc``."""
    if keywords:
        return loc[-1] if loc else None
    flag = next((f for f, path in FLAGS.items() if path == loc), None)
    if flag is None and loc[:1] == ("selector",):
        flag = next((f for f, path in FLAGS.items() if path[:1] == ("selector",) and path[-1:] == loc[-1:]), None)
    return flag or EXTRA_FLAGS.get(loc[:1])


def flag_of(path: str) -> str:
    """The flag that sets the dotted config path ``path`` (the path itself for a field without a flag)."""
    return _name_of(tuple(path.split(".")), keywords=False) or path


def config_error(exc: Exception, keywords: bool = False) -> ConfigError:
    """One line naming the flag (or keyword, or config key), the value and the rule of a validation error."""
    if isinstance(exc, ConfigError):
        return exc
    if not isinstance(exc, ValidationError):
        return ConfigError(str(exc))
    error = exc.errors()[0]
    loc = tuple(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "union_tag_invalid":  # an unknown strategy name
        where = _name_of(("strategy_schedule",) if loc[0] == "strategy_schedule" else ("selector", "strategy"),
                         keywords)
        return ConfigError(f"{where} {error['ctx']['tag']!r}: must be one of {error['ctx']['expected_tags']}")
    if loc[:1] == ("selector",) and len(loc) == 3:  # drop the union tag: selector.<tag>.field
        if error["type"] == "extra_forbidden":
            return ConfigError(f"{_name_of(('selector', loc[2]), keywords) or loc[2]}: not an option of strategy "
                               f"{loc[1]!r}")
        if error["type"] == "missing":
            hint = " (or --match-run DIR)" if loc[2] == "time_budget_s" and not keywords else ""
            return ConfigError(f"{_name_of(('selector', loc[2]), keywords) or loc[2]}: required by strategy "
                               f"{loc[1]!r}{hint}")
        loc = ("selector", loc[2])
    named = message.split(" ==")[0]
    if " ==" in message and _name_of((*loc, named), keywords) and (*loc, named) in FLAGS.values():
        loc = (*loc, named)  # a rule across fields, reported by the field it names first
    name = _name_of(loc, keywords)
    where = name or ".".join(loc) or "config"
    value = error.get("input")
    if " ==" not in message and name and value is not None and not isinstance(value, dict):
        return ConfigError(f"{where} {value!r}: {message}")
    return ConfigError(f"{where}: {message}")
