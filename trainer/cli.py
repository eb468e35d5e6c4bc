"""Command-line flags and YAML files -> one validated ``RunConfig``.

Precedence: built-in defaults < ``--config FILE.yaml`` < flags given on the command line. Bad input
raises ``ConfigError`` whose one-line message names the flag (or config key), the value and the rule.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from pydantic import ValidationError

from protocol.config import RunConfig

# flag -> path in the config tree
FLAGS: dict[str, tuple[str, ...]] = {
    "--dataset": ("data", "dataset"),
    "--data-root": ("data", "data_root"),
    "--model": ("model", "name"),
    "--strategy": ("selector", "strategy"),
    "--budget": ("schedule", "budget"),
    "--epochs": ("train", "epochs"),
    "--kappa": ("schedule", "kappa"),
    "--select-every": ("schedule", "select_every"),
    "--lead": ("schedule", "lead"),
    "--on-late": ("schedule", "on_late"),
    "--batch-size": ("train", "batch_size"),
    "--lr": ("train", "lr"),
    "--seed": ("seed",),
    "--device": ("train", "device"),
    "--threads": ("train", "threads"),
    "--out": ("out",),
    "--imbalance-classes": ("data", "imbalance_classes"),
    "--imbalance-drop": ("data", "imbalance_drop"),
    "--time-budget-s": ("selector", "time_budget_s"),
}
SWITCHES: dict[str, tuple[str, ...]] = {"--download": ("data", "download"), "--valid": ("selector", "valid")}
FIELD_OWNERS = {"time_budget_s": "FullEarlyStopSelector", "valid": "GradMatchPBSelector"}


class ConfigError(ValueError):
    """Bad command-line or config-file input; the message is one line for the user."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(message)


def _field(path: tuple[str, ...]):
    import protocol.config as schema

    model = RunConfig
    for name in path[:-1]:
        annotation = model.model_fields[name].annotation
        model = annotation if isinstance(annotation, type) else type(model.model_fields[name].default)
    if path[-1] in FIELD_OWNERS:
        model = getattr(schema, FIELD_OWNERS[path[-1]])
    return model.model_fields[path[-1]]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m trainer.run",
        description="Train on GRAD-MATCH subsets chosen by a Ray selector beside a Ray trainer.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file with any part of the config tree (default: none)")
    parser.add_argument("--strategy-schedule", metavar="E:NAME,...",
                        help="live strategy changes, e.g. '0:random,20:gradmatch-pb' (default: none)")
    parser.add_argument("--match-run", metavar="DIR",
                        help="full-earlystop: stop after the wall time of the run in DIR (default: none)")
    for flag, path in FLAGS.items():
        info = _field(path)
        choices = f" [{', '.join(_choices(path))}]" if _choices(path) else ""
        shown = "required" if info.is_required() else info.default
        default = "" if "default:" in info.description else f" (default: {shown})"
        parser.add_argument(flag, metavar="VALUE", help=f"{info.description}{choices}{default}")
    for flag, path in SWITCHES.items():
        parser.add_argument(flag, action="store_true", help=f"{_field(path).description} (default: off)")
    return parser


def _choices(path: tuple[str, ...]) -> tuple[str, ...]:
    from protocol.config import DATASETS, MODELS, STRATEGIES

    return {("data", "dataset"): DATASETS, ("model", "name"): MODELS, ("selector", "strategy"): STRATEGIES,
            ("schedule", "on_late"): ("continue", "wait")}.get(path, ())


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Parse ``argv`` into a validated ``RunConfig``; raises ``ConfigError`` on bad input."""
    args = vars(build_parser().parse_args(argv))
    tree = _load_yaml(args.pop("config")) if "config" in args else {}
    for flag, path in {**FLAGS, **SWITCHES}.items():
        key = flag[2:].replace("-", "_")
        if key in args:
            _set(tree, path, args[key])
    if "match_run" in args:
        _set(tree, ("selector", "time_budget_s"), _matched_wall_s(args["match_run"]))
    if "strategy_schedule" in args:
        tree["strategy_schedule"] = _parse_schedule(args["strategy_schedule"])
    if isinstance(tree.get("selector"), dict) and "strategy" not in tree["selector"]:
        tree["selector"]["strategy"] = RunConfig().selector.strategy  # options given for the default strategy
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _matched_wall_s(run: str) -> float:
    """The training wall time of an earlier run, read from its summary."""
    path = Path(run) / "summary.json"
    try:
        import json

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


def _load_yaml(path: str) -> dict:
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"--config {path}: must hold a mapping of config sections, got {type(tree).__name__}")
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


def _describe(exc: ValidationError) -> str:
    error = exc.errors()[0]
    loc = tuple(str(p) for p in error["loc"])
    if error["type"] == "union_tag_invalid":  # an unknown strategy name
        where = "--strategy-schedule" if loc[0] == "strategy_schedule" else "--strategy"
        return f"{where} {error['ctx']['tag']!r}: must be one of {error['ctx']['expected_tags']}"
    if error["type"] == "extra_forbidden" and loc[0] == "selector" and len(loc) == 3:
        flag = next((f for f, p in {**FLAGS, **SWITCHES}.items() if p == ("selector", loc[2])), loc[2])
        return f"{flag}: not an option of strategy {loc[1]!r}"
    if error["type"] == "missing" and loc[:1] == ("selector",) and len(loc) == 3:
        flag = next((f for f, p in FLAGS.items() if p == ("selector", loc[2])), loc[2])
        return f"{flag}: required by strategy {loc[1]!r}" + (" (or --match-run DIR)" if loc[2] == "time_budget_s" else "")
    if len(loc) >= 2 and loc[0] == "selector" and loc[1] not in ("strategy",):
        loc = (loc[0],) + loc[2:]  # drop the union tag
    message = error["msg"].removeprefix("Value error, ")
    named = message.split(" ==")[0]
    if " ==" in message and (*loc, named) in {**FLAGS, **SWITCHES}.values():
        loc = (*loc, named)  # a rule across fields, reported by the field it names first
    flag = next((f for f, p in {**FLAGS, **SWITCHES}.items() if p == loc), None)
    where = flag or ("--strategy-schedule" if loc[:1] == ("strategy_schedule",) else ".".join(loc)) or "config"
    if " ==" in message:
        return f"{where}: {message}"
    if "input" in error and not isinstance(error["input"], dict) and flag:
        return f"{where} {error['input']!r}: {message}"
    return f"{where}: {message}"
