"""An experiment's evidence: ``results.csv`` (a row per trial), ``report.md`` (the paper's tables, made
from the trials) and PNG plots (the paper's figures 3 and 4).

Definitions (docs/design.md §5, ``docs/metrics.md``): ``speedup = wall_s(FULL) / wall_s``, ``acc_drop = acc(FULL) -
acc`` in points, ``rel_error = 100 * acc_drop / acc(FULL)`` (relative test error w.r.t. FULL, in %), ``overhead =
wall_s / wall_s(RANDOM)`` at the same budget, kappa, R and seed, ``energy_ratio = energy_j(FULL) /
energy_j``. FULL and RANDOM references are taken from the same seed. ``staleness`` and ``late_adoptions`` come
from each trial's ``rounds.jsonl``; ``grad_error``, ``grad_error_rel`` (Table 8), ``grad_error_trained`` and
``redundant`` (Table 9) from its summary (a summary written before a field existed gives an empty cell).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

try:  # the [experiments] extra
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
except ImportError as exc:
    raise ImportError(f"the experiment report needs {exc.name}: pip install 'gradmatch[experiments]'") from None
import numpy as np  # noqa: E402
from scipy.stats import wilcoxon  # noqa: E402

from protocol.config import FULL, PAPER_NAMES, RANDOM, ROUND_STRATEGIES  # noqa: E402

COLUMNS = [
    "trial", "strategy", "label", "budget", "kappa", "R", "seed", "acc", "wall_s", "speedup", "acc_drop",
    "rel_error", "energy_j", "energy_ratio", "overhead", "stall_s", "selector_busy_s", "overlap", "staleness",
    "late_adoptions", "grad_error", "grad_error_rel", "grad_error_trained", "redundant", "epochs_run",
    "energy_training_j", "energy_summaries_j", "energy_stall_j",
]
GRAD_ERRORS = ("grad_error", "grad_error_rel", "grad_error_trained")
DERIVED = ("speedup", "acc_drop", "rel_error", "energy_ratio", "overhead")
PHASES = ("training", "summaries", "stall")


def label(strategy: str, kappa: float) -> str:
    """The paper's row name: GRAD-MATCH-PB, GRAD-MATCH-PB-WARM, ..."""
    name = PAPER_NAMES[strategy]
    return f"{name}-WARM" if kappa > 0 and strategy in ROUND_STRATEGIES else name


def adoption_stats(path: Path) -> tuple[float | None, int]:
    """Mean staleness (epochs from snapshot to adoption) and the number of late adoptions (adopted after the
    round's due epoch) over the adopted rounds of one ``rounds.jsonl``; (None, 0) when none was adopted."""
    staleness, late = [], 0
    lines = path.read_text().splitlines() if path.exists() else []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON round record ({exc.msg})") from None
        if record.get("status") != "adopted":
            continue
        staleness.append(record["staleness"] if record.get("staleness") is not None
                         else record["adopted_epoch"] - record["trigger_epoch"])
        late += int(record["adopted_epoch"] > record["due_epoch"])
    return (float(np.mean(staleness)) if staleness else None), late


def results_table(experiment, failed: dict) -> pd.DataFrame:
    """One row per finished trial with the derived ratios."""
    rows = []
    for trial in experiment.trials:
        if trial.key in failed or not experiment.done(trial):
            continue
        s = experiment.summary(trial)
        selects = trial.strategy in ROUND_STRATEGIES
        staleness, late = adoption_stats(experiment.trial_dir(trial) / "rounds.jsonl") if selects else (None, None)
        rows.append({"trial": trial.key, "strategy": trial.strategy, "label": label(trial.strategy, trial.kappa),
                     "budget": trial.budget, "kappa": trial.kappa, "R": trial.select_every, "seed": trial.seed,
                     "acc": s["acc"], "wall_s": s["wall_s"], "energy_j": s["energy_j"], "stall_s": s["stall_s"],
                     "selector_busy_s": s["selector_busy_s"], "overlap": s["overlap"], "staleness": staleness,
                     "late_adoptions": late, **{key: s.get(key) for key in GRAD_ERRORS}, "redundant": s["redundant"],
                     "epochs_run": s["epochs_run"],
                     **{f"energy_{phase}_j": s["energy_phases"].get(phase) for phase in PHASES}})
    frame = pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in DERIVED])
    frame[list(GRAD_ERRORS)] = frame[list(GRAD_ERRORS)].astype(float)  # a field missing everywhere: NaN, not None
    return _derive(frame)[COLUMNS]


