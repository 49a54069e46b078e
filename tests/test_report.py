"""Result tables with 95% intervals (evaluation/report.py) and learning statistics of a run's
metrics (evaluation/learning.py), against naive reference computations."""

import json
import math
import statistics

import pytest
import torch

from megatron_rmt.evaluation import learning, report
from megatron_rmt.jsonl import InputError
from megatron_rmt.selection import LEVELS

Z = 1.959963984540054


def _bisect(f, lo, hi, steps=200):
    """A root of f on [lo, hi] where f changes sign."""
    flo = f(lo)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if (f(mid) > 0) == (flo > 0):
            lo, flo = mid, f(mid)
        else:
            hi = mid
    return (lo + hi) / 2


def _wilson_brute(k, n):
    """The p whose normal test just accepts k / n: (k/n - p)^2 = z^2 p (1 - p) / n."""
    phat = k / n

    def f(p):
        return (phat - p) ** 2 - Z * Z * p * (1 - p) / n

    lo = 0.0 if k == 0 else _bisect(f, 0.0, phat)
    hi = 1.0 if k == n else _bisect(f, phat, 1.0)
    return lo, hi


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (3, 7), (42, 100), (1, 1)])
def test_wilson_matches_the_inverted_score_test(k, n):
    assert report.wilson(k, n) == pytest.approx(_wilson_brute(k, n), abs=1e-9)
    lo, hi = report.wilson(k, n)
    assert 0 <= lo <= k / n <= hi <= 1


def test_wilson_and_normal_need_data():
    assert report.wilson(0, 0) is None
    assert report.normal_interval(0.5, 0.1, 1) is None
    assert report.normal_interval(0.5, None, 10) is None
    assert report.normal_interval(0.5, 0.2, 16) == pytest.approx((0.5 - Z * 0.05, 0.5 + Z * 0.05))
    assert report.normal_interval(0.02, 0.2, 4) == pytest.approx((0.0, 0.02 + Z * 0.1))  # clipped


def _ntr_inputs():
    levels = torch.tensor([0, 0, 0, 1, 1, 2])
    match = torch.tensor(
        [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]
    )
    think = torch.arange(24).reshape(6, 4)
    return levels, match, think, think + 5, torch.zeros(6, 4, dtype=torch.bool)


def test_summarize_ntr_keeps_the_per_position_sd_and_interval():
    levels, match, think, response, unparsed = _ntr_inputs()
    out = report.summarize_ntr(levels, match, think, response, unparsed)
    per_position = match.double().mean(dim=1).tolist()
    for name, rows in (("easy", [0, 1, 2]), ("medium", [3, 4]), ("all", range(6))):
        values = [per_position[i] for i in rows]
        sd = statistics.stdev(values)
        mean = statistics.fmean(values)
        assert out[name]["n"] == len(values)
        assert out[name]["accuracy"] == pytest.approx(mean)
        assert out[name]["accuracy_sd"] == pytest.approx(sd)
        half = Z * sd / math.sqrt(len(values))
        assert out[name]["ci95"] == pytest.approx([max(0, mean - half), min(1, mean + half)])
    assert out["hard"]["accuracy_sd"] is None and out["hard"]["ci95"] is None  # one position
    assert out["avg_ci95"] is None  # hard has no sd, so neither has the average
    json.dumps(out)  # the results file stays JSON


def test_summarize_ntp_wilson_per_level_and_normal_average():
    levels = torch.tensor([0] * 10 + [1] * 8 + [2] * 5)
    correct = torch.tensor([1] * 7 + [0] * 3 + [1] * 4 + [0] * 4 + [1] + [0] * 4, dtype=torch.bool)
    out = report.summarize_ntp(levels, correct, torch.zeros(23))
    assert out["easy"]["ci95"] == pytest.approx(list(_wilson_brute(7, 10)), abs=1e-9)
    assert out["medium"]["ci95"] == pytest.approx(list(_wilson_brute(4, 8)), abs=1e-9)
    assert out["all"]["ci95"] == pytest.approx(list(_wilson_brute(12, 23)), abs=1e-9)
    se = math.sqrt(0.7 * 0.3 / 10 + 0.5 * 0.5 / 8 + 0.2 * 0.8 / 5) / 3
    avg = (0.7 + 0.5 + 0.2) / 3
    assert out["avg"] == pytest.approx(avg)
    assert out["avg_ci95"] == pytest.approx([avg - Z * se, avg + Z * se])


