"""The gate's operating characteristic by simulation (gw.gate_sim), for the default rule and the δ-rule.

    .venv/bin/python bench/gate_oc.py [--sizes 12,17] [--correlations 0.8,0.95] [--draws 4000]

Accept rates over validation sizes (Beetle's medians: 12 in the 3-fold evaluation, 17 on the official
split), true macro F1 changes (0, −0.05, −0.10, −0.20) and how closely the merged model's errors follow
the own scorer's (correlation). The last line is one JSON object: `reject_rate_at_drop_0.10` and
`accept_rate_at_drop_0` at the headline size 17 and correlation 0.95, and the worst case over the grid.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gw.gate import GATE_RULES, make_rule  # noqa: E402
from gw.gate_sim import simulate_oc  # noqa: E402

CHANGES = (0.0, -0.05, -0.10, -0.20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="12,17")
    parser.add_argument("--correlations", default="0.8,0.95")
    parser.add_argument("--draws", type=int, default=4000)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    correlations = [float(c) for c in args.correlations.split(",")]
    table = []
    for rule_name in GATE_RULES:
        rule = make_rule(rule_name)
        for n in sizes:
            for rho in correlations:
                accept = {c: simulate_oc(rule, n, c, rho, draws=args.draws) for c in CHANGES}
                table.append({"rule": rule_name, "n": n, "correlation": rho, **{f"accept_at_{c:+.2f}": round(a, 3)
                                                                               for c, a in accept.items()}})
                print(f"{rule_name:<6} n={n:<3} ρ={rho:<5} " + "  ".join(f"accept@{c:+.2f}={a:.3f}"
                                                                          for c, a in accept.items()), file=sys.stderr)
    summary = {}
    for rule_name in GATE_RULES:
        rows = [r for r in table if r["rule"] == rule_name]
        head = next((r for r in rows if r["n"] == 17 and r["correlation"] == 0.95), rows[-1])
        summary[rule_name] = {"reject_rate_at_drop_0.10": round(1 - head["accept_at_-0.10"], 3),
                              "accept_rate_at_drop_0": head["accept_at_+0.00"],
                              "headline": {"n": head["n"], "correlation": head["correlation"]},
                              "worst_reject_rate_at_drop_0.10": round(min(1 - r["accept_at_-0.10"] for r in rows), 3),
                              "worst_accept_rate_at_drop_0": min(r["accept_at_+0.00"] for r in rows)}
    print(json.dumps({**summary["bound"], "delta_rule": summary["delta"], "draws": args.draws, "table": table}))


if __name__ == "__main__":
    main()
