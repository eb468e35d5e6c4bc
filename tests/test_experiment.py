"""Experiments: grid expansion, the smoke preset end to end on the shared Ray, report consistency, resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from protocol.experiment import Grid
from trainer.experiments.report import COLUMNS, _report_text, adoption_stats, results_table
from trainer.experiments.runner import PRESETS, Experiment, expand, main


def test_grid_expansion_counts_and_matches():
    grid = Grid.model_validate(PRESETS["mnist5k-paper"])
    trials = expand(grid)
    combos = {(t.strategy, t.budget, t.kappa, t.select_every, t.seed) for t in trials if t.strategy != "full"}
    assert {(s, b, k, 10, seed) for s in ("random", "gradmatch", "gradmatch-pb", "craig", "craig-pb", "glister")
            for b in (0.05, 0.1, 0.3) for k in (0, 0.5) for seed in range(5)} <= combos
    assert sorted(t.seed for t in trials if t.strategy == "full") == [0, 1, 2, 3, 4]
    # per seed: FULL + 6 strategies x 3 budgets x 2 kappas + FULL-EARLYSTOP x 3 budgets
    assert len(trials) == 5 * (1 + 6 * 3 * 2 + 3)
    assert len({t.key for t in trials}) == len(trials)
    by_key = {t.key: t for t in trials}
    for trial in trials:
        if trial.strategy == "full-earlystop":
            matched = by_key[trial.matches]
            assert (matched.strategy, matched.kappa) == ("gradmatch-pb", 0.5)
            assert (matched.budget, matched.seed) == (trial.budget, trial.seed)
    assert [t.key for t in expand(grid)] == [t.key for t in trials]  # stable: resumable


def test_grid_errors_name_the_field():
    with pytest.raises(ValidationError, match="strategies"):
        Grid.model_validate({"name": "x", "strategies": ["nope"]})
    with pytest.raises(ValidationError, match="earlystop_match"):
        Grid.model_validate({"name": "x", "strategies": ["random", "full-earlystop"]})
    with pytest.raises(ValidationError, match="earlystop_match == 'full', must be a strategy that selects"):
        Grid.model_validate({"name": "x", "strategies": ["full", "full-earlystop"], "earlystop_match": "full"})
    with pytest.raises(ValidationError, match="budgets contains 2"):
        Grid.model_validate({"name": "x", "strategies": ["random"], "budgets": [2]})
    with pytest.raises(ValidationError, match="Extra inputs"):
        Grid.model_validate({"name": "x", "strategies": ["random"], "base": {"train": {"epoch": 3}}})


def _markdown_section(text: str, heading: str) -> list[list[str]]:
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_smoke_preset_end_to_end_and_resume(ray_address, tmp_path, capsys):
    out = tmp_path / "smoke"
    # each trial reserves both CPUs of the shared 2-CPU Ray: they must run one after another
    assert main(["--preset", "smoke", "--out", str(out), "--trial-cpus", "2"]) == 0
    spans = sorted((t["started"], t["finished"]) for t in
                   (json.loads(p.read_text()) for p in out.glob("trials/*/trial.json")))
    assert len(spans) == 14 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    results = pd.read_csv(out / "results.csv")
    grid = Grid.model_validate(PRESETS["smoke"])
    assert list(results.columns) == COLUMNS and len(results) == len(expand(grid)) == 14
    for name in ("report.md", "fig3_speedup_vs_error.png", "fig3_accuracy_over_time.png"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / image).exists(), image

    # the accuracy table is the CSV's means, and its bold cell per budget is the CSV's best
    table = _markdown_section(report, "(paper Tables 2-4)")
    budgets = sorted(results[results.strategy != "full"].budget.unique())
    means = results.groupby(["label", "budget"]).acc.mean()
    for row in table:
        label, cells = row[0], row[1:1 + len(budgets)]
        for budget, cell in zip(budgets, cells):
            expected = results[results.strategy == "full"].acc.mean() if label == "FULL" else means[(label, budget)]
            assert float(cell.strip("*")) == pytest.approx(expected, abs=0.006)
    for i, budget in enumerate(budgets):
        bold = [row[0] for row in table if row[1 + i].startswith("**")]
        best = means.xs(budget, level="budget").drop("FULL", errors="ignore").idxmax()
        assert bold == [best]

    # derived columns follow their definitions
    full = results[results.strategy == "full"].set_index("seed")
    for _, row in results.iterrows():
        assert row.speedup == pytest.approx(full.wall_s[row.seed] / row.wall_s)
        assert row.acc_drop == pytest.approx(full.acc[row.seed] - row.acc)
    random = results[results.strategy == "random"].set_index(["budget", "seed"]).wall_s
    for _, row in results[results.strategy == "gradmatch-pb"].iterrows():
        assert row.overhead == pytest.approx(row.wall_s / random[(row.budget, row.seed)])
    # FULL-EARLYSTOP ran for the wall time of the GRAD-MATCH-PB trial it matches
    for trial in expand(grid):
        if trial.matches:
            summary = json.loads((out / "trials" / trial.key / "summary.json").read_text())
            matched = json.loads((out / "trials" / trial.matches / "summary.json").read_text())
            assert summary["time_budget_s"] == pytest.approx(matched["wall_s"])
    # Wilcoxon table holds p-values in [0, 1] or n/a
    for row in _markdown_section(report, "(paper Table 6)"):
        for cell in row[1:]:
            assert cell in ("-", "n/a") or 0 <= float(cell) <= 1

    # resume: nothing reruns; a removed trial reruns alone
    capsys.readouterr()
    stamps = {p: p.stat().st_mtime for p in out.glob("trials/*/summary.json")}
    assert main(["--preset", "smoke", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime for p in out.glob("trials/*/summary.json")} == stamps
    victim = sorted(stamps)[3]
    victim.unlink()
    assert main(["--preset", "smoke", "--out", str(out)]) == 0
    assert victim.exists()
    assert {p: p.stat().st_mtime for p in stamps if p != victim} == {p: stamps[p] for p in stamps if p != victim}
    assert "14 of 14 trials done" in capsys.readouterr().out


def test_unknown_preset_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--preset", "nope"])
    assert info.value.code == 2 and "--preset 'nope': must be one of smoke" in capsys.readouterr().err


def test_energy_tables_when_counters_exist():
    from trainer.experiments.report import _energy_section

    frame = pd.DataFrame({
        "label": ["FULL", "FULL", "RANDOM", "RANDOM"], "strategy": ["full", "full", "random", "random"],
        "budget": [1.0, 1.0, 0.1, 0.1], "energy_j": [100.0, 120.0, 10.0, 14.0],
        "energy_training_j": [90.0, 110.0, 8.0, 12.0], "energy_summaries_j": [None, None, 1.0, 1.0],
        "energy_stall_j": [0.0, 0.0, 0.5, 0.5],
    })
    text = _energy_section(frame)
    assert "| FULL | 110.0 ± 14.1 |" in text and "| RANDOM | 12.0 ± 2.8 |" in text
    summaries = text.split("Phase `summaries`:")[1].split("Phase")[0]
    assert "FULL" not in summaries and "| RANDOM | 1.0 ± 0.0 |" in summaries


def _round(status, trigger, due, adopted=None, staleness=None):
    return {"round": 0, "strategy": "random", "model_step": 0, "trigger_epoch": trigger, "due_epoch": due,
            "adopted_epoch": adopted, "status": status, "staleness": staleness}


def test_adoption_stats_read_the_adopted_rounds(tmp_path):
    path = tmp_path / "rounds.jsonl"
    rounds = [_round("adopted", 3, 4, 4, 1), _round("adopted", 7, 8, 10, 3), _round("failed", 11, 12),
              _round("adopted", 11, 12, 12)]  # no staleness field: adopted - trigger
    path.write_text("".join(json.dumps(r) + "\n" for r in rounds))
    assert adoption_stats(path) == (pytest.approx((1 + 3 + 1) / 3), 1)
    path.write_text(json.dumps(_round("timeout", 3, 4)) + "\n")
    assert adoption_stats(path) == (None, 0)
    assert adoption_stats(tmp_path / "absent.jsonl") == (None, 0)
    path.write_text('{"status": "adop')
    with pytest.raises(ValueError, match="rounds.jsonl:1: not a JSON round record"):
        adoption_stats(path)


def test_results_and_report_carry_tables_8_9_and_staleness(tmp_path):
    grid = Grid.model_validate({"name": "fake", "strategies": ["random", "gradmatch"], "budgets": [0.1],
                                "kappas": [0], "seeds": [0, 1]})
    experiment = Experiment(grid, tmp_path, 1.0, 0.0)
    values = {}  # trial key: (grad_error, redundant, stalenesses, late)
    for i, trial in enumerate(experiment.trials):
        folder = experiment.trial_dir(trial)
        folder.mkdir(parents=True)
        selects = trial.strategy != "full"
        grad_error, redundant = (0.1 * (i + 1), 0.01 * i) if selects else (None, None)
        summary = {"acc": 90.0 + i, "wall_s": 10.0 - i, "energy_j": None, "stall_s": 0.0, "selector_busy_s": 1.0,
                   "overlap": 1.0, "grad_error": grad_error, "redundant": redundant, "epochs_run": 4,
                   "energy_phases": {}, "energy_note": "no counters"}
        if trial.seed == 0:  # seed 1's summaries were written before the relative and as-trained errors existed
            summary.update(grad_error_rel=grad_error and grad_error / 10, grad_error_trained=grad_error and 0.5 + i)
        (folder / "summary.json").write_text(json.dumps(summary))
        rounds = [_round("adopted", 1, 2, 2 + i % 3, 1 + i % 3), _round("adopted", 3, 4, 4, 1)] if selects else []
        (folder / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
        values[trial.key] = (grad_error, redundant, (2 + i % 3) / 2 if selects else None,
                             int(i % 3 > 0) if selects else None)
    frame = results_table(experiment, {})
    assert list(frame.columns) == COLUMNS and len(frame) == 6
    for _, row in frame.iterrows():
        grad_error, redundant, staleness, late = values[row.trial]
        if row.strategy == "full":
            assert pd.isna(row.grad_error) and pd.isna(row.staleness) and pd.isna(row.late_adoptions)
        else:
            assert (row.grad_error, row.redundant) == pytest.approx((grad_error, redundant))
            if row.seed == 0:
                assert (row.grad_error_rel, row.grad_error_trained) == pytest.approx((grad_error / 10, row.acc - 89.5))
            else:
                assert pd.isna(row.grad_error_rel) and pd.isna(row.grad_error_trained)
            assert (row.staleness, row.late_adoptions) == pytest.approx((staleness, late))
    report = _report_text(experiment, frame, {}, "cmd", 0.0, [])
    table8 = {row[0]: row[1] for row in _markdown_section(report, "(paper Table 8)")}
    assert set(table8) == {"RANDOM", "GRAD-MATCH"}  # every strategy that selects, FULL has none
    table8_rel = {row[0]: row[2] for row in _markdown_section(report, "(paper Table 8)")}
    as_trained = {row[0]: row[1] for row in _markdown_section(report, "## Gradient error of the subsets as trained")}
    assert "| strategy | 0.1 | 0.1 rel |" in report and set(as_trained) == {"RANDOM", "GRAD-MATCH"}
    for name, strategy in (("RANDOM", "random"), ("GRAD-MATCH", "gradmatch")):
        errors = frame[frame.strategy == strategy].grad_error
        assert table8[name] == f"{errors.mean():.3f} ± {errors.std():.3f}"
        rel = frame[frame.strategy == strategy].grad_error_rel.dropna()  # one seed: std is missing
        assert table8_rel[name] == f"{rel.mean():.3f} ± -" and len(rel) == 1
        trained = frame[frame.strategy == strategy].grad_error_trained.dropna()
        assert as_trained[name] == f"{trained.mean():.3f} ± -"
    table9 = {row[0]: row[1] for row in _markdown_section(report, "(paper Table 9)")}
    redundant = frame[frame.strategy == "gradmatch"].redundant
    assert table9["GRAD-MATCH"] == f"{redundant.mean():.3f} ± {redundant.std():.3f}"
    assert "never used for training in the whole run" in report
    staleness = {row[0]: row[1] for row in _markdown_section(report, "(epochs between a round's snapshot")}
    assert staleness["RANDOM"] == f"{frame[frame.strategy == 'random'].staleness.mean():.2f} ± " \
                                  f"{frame[frame.strategy == 'random'].staleness.std():.2f}"
    late = {row[0]: row[1] for row in _markdown_section(report, "(rounds adopted after their due epoch)")}
    assert late["GRAD-MATCH"] == f"{frame[frame.strategy == 'gradmatch'].late_adoptions.mean():.2f} ± " \
                                 f"{frame[frame.strategy == 'gradmatch'].late_adoptions.std():.2f}"
    assert "All trials ran with on_late = wait" in report  # the default: stall_s is a measurement


def test_missing_data_stops_the_experiment_before_ray(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"name: bad\nbase: {{data: {{dataset: mnist, data_root: {tmp_path / 'none'}}}}}\n"
                    "strategies: [random]\nbudgets: [0.1]\nkappas: [0]\nselect_every: [1]\nseeds: [0]\n")
    with pytest.raises(SystemExit) as stop:
        main(["--grid", str(grid), "--out", str(tmp_path / "exp")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MNIST/raw/train-images-idx3-ubyte is missing" in err
    assert not (tmp_path / "exp" / "trials").exists()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig, inherited", [(signal.SIGTERM, None), (signal.SIGINT, None),
                                            (signal.SIGINT, "ignored")])
def test_a_signal_stops_the_runner_with_one_line_and_keeps_finished_trials(ray_address, tmp_path, sig, inherited):
    """``inherited="ignored"``: started by a parent that ignores SIGINT (a shell's background job, or a test
    process whose SIGINT another library left ignored); Python would keep ignoring it, the runner must not."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_ADDRESS": ray_address}
    runner = subprocess.Popen([sys.executable, "-m", "trainer.experiment", "--preset", "smoke", "--out",
                               str(tmp_path / "x")], cwd=root, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, preexec_fn=_ignore_sigint if inherited else None)
    end = time.monotonic() + 120
    while not (tmp_path / "x" / "trials").exists():
        assert time.monotonic() < end and runner.poll() is None, runner.communicate()[1][-2000:]
        time.sleep(0.1)
    runner.send_signal(sig)
    _, err = runner.communicate(timeout=120)
    assert runner.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "run the same command again" in err, err[-2000:]
