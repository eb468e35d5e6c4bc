"""Flags and YAML to a validated config; bad input exits 2 with one line naming flag, value and rule."""

import pytest

from trainer.cli import FLAGS, build_parser, parse_config
from trainer.launch.run import main


def test_defaults_are_the_main_job():
    config = parse_config([])
    assert (config.data.dataset, config.model.name, config.selector.strategy) == ("mnist5k", "lenet", "gradmatch-pb")
    assert (config.schedule.budget, config.schedule.kappa, config.data.val_fraction) == (0.1, 0.5, 0.1)


def test_flags_reach_their_branch():
    config = parse_config(["--strategy", "random", "--budget", "0.3", "--epochs", "7", "--lead", "0",
                           "--on-late", "wait", "--batch-size", "16", "--download", "--seed", "4"])
    assert config.selector.strategy == "random" and config.schedule.budget == 0.3
    assert config.train.epochs == 7 and config.schedule.lead == 0 and config.schedule.on_late == "wait"
    assert config.train.batch_size == 16 and config.data.download and config.seed == 4


def test_options_without_a_strategy_go_to_the_default_one():
    config = parse_config(["--valid"])
    assert config.selector.strategy == "gradmatch-pb" and config.selector.valid
    schedule = parse_config(["--strategy-schedule", "0:random,4:gradmatch"])
    assert schedule.selector.strategy == "random"
    assert [(c.epoch, c.selector.strategy) for c in schedule.strategy_schedule] == [(0, "random"), (4, "gradmatch")]


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 9\nselector:\n  strategy: gradmatch-pb\n  lam: 0.25\n")
    config = parse_config(["--config", str(path), "--budget", "0.2"])
    assert config.train.epochs == 9 and config.selector.lam == 0.25 and config.schedule.budget == 0.2
    # another strategy from the command line drops the file's options of the old one
    assert parse_config(["--config", str(path), "--strategy", "random"]).selector.strategy == "random"