def _old_result(name, ntp, ntr):
    """A results file as `evaluate run` wrote them before intervals: no sd, no ci95."""

    def table(accs, extra):
        out = {lv: {"n": 20, "accuracy": a, **extra} for lv, a in zip(LEVELS, accs, strict=True)}
        return report._with_avg({**out, "all": {"n": 60, "accuracy": None, **extra}})

    lengths = {"response_tokens": 123.45, "think_tokens": 100.0, "parse_failures": 0.125}
    return {"name": name, "ntp": table(ntp, {}), "ntr": ntr and table(ntr, lengths)}


def test_table_renders_old_results_with_dashes_for_missing_intervals():
    text = report.render_table(
        [_old_result("base", [0.5, 0.25, None], None), _old_result("rmt", [0.5] * 3, [0.1] * 3)]
    )
    lines = text.splitlines()
    assert lines[0] == (
        "| Model | Easy | Medium | Hard | Average | Think len | Resp. len | Unparsed % | Positions |"
    )
    lo, hi = (100 * x for x in report.wilson(10, 20))
    easy = f"50.00 [{lo:.1f}, {hi:.1f}]"  # NTP intervals need only n and the accuracy
    assert lines[2].startswith(f"| base (NTP) | {easy} | 25.00 [") and "| - | 37.50 [" in lines[2]
    assert lines[2].endswith("| - | - | - | 60 |")
    assert lines[3].startswith(f"| rmt (NTP) | {easy} |")
    assert lines[4] == (
        "| rmt (NTR) | 10.00 [-] | 10.00 [-] | 10.00 [-] | 10.00 [-] | 100.0 | 123.5 | 12.50 | 60 |"
    )
    assert len(lines) == 7 and lines[6] == report.CAPTION  # no NTR row for base


def test_table_renders_new_results_with_intervals(tmp_path, capsys):
    levels, match, think, response, unparsed = _ntr_inputs()
    levels = torch.cat([levels, torch.tensor([2])])
    match = torch.cat([match, torch.tensor([[1, 1, 0, 0]])])
    think, response = torch.cat([think, think[:1]]), torch.cat([response, response[:1]])
    unparsed = torch.cat([unparsed, unparsed[:1]])
    ntr = report.summarize_ntr(levels, match, think, response, unparsed)
    ntp = report.summarize_ntp(levels, match[:, 0].bool(), torch.zeros(7))
    result = {"name": "rmt", "ntp": ntp, "ntr": ntr}
    text = report.render_table([result])
    row = text.splitlines()[3]
    lo, hi = ntr["easy"]["ci95"]
    assert row.startswith(
        f"| rmt (NTR) | {100 * ntr['easy']['accuracy']:.2f} [{100 * lo:.1f}, {100 * hi:.1f}] |"
    )
    lo, hi = ntr["avg_ci95"]
    assert f"{100 * ntr['avg']:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]" in row
    assert "[-]" not in text
    # and through the command line, from a results file
    from megatron_rmt import evaluate

    path = tmp_path / "rmt.json"
    path.write_text(json.dumps(result))
    evaluate.main(["table", str(path)])
    assert capsys.readouterr().out.strip() == text


# ---- learning statistics ----------------------------------------------------------------------