def _derive(frame: pd.DataFrame) -> pd.DataFrame:
    full = frame[frame.strategy == FULL].set_index("seed")
    ref = frame.seed.map(full.wall_s)
    frame["speedup"] = ref / frame.wall_s
    frame["acc_drop"] = frame.seed.map(full.acc) - frame.acc
    frame["rel_error"] = 100 * frame.acc_drop / frame.seed.map(full.acc)
    frame["energy_ratio"] = frame.seed.map(full.energy_j) / frame.energy_j
    keys = ["budget", "kappa", "R", "seed"]
    random = frame[frame.strategy == RANDOM].set_index(keys).wall_s
    frame["overhead"] = [
        row.wall_s / random.get(tuple(row[k] for k in keys), np.nan) for _, row in frame.iterrows()
    ]
    return frame


# --- markdown -----------------------------------------------------------------------------------

def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value, digits=2) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def _order(frame: pd.DataFrame) -> list[str]:
    first = ["FULL", "RANDOM", "RANDOM-WARM"]
    labels = list(dict.fromkeys(frame.label))
    return [lab for lab in first if lab in labels] + sorted(lab for lab in labels if lab not in first)


def accuracy_time_table(frame: pd.DataFrame) -> str:
    """Tables 2-4: mean test accuracy and wall time per strategy and budget; the best accuracy of each
    budget (FULL aside) in bold."""
    budgets = sorted(frame[frame.strategy != FULL].budget.unique())
    means = frame.groupby(["label", "budget"])[["acc", "wall_s"]].mean()
    full = frame[frame.strategy == FULL][["acc", "wall_s"]].mean()
    best = {b: means.xs(b, level="budget").acc.idxmax() for b in budgets}
    rows = []
    for lab in _order(frame):
        cells = [lab]
        for kind in ("acc", "wall_s"):
            for b in budgets:
                value = full[kind] if lab == "FULL" else means[kind].get((lab, b), np.nan)
                text = _fmt(value)
                cells.append(f"**{text}**" if kind == "acc" and lab != "FULL" and best[b] == lab else text)
        rows.append(cells)
    header = ["strategy"] + [f"acc {b:g}" for b in budgets] + [f"wall_s {b:g}" for b in budgets]
    return markdown_table(header, rows)


def mean_std_table(frame: pd.DataFrame, column: str, digits: int = 2, drop_missing: bool = False,
                   also: dict[str, str] | None = None) -> str:
    """Mean ± std over seeds of ``column`` per strategy and budget (``drop_missing``: rows without a value
    left out, e.g. FULL for the gradient error); ``also`` (``{suffix: column}``) adds a column per budget of
    each, headed ``"<budget> <suffix>"``, after those of ``column``."""
    frame = frame[frame[column].notna()] if drop_missing else frame
    budgets = sorted(frame[frame.strategy != FULL].budget.unique())
    columns = [("", column), *((f" {suffix}", name) for suffix, name in (also or {}).items())]
    rows = [[lab] for lab in _order(frame)]
    for _, name in columns:
        stats = frame.groupby(["label", "budget"])[name].agg(["mean", "std"])
        full = frame[frame.strategy == FULL][name]
        for cells in rows:
            for b in budgets:
                if cells[0] == "FULL":
                    mean, std = full.mean(), full.std()
                else:
                    mean, std = stats.loc[(cells[0], b)] if (cells[0], b) in stats.index else (np.nan, np.nan)
                cells.append(f"{_fmt(mean, digits)} ± {_fmt(std, digits)}")
    return markdown_table(["strategy"] + [f"{b:g}{suffix}" for suffix, _ in columns for b in budgets], rows)


def wilcoxon_table(frame: pd.DataFrame) -> str:
    """Table 6: one-tailed Wilcoxon signed-rank p-values that the row beats the column in accuracy,
    paired over (budget, seed)."""
    labels = [lab for lab in _order(frame) if lab != "FULL"]
    paired = frame[frame.strategy != FULL].pivot_table(index=["budget", "seed"], columns="label", values="acc")
    rows = []
    for a in labels:
        cells = [a]
        for b in labels:
            cells.append("-" if a == b else _wilcoxon_p(paired, a, b))
        rows.append(cells)
    return markdown_table(["row beats column"] + labels, rows)


def _wilcoxon_p(paired: pd.DataFrame, a: str, b: str) -> str:
    pairs = paired[[a, b]].dropna()
    diff = pairs[a] - pairs[b]
    if len(pairs) < 2 or np.all(diff == 0):
        return "n/a"
    return f"{wilcoxon(pairs[a], pairs[b], alternative='greater').pvalue:.3f}"


# --- plots --------------------------------------------------------------------------------------

_BASES = list(PAPER_NAMES.values())


