"""How many GW partners each scorer gets (gw.candidates), kept free of torch so the CLI can say it."""
from __future__ import annotations

__all__ = ["ALL_PAIRS_UP_TO", "DEFAULT_CANDIDATES", "auto_candidates"]

DEFAULT_CANDIDATES = 16
"""Partners per scorer (m). On planted fleets of 150 scorers in families of 5 (128 points a cloud;
`bench/scale.py --skip-large --m M`), at the flow's default threshold (quantile 1.0, where the planner
also packs triples across families) the shortlist plan's objective was 2.3 % below the full matrix's
with m = 12 and 0.8 % with m = 16; at a tight threshold (quantile 0.05) 0.4 % at both. On real Beetle
clouds (47 items) m = 16 lost 0.5 %. The bound finds a scorer's family first; the rest of its m are the
cross-family pairs such triples need. 500 scorers of 1,000 points plan in under an hour at m = 16
(`bench/scale.py --m 16`; docs/performance.md)."""

ALL_PAIRS_UP_TO = 64
"""Fleets up to this size solve every pair: at most 2,016, no more than twice the shortlist's m * N
bound at m = 16, and nothing is lost. Beetle's 47 items stay on the full matrix."""


def auto_candidates(n_scorers: int) -> int:
    """The shortlist size for a fleet of ``n_scorers`` when none is asked for: 0 (all pairs) up to
    ``ALL_PAIRS_UP_TO`` scorers, else ``DEFAULT_CANDIDATES``."""
    return 0 if n_scorers <= ALL_PAIRS_UP_TO else DEFAULT_CANDIDATES
