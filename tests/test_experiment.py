"""Experiments: grid expansion, the smoke preset end to end on the shared Ray, report consistency, resume."""

import json
import re

import pandas as pd
import pytest
from pydantic import ValidationError

from protocol.experiment import Grid
from trainer.experiment import PRESETS, expand, main
from trainer.report import COLUMNS


def test_grid_expansion_counts_and_matches():
    grid = Grid.model_validate(PRESETS["mnist5k-paper"])
    trials = expand(grid)
    # per seed: FULL + 6 strategies x 3 budgets x 2 kappas + FULL-EARLYSTOP x 3 budgets
    assert len(trials) == 3 * (1 + 6 * 3 * 2 + 3)
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
    from trainer.report import _energy_section

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
