#!/usr/bin/env python3
"""Markdown tables from bench.py JSONL: median [min–max] over rounds, and the
ratios of each peer to the case's anchor measured in the same file.

  req/s ratio = peer req/s ÷ anchor req/s (medians; [range] of the per-round
                ratios, rounds being interleaved)
  CPU-eff     = anchor µs CPU/req ÷ peer µs CPU/req (medians). Use it when the
                anchor is client-bound (wrk ≥ 95 % of its cores): there req/s
                flatters the slower peer.

usage: report.py FILE.jsonl [...]  (prints markdown)
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

GROUPS = {
    "httpd": "httpd vs nginx (server on core 0, `wrk -t1 -c50` on core 1; `-2w`: unpinned, 2 workers, `wrk -t2 -c100`)",
    "relayd": "relayd vs haproxy (proxy on core 0; backend nginx and `wrk -t1 -c50` on core 1)",
}


def load(paths):
    recs = []
    for path in paths:
        with open(path) as f:
            recs += [json.loads(line) for line in f if line.strip()]
    return recs


def med(xs):
    return statistics.median(xs) if xs else None


def rng(xs, fmt):
    if not xs:
        return "—"
    return fmt(xs[0]) if len(xs) == 1 else f"{fmt(med(xs))} [{fmt(min(xs))}–{fmt(max(xs))}]"


def n0(x):
    return f"{x:,.0f}"


def n1(x):
    return f"{x:,.1f}"


def n2(x):
    return f"{x:.2f}"


class Stats:
    """The runs of one (case, peer)."""

    def __init__(self, runs):
        self.runs = sorted(runs, key=lambda r: r["round"])
        self.by_round = {r["round"]: r for r in self.runs}

    def xs(self, key):
        return [r[key] for r in self.runs if r.get(key) is not None]

    def m(self, key):
        return med(self.xs(key))

    def flags(self, anchor=False, spoiled=True):
        out = []
        err = sum(sum(r["errors"].values()) for r in self.runs)
        non2xx = sum(r["non2xx"] for r in self.runs)
        cb = sum(1 for r in self.runs if r["client_bound"])
        sp = [r for r in self.runs if r["spoiled"]]
        if err:
            out.append(f"{err} socket errors")
        if non2xx:
            out.append(f"{non2xx} non-2xx")
        if cb:
            out.append(f"client-bound {cb}/{len(self.runs)}" + (" (use CPU-eff)" if anchor else ""))
        if sp and spoiled:
            out.append(f"spoiled {len(sp)}/{len(self.runs)} (foreign ≤ {max(r['foreign_max_pct'] for r in sp):.0f} %)")
        r0 = self.runs[0]
        if r0["kind"] != "anchor" and r0.get("workers", 1) > 1:
            n = max(r.get("sut_nproc", 0) for r in self.runs)
            if n < r0["workers"]:
                out.append(f"only {n} process(es) for {r0['workers']} workers")
        notes = {r.get("note") for r in self.runs if r.get("note")}
        out += sorted(notes)
        return out

    def spoiled(self):
        """(spoiled runs, runs, worst foreign %) or None."""
        sp = [r for r in self.runs if r["spoiled"]]
        return (len(sp), len(self.runs), max(r["foreign_max_pct"] for r in sp)) if sp else None


def ratios(ours: Stats, anchor: Stats):
    """(req/s ratio of medians, per-round ratios, CPU-eff of medians)."""
    rr = [ours.by_round[k]["rps"] / anchor.by_round[k]["rps"] for k in ours.by_round
          if k in anchor.by_round and anchor.by_round[k]["rps"]]
    a_rps, o_rps = anchor.m("rps"), ours.m("rps")
    ratio = o_rps / a_rps if a_rps and o_rps is not None else None
    a_us, o_us = anchor.m("us_per_req"), ours.m("us_per_req")
    eff = a_us / o_us if a_us and o_us else None
    return ratio, rr, eff


def render(recs) -> str:
    meta = {}
    for r in recs:
        if r["type"] == "meta":
            meta = {**meta, **r, "cases": {**meta.get("cases", {}), **r.get("cases", {})}}
    cases = meta.get("cases", {})
    runs = defaultdict(list)
    na, fails = {}, defaultdict(list)
    for r in recs:
        if r["type"] == "run":
            runs[(r["case"], r["peer"])].append(r)
        elif r["type"] == "na":
            na[(r["case"], r["peer"])] = r["reason"]
        elif r["type"] == "fail":
            fails[(r["case"], r["peer"])].append(r)
    S = {k: Stats(v) for k, v in runs.items()}
    order = list(cases) or sorted({k[0] for k in S})
    out = []
    w = out.append
    a = meta.get("args", {})
    w(f"### Tandem benchmark — {meta.get('git', '?')}, {a.get('rounds', '?')} round(s) × "
      f"{a.get('duration', '?')} s{' (smoke)' if a.get('smoke') else ''}\n")
    w("Ratios are Tandem ÷ anchor from this run only. req/s ratio: medians [per-round range]; "
      "CPU-eff: anchor µs CPU/req ÷ ours. Absolute numbers are not comparable across runs.\n")

    def peers(case):
        return cases.get(case, {}).get("peers") or [
            dict(label=p, kind=next(r["kind"] for r in runs[(case, p)])) for (c, p) in S if c == case]

    # ---- summary
    for group, title in GROUPS.items():
        gcases = [c for c in order if cases.get(c, {}).get("group", group) == group
                  and any(k[0] == c for k in list(S) + list(na) + list(fails))]
        if not gcases:
            continue
        w(f"#### Summary: {title}\n")
        w("| case | Tandem req/s | anchor req/s | req/s ratio | CPU-eff | target | trio ref ÷ anchor (req/s, CPU-eff) | notes |")
        w("|---|---|---|---|---|---|---|---|")
        for c in gcases:
            ps = peers(c)
            anc = next((p["label"] for p in ps if p["kind"] == "anchor"), None)
            our = next((p["label"] for p in ps if p["kind"] == "ours"), None)
            rf = next((p["label"] for p in ps if p["kind"] == "ref"), None)
            sa, so, sr = S.get((c, anc)), S.get((c, our)), S.get((c, rf))
            tgt = cases.get(c, {}).get("target")
            notes = []
            acell = f"{anc} {rng(sa.xs('rps'), n0)}" if sa else f"{anc}: " + (
                "n/a" if (c, anc) in na else "failed" if fails.get((c, anc)) else "not run")
            if (c, anc) in na:
                notes.append(f"{anc} n/a: {na[(c, anc)]}")
            if sa:
                notes += [f"{anc}: {x}" for x in sa.flags(anchor=True, spoiled=False)]
            if so and sa:
                ratio, rr, eff = ratios(so, sa)
                ocell = f"{our} {rng(so.xs('rps'), n0)}"
                rcell = (f"**{ratio:.2f}**" + (f" [{min(rr):.2f}–{max(rr):.2f}]" if len(rr) > 1 else "")
                         if ratio is not None else "—")
                ecell = n2(eff) if eff else "—"
                key = ratio if cases.get(c, {}).get("target_metric", "rps") == "rps" else eff
                tcell = (f"≥ {tgt:.2f} " + ("✓" if key is not None and key >= tgt else "✗")) if tgt else "—"
                notes += [f"{our}: {x}" for x in so.flags(spoiled=False)]
            else:
                why = na.get((c, our)) or (fails[(c, our)][0]["error"] if fails.get((c, our)) else "not run")
                ocell = f"{our}: **n/a**" if (c, our) in na else f"{our}: **failed**"
                rcell = ecell = "—"
                tcell = f"≥ {tgt:.2f}" if tgt else "—"
                notes.append(f"{our}: {why}")
            if sr and sa:
                r2, _, e2 = ratios(sr, sa)
                fcell = f"{rf} {n2(r2) if r2 is not None else '—'}, {n2(e2) if e2 else '—'}"
                notes += [f"{rf}: {x}" for x in sr.flags(spoiled=False)]
            elif rf:
                fcell = f"{rf}: n/a" if (c, rf) in na else f"{rf}: failed"
            else:
                fcell = "—"
            sp = [(p, S[(c, p)].spoiled()) for p in (anc, our, rf) if (c, p) in S and S[(c, p)].spoiled()]
            if sp:
                notes.append("spoiled runs: " + ", ".join(f"{p} {x[0]}/{x[1]}" for p, x in sp)
                             + f" (foreign ≤ {max(x[2] for _, x in sp):.0f} % of a core)")
            for p in (anc, our, rf):
                for f in fails.get((c, p), []):
                    notes.append(f"{p} round {f['round']} FAILED: {f['error']}")
            cell = "; ".join(dict.fromkeys(notes)).replace("|", "\\|")
            w(f"| {c} | {ocell} | {acell} | {rcell} | {ecell} | {tcell} | {fcell} | {cell} |")
        w("")

    # ---- before/after (--against REV)
    pairs = [(c, p["label"], q["label"]) for c in order for p in peers(c) for q in peers(c)
             if p["kind"] == "ours" and q["kind"] == "base"
             and (c, p["label"]) in S and (c, q["label"]) in S]
    if pairs:
        w(f"#### Before/after: ours ÷ {meta.get('against') or 'base'} (same rounds)\n")
        w("CPU ratio: ours µs CPU/req ÷ base µs CPU/req per round (their runs are adjacent, "
          "their order alternates); median [range]. Below 1: ours costs less.\n")
        w("| case | ours µs CPU/req | base µs CPU/req | CPU ratio | req/s ratio | rounds |")
        w("|---|---|---|---|---|---|")
        for c, o, b in pairs:
            so, sb = S[(c, o)], S[(c, b)]
            rounds = [k for k in so.by_round if k in sb.by_round]
            cr = [so.by_round[k]["us_per_req"] / sb.by_round[k]["us_per_req"] for k in rounds
                  if so.by_round[k].get("us_per_req") and sb.by_round[k].get("us_per_req")]
            rr = [so.by_round[k]["rps"] / sb.by_round[k]["rps"] for k in rounds
                  if so.by_round[k].get("rps") and sb.by_round[k].get("rps")]
            w(f"| {c} | {o} {rng(so.xs('us_per_req'), n1)} | {b} {rng(sb.xs('us_per_req'), n1)} | "
              f"**{rng(cr, n2)}** | {rng(rr, n2)} | {len(rounds)} |")
        w("")

    # ---- details
    w("#### Details (median [min–max] of rounds)\n")
    w("| case | peer | req/s | MiB/s | p99 ms | server CPU % (usr/sys) | µs CPU/req | wrk CPU % | "
      "peak RSS MiB (procs) | foreign % max | socket errors / non-2xx | flags |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in order:
        for p in peers(c):
            s = S.get((c, p["label"]))
            if not s:
                continue
            cpu = f"{s.m('sut_cpu_pct'):.0f} ({s.m('sut_user_pct'):.0f}/{s.m('sut_sys_pct'):.0f})"
            if s.m("backend_cpu_pct"):
                cpu += f" +backend {s.m('backend_cpu_pct'):.0f}"
            rss = max(r.get("sut_rss_kib", 0) for r in s.runs) / 1024
            nproc = max(r.get("sut_nproc", 0) for r in s.runs)
            us = s.xs("us_per_req")
            fl = "; ".join(s.flags(anchor=p["kind"] == "anchor")).replace("|", "\\|")
            # Every round's sum, said even when 0 (wrk prints no line then).
            errs = sum(sum(r["errors"].values()) for r in s.runs)
            bad = sum(r["non2xx"] for r in s.runs)
            w(f"| {c} | {p['label']} ({p['kind']}) | {rng(s.xs('rps'), n0)} | {n1(s.m('mibps'))} | "
              f"{n2(s.m('p99_ms')) if s.m('p99_ms') is not None else '—'} | {cpu} | {rng(us, n1)} | "
              f"{s.m('wrk_cpu_pct'):.0f} | {rss:.1f} ({nproc}) | "
              f"{max(s.xs('foreign_max_pct')):.0f} | {errs} / {bad} | {fl} |")
    if na:
        w("\n#### Not run (n/a)\n")
        for (c, p), why in na.items():
            w(f"- {c} / {p}: {why}")
    w("\n#### Commands (round 1)\n")
    w("| case | peer | server command(s) | client |")
    w("|---|---|---|---|")
    seen = set()
    for r in recs:
        if r["type"] in ("run", "fail") and "wrk_cmd" in r and (r["case"], r["peer"]) not in seen:
            seen.add((r["case"], r["peer"]))
            sc = "<br>".join(f"`{x}`" for x in r["server_cmds"])
            w(f"| {r['case']} | {r['peer']} | {sc} | `{r['wrk_cmd']}` |")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(render(load(sys.argv[1:])), end="")


if __name__ == "__main__":
    main()
