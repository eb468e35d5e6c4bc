"""The installable package: the gradmatch command, and one-line errors when an optional extra is missing."""

import subprocess
import sys

import pytest

from scripts import ROOT
from trainer.console import main


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_gradmatch_command_dispatches_to_run_and_experiment(capsys):
    assert main([]) == 2 and "usage: gradmatch {run,experiment}" in capsys.readouterr().out
    assert main(["train"]) == 2
    assert capsys.readouterr().err.strip() == "error: gradmatch train: unknown command; use one of run, experiment"
    for command, module in (("run", "trainer.run"), ("experiment", "trainer.experiment")):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0 and f"python -m {module}" in capsys.readouterr().out


@pytest.mark.parametrize("blocked, module, message", [
    ("matplotlib", "trainer.experiments.report", "the experiment report needs matplotlib: pip install 'gradmatch[experiments]'"),
    ("pandas", "trainer.experiments.report", "the experiment report needs pandas: pip install 'gradmatch[experiments]'"),
    ("lightning", "trainer.integrations.lightning",
     "trainer.integrations.lightning needs lightning: pip install 'gradmatch[lightning]'"),
    ("transformers", "trainer.integrations.hf", "trainer.integrations.hf needs transformers: pip install 'gradmatch[hf]'"),
])
def test_a_missing_extra_is_named_in_one_line(blocked, module, message):
    done = python(f"import sys; sys.modules[{blocked!r}] = None; sys.modules[{blocked!r} + '.pytorch'] = None\n"
                  f"try:\n    import {module}\nexcept ImportError as exc:\n    print(exc)")
    assert done.stdout.strip() == message, done.stderr[-2000:]


def test_the_experiment_refuses_to_start_without_its_report_packages():
    done = python("import sys; sys.modules['matplotlib'] = None\n"
                  "from trainer.experiment import main\nsys.exit(main(['--preset', 'smoke', '--out', '/nonexistent']))")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: the experiment report needs matplotlib: pip install 'gradmatch[experiments]'"


def test_the_core_modules_import_without_the_extras():
    done = python("import sys\nfor name in ('matplotlib', 'pandas', 'lightning', 'transformers', 'accelerate', 'pyJoules',\n"
                  "             'tensorboard', 'torch.utils.tensorboard'):\n"
                  "    sys.modules[name] = None\n"
                  "import trainer.run, trainer.experiment, trainer.api, trainer.integrations.sampler, trainer.console\n"
                  "print('ok')")
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
