"""examples/reproduce.sh end to end on the tiny CPU model: NTP warm-up from random init (BASE
empty), evaluation set, format cold start, all six variants trained and evaluated, table,
learning statistics and plots. Checks that every file is there and has the right shape, not
the numbers (a few steps of a 2-layer model). About 3 minutes on 2 cores: most of it is the
~25 Python processes the script starts. Deselect with `-m "not slow"`."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GPT2, missing, require_module

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ["ntp", "rpt", "rmt", "no_dtb", "no_cas", "no_ntp"]
STEPS, WARMUP_STEPS = 2, 3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _linux():
    if sys.platform != "linux":
        missing("Linux", "the script is bash, tested on Linux")


# As small as the cold start goes: 8 positions per level of 10 documents, one pass.
COLDSTART = """\
data:
  micro_batch_size: 4
  global_batch_size: 4
optim:
  lr: 3.0e-3
coldstart:
  coldstart_per_level: 8
  coldstart_candidates: 4
  coldstart_epochs: 1
  coldstart_max_documents: 10
"""


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """Runs the script once; returns (OUT, its output)."""
    require_module("matplotlib", "the script's plots need it; `make venv` installs it into .venv")
    tmp = tmp_path_factory.mktemp("reproduce")
    coldstart = tmp / "coldstart.yaml"
    coldstart.write_text(COLDSTART)
    out = tmp / "out"
    env = {
        **os.environ,
        # `python` in the script is this interpreter (its venv).
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "OUT": str(out),
        "BASE": "",
        "TOK": " ".join(GPT2),
        "MODEL_CONFIG": "configs/tiny_cpu.yaml",
        "SCALE": "configs/reproduce_tiny.yaml",
        "COLDSTART_CONFIG": str(coldstart),
        "ROLLOUT": "embedded",
        "STEPS": str(STEPS),
        "WARMUP_STEPS": str(WARMUP_STEPS),
        "VARIANTS": " ".join(VARIANTS),
        "EVAL_TEXT": "corpus/sample_math.jsonl",  # overlaps training: shapes only
        "EVAL_FIELD": "text",
        "EVAL_DOCS": "10",
        "EVAL_PER_LEVEL": "4",
        "EVAL_SAMPLES": "2",
    }
    env.pop("SET", None)
    proc = subprocess.run(
        ["bash", "examples/reproduce.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return out, proc.stdout


def _iteration(folder: Path) -> int:
    return int((folder / "latest_checkpointed_iteration.txt").read_text())


def test_every_stage_leaves_its_checkpoint(reproduced):
    out, stdout = reproduced
    assert _iteration(out / "base") == WARMUP_STEPS
    assert _iteration(out / "coldstart") == 0
    assert (out / "coldstart" / "examples.jsonl").read_text().strip()
    for v in VARIANTS:
        assert _iteration(out / "runs" / v) == STEPS, v
    stages = re.findall(r"^== (\w+)", stdout, flags=re.M)
    assert stages.count("training") == len(VARIANTS)
    assert stages.count("evaluating") == len(VARIANTS) + 2  # base and cold start too


def test_metrics_have_one_record_per_step(reproduced):
    out, _ = reproduced
    for v in VARIANTS:
        lines = (out / "metrics" / f"{v}.jsonl").read_text().splitlines()
        assert len(lines) == STEPS, v


def test_table_has_an_ntp_and_an_ntr_row_per_model(reproduced):
    out, stdout = reproduced
    models = ["base", "coldstart", *VARIANTS]
    for name in models:
        assert (out / "results" / f"{name}.json").is_file(), name
    lines = (out / "results" / "table.md").read_text().strip().splitlines()
    assert lines[0].startswith("| Model | Easy | Medium | Hard | Average |")
    rows = [line for line in lines[2:] if line.startswith("| ")]
    names = [row.split(" | ")[0][2:] for row in rows]
    assert names == [f"{m} ({s})" for m in models for s in ("NTP", "NTR")]
    assert {row.count("|") for row in rows} == {lines[0].count("|")}
    assert stdout.strip().splitlines()[-1].startswith("results: ")


def test_learning_statistics_and_plots(reproduced):
    out, _ = reproduced
    learning = (out / "results" / "learning.md").read_text()
    assert re.findall(r"^## (\w+)$", learning, flags=re.M) == VARIANTS
    assert learning.count(f"{STEPS} steps.") == len(VARIANTS)
    plots = out / "results" / "plots"
    for name in ("reward", "think_len", "entropy_chosen", "ntp_loss"):
        assert (plots / f"{name}.png").stat().st_size > 0, name