def _style(lab: str) -> dict:
    """One colour per strategy (FULL black), dashed lines for the warm-start variants."""
    base = lab.removesuffix("-WARM")
    color = "black" if base == "FULL" else plt.get_cmap("tab10")(_BASES.index(base) % 10)
    return {"color": color, "linestyle": "--" if lab.endswith("-WARM") else "-"}

def _scatter(frame: pd.DataFrame, y: str, path: Path, ylabel: str, title: str) -> None:
    points = frame[(frame.strategy != FULL)].groupby(["label", "budget"])[["rel_error", y]].mean().reset_index()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for lab, part in points.groupby("label"):
        part = part.sort_values("budget")
        ax.plot(part.rel_error.clip(lower=1e-2), part[y], marker="o", label=lab, **_style(lab))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("relative test error w.r.t. FULL (%, log; clipped at 0.01)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_over_time(experiment, frame: pd.DataFrame, path: Path) -> None:
    """Fig. 3e: validation accuracy against wall time at the largest budget, seed of the first trial."""
    budget = frame[frame.strategy != FULL].budget.max()
    seed = frame.seed.min()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for _, row in frame[((frame.budget == budget) | (frame.strategy == FULL)) & (frame.seed == seed)].iterrows():
        epochs = [json.loads(line) for line in
                  (experiment.out / "trials" / row.trial / "epochs.jsonl").read_text().splitlines()]
        points = [(e["wall_s"], e["val_acc"]) for e in epochs if e["val_acc"] is not None]
        if points:
            ax.plot(*zip(*points), marker=".", label=row.label, **_style(row.label))
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"accuracy over time, budget {budget:g}, seed {seed}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ablation(frame: pd.DataFrame, column: str, path: Path, xlabel: str) -> None:
    """Fig. 4: accuracy against R or kappa per strategy, at each budget."""
    selecting = frame[frame.strategy.isin(ROUND_STRATEGIES)]
    part = selecting.groupby(["strategy", "budget", column]).acc.mean().reset_index()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for (strategy, budget), group in part.groupby(["strategy", "budget"]):
        style = _style(PAPER_NAMES[strategy])
        ax.plot(group[column], group.acc, marker="o", label=f"{PAPER_NAMES[strategy]} {budget:g}",
                color=style["color"], alpha=0.4 + 0.6 * budget / part.budget.max())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plots(experiment, frame: pd.DataFrame) -> list[str]:
    out = experiment.out
    made = []
    _scatter(frame, "speedup", out / "fig3_speedup_vs_error.png", "speedup w.r.t. FULL (log)",
             "speedup vs relative error")
    made.append("fig3_speedup_vs_error.png")
    if frame.energy_ratio.notna().any():
        _scatter(frame.dropna(subset=["energy_ratio"]), "energy_ratio", out / "fig3_energy_vs_error.png",
                 "energy ratio w.r.t. FULL (log)", "energy savings vs relative error")
        made.append("fig3_energy_vs_error.png")
    accuracy_over_time(experiment, frame, out / "fig3_accuracy_over_time.png")
    made.append("fig3_accuracy_over_time.png")
    for column, name, xlabel in (("R", "fig4_ablation_R.png", "R (epochs between rounds)"),
                                 ("kappa", "fig4_ablation_kappa.png", "kappa (share of epochs on subsets)")):
        if frame[frame.strategy.isin(ROUND_STRATEGIES)][column].nunique() > 1:
            ablation(frame, column, out / name, xlabel)
            made.append(name)
    return made


# --- the report ---------------------------------------------------------------------------------

def write_report(experiment, failed: dict, command: str, elapsed_s: float) -> Path:
    frame = results_table(experiment, failed)
    frame.to_csv(experiment.out / "results.csv", index=False)
    figures = plots(experiment, frame) if len(frame) else []
    text = _report_text(experiment, frame, failed, command, elapsed_s, figures)
    path = experiment.out / "report.md"
    path.write_text(text)
    return path


def _report_text(experiment, frame, failed, command, elapsed_s, figures) -> str:
    grid = experiment.grid
    energy_note = _energy_note(experiment, frame)
    parts = [
        f"# Experiment `{grid.name}`",
        f"`{command}` — {len(frame)} of {len(experiment.trials)} trials finished, {elapsed_s:.0f} s this "
        f"invocation, on {platform.node() or 'this machine'} ({platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}). Results: `results.csv`; each trial's run directory: `trials/`.",
        "Definitions: speedup = wall_s(FULL) / wall_s; acc_drop = acc(FULL) - acc (points); relative error = "
        "100 acc_drop / acc(FULL); overhead = wall_s / wall_s(RANDOM) at the same budget, kappa, R and seed. "
        "Means are over seeds.",
        "## Accuracy (%) and training time (s) per budget (paper Tables 2-4)",
        "Best accuracy per budget in bold (FULL aside).",
        accuracy_time_table(frame),
        "## Energy (J) (paper Table 5)",
        _energy_section(frame) if frame.energy_j.notna().any() else f"Not measured: {energy_note}",
        "## Test accuracy, mean ± std over seeds (paper Table 7)",
        mean_std_table(frame, "acc"),
        "## One-tailed Wilcoxon signed-rank p-values (paper Table 6)",
        "Probability of seeing at least this advantage in accuracy of the row over the column if neither "
        "were better; paired over (budget, seed); n/a with fewer than two pairs or no differences.",
        wilcoxon_table(frame),
        "## Gradient error of the subsets, paper Eq. 1 (paper Table 8)",
        "grad_error = ||sum_S w_i g_i - target|| at each round's snapshot, with the weights the strategy returned, "
        "over the gradient it matched: per class in the class's own logit column for GRAD-MATCH, the mini-batch "
        "rows for GRAD-MATCH-PB (each against its train or val target), the whole last-layer training gradient "
        "for the others. Absolute, as the paper prints it, and relative to ||target|| (\"rel\" columns). Mean "
        "over a trial's adopted rounds, then mean ± std over seeds. See docs/metrics.md.",
        mean_std_table(frame, "grad_error", 3, drop_missing=True, also={"rel": "grad_error_rel"})
        if frame.grad_error.notna().any() else "No strategy of this grid selects.",
        "## Gradient error of the subsets as trained",
        "grad_error_trained = ||sum_S w^_i g_i - sum_U g_i|| / ||sum_U g_i|| over the whole last-layer gradient, "
        "U every training example, the subset weighted as training weighs it (w^_i = n w_i / sum_S w per example; "
        "a chosen batch's own mean gradient in the PB variants); 0 for a subset that trains like a full epoch.",
        mean_std_table(frame, "grad_error_trained", 3, drop_missing=True)
        if frame.grad_error_trained.notna().any() else "Not recorded by these trials.",
        "## Redundant points: share of training examples never used for training in the whole run (paper Table 9)",
        "Examples neither in a subset that was trained on nor in a full epoch (warm start included).",
        mean_std_table(frame, "redundant", 3, drop_missing=True)
        if frame.redundant.notna().any() else "No strategy of this grid selects.",
        "## Staleness of adopted subsets (epochs between a round's snapshot and its adoption)",
        "Mean over a trial's adopted rounds, then mean ± std over seeds.",
        mean_std_table(frame, "staleness", 2, drop_missing=True)
        if frame.staleness.notna().any() else "No round was adopted.",
        "## Late adoptions per trial (rounds adopted after their due epoch)",
        mean_std_table(frame, "late_adoptions", 2, drop_missing=True)
        if frame.late_adoptions.notna().any() else "No strategy of this grid selects.",
        "## What selection cost (overhead = wall_s / wall_s(RANDOM))",
        mean_std_table(frame, "overhead", 3, drop_missing=True) if frame.overhead.notna().any()
        else "No RANDOM trials to compare with.",
        "## Time the trainer waited on the selector (stall_s)",
        _stall_note(experiment),
        mean_std_table(frame[frame.strategy != FULL], "stall_s", 3, drop_missing=True),
        "## Figures",
        *[f"![{name}]({name})" for name in figures],
    ]
    if failed:
        parts += ["## Failed trials", markdown_table(["trial", "error"], [[k, v] for k, v in failed.items()])]
    return "\n\n".join(parts) + "\n"


def _stall_note(experiment) -> str:
    modes = sorted({t.config["schedule"]["on_late"] for t in experiment.trials if t.strategy in ROUND_STRATEGIES})
    if modes == ["wait"]:
        return "All trials ran with on_late = wait: stall_s is the time the trainer waited on late subsets."
    return ("Trials with on_late = continue never wait (a late subset is adopted at a later boundary), so their "
            "stall_s and overlap are 0 and 1 by construction, not measurements; their cost shows as staleness "
            "and late adoptions above. stall_s measures waiting only in on_late = wait mode.")


def _energy_section(frame: pd.DataFrame) -> str:
    """Total energy per strategy and budget, then the trainer's phases (selection runs concurrently)."""
    parts = [mean_std_table(frame, "energy_j", 1)]
    for phase in PHASES:
        parts += [f"Phase `{phase}`:", mean_std_table(frame, f"energy_{phase}_j", 1, drop_missing=True)]
    return "\n\n".join(parts)


def _energy_note(experiment, frame) -> str:
    for trial in frame.trial:
        summary = json.loads((experiment.out / "trials" / trial / "summary.json").read_text())
        return summary["energy_note"]
    return "no trial finished"

