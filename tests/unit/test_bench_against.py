"""bench.py --against REV without daemons: the base peers it adds (one per
peer of ours, run from the worktree), the alternating run order, and the
before/after table report.py makes of ours ÷ base per round.  The runs
themselves are `bench.py --against` (minutes: not for the test suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench  # noqa: E402
import report  # noqa: E402


def peers(*kinds):
    return [bench.Peer(f"{k}{i}", k, build=None) for i, k in enumerate(kinds)]


def test_interleave_swaps_ours_and_base_every_other_round():
    ps = peers("anchor", "ours", "base", "ref")
    assert [p.kind for p in bench.interleave(ps, 1)] == ["anchor", "ours", "base", "ref"]
    assert [p.kind for p in bench.interleave(ps, 2)] == ["anchor", "base", "ours", "ref"]
    assert [p.kind for p in ps] == ["anchor", "ours", "base", "ref"]     # not in place
    assert [p.kind for p in bench.interleave(peers("anchor", "ours"), 2)] == ["anchor", "ours"]


def test_add_base_peers_from_a_worktree(tmp_path, monkeypatch):
    # A repository of its own: the checkout under test need not be one.
    repo = tmp_path / "repo"
    (repo / "relayd").mkdir(parents=True)
    (repo / "relayd" / "ca.py").write_text("# before\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "before"]):
        subprocess.run(git + cmd, cwd=repo, check=True)
    monkeypatch.setattr(bench, "REPO", repo)
    cases = [c for c in bench.define_cases() if c.name in ("tls-1k-close", "1k-ka")]
    wt, short = bench.add_base_peers(cases, tmp_path, "HEAD")
    try:
        assert (wt / "relayd" / "ca.py").read_text() == "# before\n" and short in wt.name
        for c in cases:
            kinds = [p.kind for p in c.peers]
            assert kinds.count("base") == kinds.count("ours") == 1
            i = kinds.index("ours")
            ours, base = c.peers[i], c.peers[i + 1]
            assert base.label == f"{ours.daemon}@{short}" and base.daemon == ours.daemon
            assert base.template(c) == ours.template(c)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=repo)
    with pytest.raises(bench.BenchError, match="no such revision"):
        bench.add_base_peers([], tmp_path, "no-such-rev-xyz")


def run(peer, kind, rnd, us, rps):
    return dict(type="run", case="tls-1k-close", peer=peer, kind=kind, round=rnd, us_per_req=us,
                rps=rps, errors={}, non2xx=0, client_bound=False, spoiled=False,
                foreign_max_pct=0, sut_cpu_pct=99, sut_user_pct=90, sut_sys_pct=9, mibps=1,
                p99_ms=10, wrk_cpu_pct=90)


def test_report_before_after_table_pairs_rounds():
    recs = [dict(type="meta", git="abc", against="766ebf8", args={"rounds": 3, "duration": 3},
                 cases={"tls-1k-close": dict(group="relayd", peers=[
                     dict(label="haproxy tls", kind="anchor"), dict(label="relayd", kind="ours"),
                     dict(label="relayd@766ebf8", kind="base")])})]
    for rnd, (o, b) in enumerate([(1100, 1000), (600, 500), (900, 1000)], 1):
        recs += [run("haproxy tls", "anchor", rnd, 500, 1000), run("relayd", "ours", rnd, o, 900),
                 run("relayd@766ebf8", "base", rnd, b, 1000)]
    md = report.render(recs)
    assert "#### Before/after: ours ÷ 766ebf8" in md
    # per round 1.10, 1.20, 0.90: the median pairs rounds (the ratio of medians would be 0.90)
    assert "| **1.10 [0.90–1.20]** | 0.90 [0.90–0.90] | 3 |" in md
    assert "Before/after" not in report.render([r for r in recs if r.get("kind") != "base"])