def test_every_help_line_shows_its_default():
    parser = build_parser()
    helps = {action.option_strings[0]: action.help for action in parser._actions}
    assert set(FLAGS) <= set(helps)
    for flag, text in helps.items():
        assert flag == "-h" or "default:" in text, flag
    assert "(default: 0.1)" in helps["--budget"] and "(default: mnist5k)" in helps["--dataset"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--budget", "1.5"], "--budget '1.5': Input should be less than or equal to 1"),
        (["--budget", "0"], "--budget '0': Input should be greater than 0"),
        (["--dataset", "imagenet"], "--dataset: dataset == 'imagenet', must be one of mnist5k"),
        (["--model", "no_such_net"], "--model 'no_such_net': not one of lenet"),
        (["--model", "nosuchpkg.mod:fn"], "--model 'nosuchpkg.mod:fn': cannot import nosuchpkg.mod"),
        (["--lr", "inf"], "--lr 'inf': Input should be a finite number"),
        (["--budget", "nan"], "--budget 'nan': Input should be a finite number"),
        (["--select-every", "20", "--epochs", "10", "--kappa", "0"], "--select-every 20: no selection round fits"),
        (["--dataset", "digits", "--batch-size", "2000"], "--batch-size 2000: the budget of"),
        (["--dataset", "digits", "--budget", "0.05", "--pool", "0.02"], "--pool 0.02: a pool of 1 of the"),
        (["--pool", "0"], "--pool '0': Input should be greater than 0"),
        (["--seed", str(2**70)], "--seed"),
        (["--shards", "11", "--dataset", "digits"], "--shards 11: more shards than the 10 classes of digits"),
        (["--strategy", "craig-typo"], "--strategy 'craig-typo': must be one of 'full', 'full-earlystop', 'random'"),
        (["--epochs", "ten"], "--epochs 'ten': Input should be a valid integer"),
        (["--lead", "30"], "--lead: lead == 30, must be <= select_every (20)"),
        (["--device", "tpu"], "--device: device == 'tpu', must be auto, cpu, cuda or cuda:N"),
        (["--nope"], "unrecognized arguments: --nope"),
        (["--config", "/does/not/exist.yaml"], "--config /does/not/exist.yaml: cannot read"),
        (["--valid", "--strategy", "random"], "--valid: not an option of strategy 'random'"),
        (["--strategy", "full-earlystop"], "--time-budget-s: required by strategy 'full-earlystop'"),
        (["--strategy-schedule", "0:random,x"], "entry 'x' must be EPOCH:STRATEGY"),
        (["--strategy-schedule", "0:random,5:full"], "--strategy-schedule: strategy == 'full' cannot be scheduled"),
        (["--strategy-schedule", "5:random,2:craig"], "epochs == [5, 2], must be strictly increasing"),
        (["--match-run", "/nope", "--strategy", "full-earlystop"], "--match-run /nope: cannot read wall_s"),
        (["--strategy", "craig", "--strategy-schedule", "0:random"], "give the first strategy in one place"),
        (["--imbalance-drop", "2"], "--imbalance-drop '2': Input should be less than or equal to 1"),
        (["--divergence-guard", "maybe"], "--divergence-guard 'maybe': Input should be a valid boolean"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, expected, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_yaml_errors_name_the_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("selector:\n  strategy: gradmatch-pb\n  lam: -2\n")
    assert main(["--config", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "selector.lam" in capsys.readouterr().err
    path.write_text("- a\n- b\n")
    assert main(["--config", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "must hold a mapping" in capsys.readouterr().err


def test_an_existing_run_directory_is_never_overwritten(tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{}")
    assert main(["--out", str(tmp_path)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "summary.json").read_text() == "{}"


def test_run_directory_is_checked_before_anything_starts(tmp_path, capsys):
    assert main(["--out", ""]) == 2
    assert "--out '': must name a directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["--out", str(tmp_path / "file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "file" / "below")]) == 2
    assert "cannot create or write there" in capsys.readouterr().err


def test_yaml_that_plain_yaml_would_read_silently_wrong_is_refused(tmp_path, capsys):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  epochs: 3\n  epochs: 5\n")
    assert main(["--config", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "key 'epochs' given twice (line 3)" in capsys.readouterr().err
    path.write_text("train:\n  epochs: true\n")
    assert main(["--config", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "epochs == True, must be a number, not true or false" in capsys.readouterr().err


def test_binary_config_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(bytes(range(256)))
    assert main(["--config", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a text file" in err


# --- each check once per run ----------------------------------------------------------------------

CHECKS_ONCE = """
import json, logging, sys

import ray

RESULT = sys.argv[1]
CHECKS = RESULT + ".checks"


def count_checks():
    '''Ray's worker_process_setup_hook (and this driver): each check's debug line, with its process id, appended
    to one file.'''
    import logging

    handler = logging.FileHandler(CHECKS)
    handler.setFormatter(logging.Formatter("%(process)d %(message)s"))
    for name in ("trainer.client.schedule", "trainer.client.layers", "trainer.builtin.distributed"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)


count_checks()
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
         runtime_env={"worker_process_setup_hook": count_checks})
from trainer.launch.run import main

code = main(["--dataset", "synthetic", "--model", "mlp", "--epochs", "4", "--select-every", "2", "--budget", "0.25",
             "--threads", "1", "--device", "cpu", "--out", sys.argv[2]])
ray.shutdown()
lines = [line.split(" ", 1) for line in open(CHECKS).read().splitlines()]
json.dump({"code": code, "driver": __import__("os").getpid(),
           "checks": [(int(pid), text.split(":")[0]) for pid, text in lines]}, open(RESULT, "w"))
"""


def test_a_cli_run_checks_schedule_workers_cluster_and_classifier_once(tmp_path):
    """A whole run as the CLI makes it, on a real local Ray, counted in every process through each check's debug
    line: the schedule, the workers and the cluster are checked once, in the driver; the classifier is found once,
    in the trainer actor, whose client takes the driver's checked config without checking its schedule again."""
    from scripts import run_cluster_script

    script = tmp_path / "checks_once.py"
    script.write_text(CHECKS_ONCE.replace("sys.argv[2]", repr(str(tmp_path / "run"))))
    result = run_cluster_script(str(script), timeout_s=420, prefix="chk")
    assert result["code"] == 0
    checks = [name for _, name in result["checks"]]
    for name in ("check_schedule", "check_workers", "check_cluster", "find_classifier"):
        assert checks.count(name) == 1, result["checks"]
    where = {name: pid for pid, name in result["checks"]}
    assert where["check_schedule"] == where["check_workers"] == where["check_cluster"] == result["driver"]
    assert where["find_classifier"] != result["driver"]  # the trainer actor's own process


def test_a_checked_config_is_checked_again_with_options_or_another_training_set():
    """``AdaptiveSubset`` takes a ``CheckedConfig`` as it is only for the training set it was checked for and
    without keyword options; otherwise its schedule is checked as any config's (here refused, before Ray)."""
    import torch
    from torch.utils.data import TensorDataset

    from trainer import AdaptiveSubset
    from trainer.cli import ConfigError
    from trainer.client.schedule import CheckedConfig, check_run

    data = TensorDataset(torch.randn(40, 3), torch.arange(40) % 2)
    model = torch.nn.Linear(3, 2)
    late = parse_config(["--epochs", "10", "--kappa", "0", "--select-every", "50"])
    checked, errors, _ = check_run(late, 40)
    assert checked is None and errors[0].field == "schedule.select_every"
    with pytest.raises(ConfigError, match="select_every=50: no selection round fits"):
        AdaptiveSubset(model, data, config=CheckedConfig(late, n_train=400))  # checked for another training set
    fine = parse_config(["--epochs", "10", "--kappa", "0", "--select-every", "2"])
    checked, errors, _ = check_run(fine, 40)
    assert errors == [] and checked == CheckedConfig(fine, 40)
    with pytest.raises(ConfigError, match="select_every=50: no selection round fits"):
        AdaptiveSubset(model, data, config=checked, select_every=50)  # options make another config
