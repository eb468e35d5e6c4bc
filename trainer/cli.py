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
}
SWITCHES: dict[str, tuple[str, ...]] = {"--download": ("data", "download")}


class ConfigError(ValueError):
    """Bad command-line or config-file input; the message is one line for the user."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(message)


def _field(path: tuple[str, ...]):
    model = RunConfig
    for name in path[:-1]:
        annotation = model.model_fields[name].annotation
        model = annotation if isinstance(annotation, type) else type(model.model_fields[name].default)
    return model.model_fields[path[-1]]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m trainer.run",
        description="Train on GRAD-MATCH subsets chosen by a Ray selector beside a Ray trainer.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file with any part of the config tree (default: none)")
    for flag, path in FLAGS.items():
        info = _field(path)
        choices = f" [{', '.join(_choices(path))}]" if _choices(path) else ""
        default = "" if "default:" in info.description else f" (default: {info.default})"
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
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


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
        return f"--strategy {error['ctx']['tag']!r}: must be one of {error['ctx']['expected_tags']}"
    if len(loc) >= 2 and loc[0] == "selector" and loc[1] not in ("strategy",):
        loc = (loc[0],) + loc[2:]  # drop the union tag
    message = error["msg"].removeprefix("Value error, ")
    named = message.split(" ==")[0]
    if " ==" in message and (*loc, named) in {**FLAGS, **SWITCHES}.values():
        loc = (*loc, named)  # a rule across fields, reported by the field it names first
    flag = next((f for f, p in {**FLAGS, **SWITCHES}.items() if p == loc), None)
    where = flag or ".".join(loc) or "config"
    if " ==" in message:
        return f"{where}: {message}"
    if "input" in error and not isinstance(error["input"], dict) and flag:
        return f"{where} {error['input']!r}: {message}"
    return f"{where}: {message}"