def _t_cdf_numeric(t, df, steps=20000):
    """P(T <= t) by Simpson's rule on the t density (t >= 0)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def pdf(x):
        return c * (1 + x * x / df) ** (-(df + 1) / 2)

    h = t / steps
    total = pdf(0) + pdf(t) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps))
    return 0.5 + total * h / 3


@pytest.mark.parametrize("df", [1, 2, 3.7, 10, 30])
def test_t_quantile_against_numeric_integration_and_tables(df):
    q = learning.t_quantile(0.975, df)
    assert _t_cdf_numeric(q, df) == pytest.approx(0.975, abs=1e-7)
    table = {1: 12.7062, 2: 4.3027, 10: 2.2281, 30: 2.0423}
    if df in table:
        assert q == pytest.approx(table[df], abs=1e-4)
    assert learning.t_quantile(0.975, 1e7) == pytest.approx(Z, abs=1e-5)


def test_welch_against_a_naive_computation():
    a, b = [1.0, 2.0, 4.0, 3.5], [5.0, 7.5, 6.0, 9.0, 8.0, 6.5]
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    se = math.sqrt(va / len(a) + vb / len(b))
    df = se**4 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    t = _bisect(lambda x: _t_cdf_numeric(x, df) - 0.975, 0.0, 50.0, steps=60)
    out = learning.welch(a, b)
    assert out["diff"] == pytest.approx(mb - ma)
    assert out["df"] == pytest.approx(df)
    assert out["ci"] == pytest.approx([mb - ma - t * se, mb - ma + t * se], rel=1e-6)
    assert learning.welch([1.0], b) is None
    assert learning.welch([2.0, 2.0], [3.0, 3.0])["ci"] == [1.0, 1.0]


def test_quarters():
    assert learning.quarters(list(range(10))) == [[0, 1, 2], [3, 4], [5, 6], [7, 8, 9]]
    assert learning.quarters([0, 1]) == [[0], [], [], [1]]
    assert learning.quarters([0]) == [[0], [], [], []]
    assert learning.quarters(list(range(8))) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def _metrics_file(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _rmt_rows():
    rows = []
    for t in range(8):
        rows.append(
            {
                "step": t,
                "time": 0.0,
                "reward": 0.1 * t,
                "match_acc": 0.05 * t,
                "think_len": 40.0 - 2 * t,
                "budget": 40.0 - 4 * t,
                "ntp_loss": 5.0 - 0.1 * t,
                "ntp_tokens": 100,
                "rl_positions": 4,
                "entropy_chosen": 2.0,
            }
        )
    rows[1]["rl_positions"] = 0  # a failed rollout: no reward etc. that step
    return rows


def test_learning_stats_first_vs_last_quarter(tmp_path):
    rows = _rmt_rows()
    path = _metrics_file(tmp_path / "m.jsonl", [*rows[:5], {**rows[4], "reward": 9.0}, *rows[5:]])
    read = learning.read_metrics(path)
    assert [r["step"] for r in read] == list(range(8)) and read[4]["reward"] == 9.0  # last wins
    stats = learning.learning_stats(read)
    assert stats["quarters"][0] == [0, 1] and stats["quarters"][3] == [6, 7]
    m = stats["metrics"]
    assert set(m) == {"reward", "match_acc", "think_len", "budget", "budget_dev", "entropy_chosen",
                      "ntp_loss"}  # fmt: skip
    assert m["reward"]["first"] == 0.0 and m["reward"]["n_first"] == 1  # step 1 had no RL
    assert m["reward"]["ci95"] is None  # one value in the first quarter
    assert m["ntp_loss"]["first"] == pytest.approx(4.95) and m["ntp_loss"]["n_first"] == 2
    assert m["ntp_loss"]["last"] == pytest.approx(4.35)
    assert m["ntp_loss"]["diff"] == pytest.approx(-0.6)
    assert m["ntp_loss"]["ci95"] == pytest.approx(learning.welch([5.0, 4.9], [4.4, 4.3])["ci"])
    assert m["think_len"]["ci95"] is None and m["think_len"]["last"] == 27.0
    per_step = dict(map(tuple, stats["budget_deviation"]["per_step"]))
    assert set(per_step) == {0, 2, 3, 4, 5, 6, 7}
    assert per_step[6] == pytest.approx(abs(28 - 16) / 16)
    assert stats["budget_deviation"]["per_quarter"][3] == pytest.approx((12 / 16 + 14 / 12) / 2)


def test_ntp_only_run_has_no_rl_metrics_and_cli_writes_json(tmp_path, capsys):
    rows = [
        {"step": t, "reward": 0.0, "think_len": 0.0, "budget": 0.0, "rl_positions": 0,
         "ntp_loss": 5 - 0.5 * t, "ntp_tokens": 10}
        for t in range(6)
    ]  # fmt: skip
    path = _metrics_file(tmp_path / "ntp.jsonl", rows)
    stats = learning.main([path, "--json", str(tmp_path / "s.json")])
    assert list(stats["metrics"]) == ["ntp_loss"]
    assert stats["metrics"]["ntp_loss"]["diff"] == pytest.approx(-2.0)
    assert stats["budget_deviation"]["per_step"] == []
    printed = capsys.readouterr().out
    assert "| ntp_loss | 4.75 | 2.75 | -2 |" in printed
    assert json.loads((tmp_path / "s.json").read_text())["metrics"] == stats["metrics"]


def test_bad_metrics_file_names_file_and_line(tmp_path):
    path = str(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"step": 0}\n{"reward": 1}\n')
    with pytest.raises(learning.InputError, match=f"^{path}:2: no numeric 'step'"):
        learning.read_metrics(path)


def test_paired_difference_over_common_steps_against_a_naive_t_interval(tmp_path, capsys):
    a = [{"step": s, "ntp_loss": 2.0 + 0.1 * s, "ntp_tokens": 10} for s in range(6)]
    b = [{"step": s, "ntp_loss": 2.0 + 0.1 * s + d, "ntp_tokens": 10}
         for s, d in zip(range(1, 8), [0.3, -0.1, 0.2, 0.0, 0.4, 0.1, 9.0], strict=True)]  # fmt: skip
    out = learning.paired(a, b, "ntp_loss")
    diffs = [-0.3, 0.1, -0.2, 0.0, -0.4]  # steps 1..5 only: step 0 and 6 are in one run each
    m, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t quantile 0.975, 4 degrees of freedom
    assert out["steps"] == 5
    assert out["diff"] == pytest.approx(m)
    assert out["ci"] == pytest.approx([m - half, m + half])
    assert learning.paired(a[:1], b, "ntp_loss") is None
    path_a, path_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    path_a.write_text("".join(json.dumps(r) + "\n" for r in a))
    path_b.write_text("".join(json.dumps(r) + "\n" for r in b))
    stats = learning.main([str(path_a), "--against", str(path_b)])
    assert stats["ntp_loss_vs"]["diff"] == pytest.approx(m)
    # An RL metric: only the steps where both runs trained RL positions pair up.
    for r, reward in zip(a, [0.1, 0.5, 0.2, 0.4, 0.3, 0.6], strict=True):
        r.update(reward=reward, rl_positions=0 if r["step"] == 3 else 4)
    for r, reward in zip(b, [0.2, 0.1, 0.9, 0.1, 0.5, 0.0, 0.0], strict=True):
        r.update(reward=reward, rl_positions=4)
    path_a.write_text("".join(json.dumps(r) + "\n" for r in a))
    path_b.write_text("".join(json.dumps(r) + "\n" for r in b))
    stats = learning.main(
        [str(path_a), "--against", str(path_b), "--against-keys", "reward,ntp_loss"]
    )
    diffs = [0.5 - 0.2, 0.2 - 0.1, 0.3 - 0.1, 0.6 - 0.5]  # steps 1, 2, 4, 5 (a skipped step 3)
    m, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = 3.182446305284263 * sd / 2  # t quantile 0.975, 3 degrees of freedom; sqrt(4)
    assert stats["reward_vs"]["steps"] == 4 and stats["reward_vs"]["diff"] == pytest.approx(m)
    assert stats["reward_vs"]["ci"] == pytest.approx([m - half, m + half])
    assert "reward minus" in capsys.readouterr().out and "ntp_loss_vs" in stats


def test_table_flops_column_through_the_command_line(tmp_path, capsys):
    from megatron_rmt import evaluate

    paths = []
    for name, ntr in (("base", None), ("rmt", [0.1] * 3)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(_old_result(name, [0.5] * 3, ntr)))
    evaluate.main(["table", *map(str, paths), "--flops", "rmt=5.9e13"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| Positions | Training FLOPs |") and lines[1].count("---") == 10
    assert lines[2].endswith("| 60 | - |")  # base: no FLOPs given
    assert lines[3].endswith("| 60 | 5.9e+13 |") and lines[4].endswith("| 60 | 5.9e+13 |")
    with pytest.raises(InputError, match="NAME=NUMBER"):
        evaluate.main(["table", str(paths[0]), "--flops", "rmt"])
