"""tools/plot_runs.py: PNG training curves of several runs from small synthetic metrics files."""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import require_module


@pytest.fixture(scope="module", autouse=True)
def _matplotlib():
    require_module("matplotlib", "`make venv` installs it into .venv")


REPO = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("plot_runs", REPO / "tools" / "plot_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f"{path}"


def _runs(tmp_path):
    rmt = [
        {"step": t, "reward": 0.1 * t, "match_acc": 0.05 * t, "think_len": 30 - t,
         "budget": 32 - 2 * t, "entropy_chosen": 3 - 0.1 * t, "ntp_loss": 6 - 0.2 * t,
         "ntp_tokens": 100, "rl_positions": 4}
        for t in range(10)
    ]  # fmt: skip
    ntp = [
        {"step": t, "reward": 0.0, "think_len": 0.0, "budget": 0.0, "rl_positions": 0,
         "ntp_loss": 6 - 0.25 * t, "ntp_tokens": 100}
        for t in range(10)
    ]  # fmt: skip
    return _write(tmp_path / "rmt.jsonl", rmt), _write(tmp_path / "ntp.jsonl", ntp)


def _is_png(path):
    return Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_every_quantity_once_per_figure(tmp_path, capsys):
    rmt, ntp = _runs(tmp_path)
    out = tmp_path / "plots"
    written = _tool().main(["--runs", f"rmt={rmt}", f"ntp={ntp}", "--output", str(out)])
    names = sorted(Path(p).name for p in written)
    assert names == ["entropy_chosen.png", "ntp_loss.png", "reward.png", "think_len.png"]
    assert all(_is_png(p) for p in written)
    assert capsys.readouterr().out.split() == written


def test_missing_quantities_are_skipped_and_smoothing_works(tmp_path):
    _, ntp = _runs(tmp_path)
    tool = _tool()
    written = tool.main(["--runs", f"ntp={ntp}", "--output", str(tmp_path / "p"), "--smooth", "3"])
    assert [Path(p).name for p in written] == ["ntp_loss.png"]  # the NTP-only run has no reward
    assert _is_png(written[0])
    assert tool.moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert tool.moving_average([1.0, 3.0], 1) == [1.0, 3.0]


def test_bad_run_spec_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="NAME=METRICS.jsonl"):
        _tool().main(["--runs", "no_name.jsonl", "--output", str(tmp_path)])
