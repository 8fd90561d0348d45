#!/usr/bin/env python3
"""Benchmark: what does a month's bill cost to compute, and how right is each way?

A month of podtally metrics for a small cluster is backfilled into a real Prometheus
(Debian's, through `promtool tsdb create-blocks-from openmetrics`), scraped every 30 s:

- long-lived pods (Deployments) that run all month, one of them restarted mid-month (a
  counter reset, the new life exposed at 0 first, as the sidecar does);
- many short Job pods (team `batch`): exposed at 0, one call, scraped once more, gone.

Then, side by side in one run, the three ways to get "tokens by team, this month":

1. `increase()` (the quick PromQL form);
2. the exact PromQL form (a subquery stepping at half the scrape interval);
3. `podtally report --format csv` (raw samples, added up per series).

Each is timed and compared with the truth, which this script knows because it generated
the calls. Nothing leaves 127.0.0.1; the Prometheus and its files are gone at exit.

    .venv/bin/python bench/bench_finops_queries.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from support.prometheus import RunningPrometheus, SeriesData  # noqa: E402

SCRAPE_S = 30
STEP = "15s"  # half the scrape interval
MONTH_START = datetime(2026, 10, 1, tzinfo=UTC)
MONTH_END = datetime(2026, 11, 1, tzinfo=UTC)
TOKEN_TYPES = ("input", "cache_read", "output")
METRIC = "podtally_llm_tokens_total"


def _labels(team: str, pod: str, workload: str, token_type: str) -> tuple[tuple[str, str], ...]:
    # The labels that make series distinct; the contract's others (app, service_account,
    # provider, model) would only lengthen promtool's input.
    return (("namespace", f"ns-{team}"), ("pod", pod), ("workload", workload), ("team", team),
            ("token_type", token_type))


def generate(deployments: int, jobs: int, seed: int = 7) -> tuple[SeriesData, dict[str, int]]:
    """The month's series and the true tokens by team (what the providers reported)."""
    rng = random.Random(seed)
    start, end = int(MONTH_START.timestamp()), int(MONTH_END.timestamp())
    series: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[float, float]]] = {}
    truth: dict[str, int] = defaultdict(int)
    teams = ("payments", "growth", "research")
    for d in range(deployments):
        team, workload = teams[d % len(teams)], f"api-{d}"
        restart_at = start + (end - start) // 2 if d == 0 else None
        for token_type in TOKEN_TYPES:
            samples: list[tuple[float, float]] = []
            value = 0
            pod = f"{workload}-a"
            for t in range(start - 3600, end, SCRAPE_S):  # running since before the month
                if restart_at is not None and t == restart_at:
                    value = 0  # SIGKILL: the new life starts at 0
                # calls made after this scrape show in the next one; none just before the
                # restart (SIGKILL right after a scrape, so nothing unscraped is lost)
                gained = 0 if t + SCRAPE_S == restart_at else rng.randrange(0, 400)
                samples.append((float(t), float(value)))
                if start <= t + SCRAPE_S < end:
                    truth[team] += gained  # scraped at t + 30 s, inside the month
                value += gained
            series[(METRIC, _labels(team, pod, workload, token_type))] = samples
    for j in range(jobs):
        team = "batch"  # a team that runs only Jobs: where increase() errs most
        t0 = start + rng.randrange(0, (end - start) // SCRAPE_S - 2) * SCRAPE_S
        for token_type in TOKEN_TYPES:
            n = rng.randrange(1, 2000)
            truth[team] += n
            series[(METRIC, _labels(team, f"batch-{j}", "nightly-batch", token_type))] = [
                (float(t0), 0.0), (float(t0 + SCRAPE_S), float(n))]
    return series, dict(truth)


def prom_query(url: str, promql: str, at: float) -> tuple[dict[str, float], float]:
    t = time.perf_counter()
    resp = httpx.post(f"{url}/api/v1/query", data={"query": promql, "time": str(at)},
                      timeout=600)
    elapsed = time.perf_counter() - t
    body = resp.json()
    if body.get("status") != "success":
        raise RuntimeError(f"{promql}: {body.get('errorType')}: {body.get('error')}")
    return {r["metric"].get("team", ""): float(r["value"][1])
            for r in body["data"]["result"]}, elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer pods (a smoke run)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    deployments, jobs = (3, 50) if args.quick else (12, 3000)

    t = time.perf_counter()
    series, truth = generate(deployments, jobs)
    n_samples = sum(len(s) for s in series.values())
    print(f"a month (Oct 2026) at {SCRAPE_S}s scrape: {deployments} long-lived pods (one "
          f"restarted), {jobs} Job pods; {len(series)} series, {n_samples:,} samples "
          f"(generated in {time.perf_counter() - t:.1f}s)")
    ok = True
    results: dict[str, object] = {"series": len(series), "samples": n_samples}
    with tempfile.TemporaryDirectory(prefix="podtally-bench-finops-") as tmp:
        t = time.perf_counter()
        with RunningPrometheus(series, Path(tmp), promtool_timeout=3600) as prom:
            print(f"backfilled with promtool and Prometheus ready in "
                  f"{time.perf_counter() - t:.1f}s\n")
            at = MONTH_END.timestamp() - 0.001
            month = f"{int((MONTH_END - MONTH_START).total_seconds())}s"
            ways: dict[str, tuple[dict[str, float], float]] = {}
            quick = f"sum by (team) (increase({METRIC}[{month}]))"
            exact = (f"sum by (team) (sum_over_time((({METRIC} - {METRIC} offset {STEP}) >= 0"
                     f" or {METRIC} * 1)[{month}:{STEP}]))")
            ways["increase()"] = prom_query(prom.url, quick, at)
            try:
                ways[f"exact PromQL (step {STEP})"] = prom_query(prom.url, exact, at)
            except RuntimeError as err:
                # Over many series the subquery outgrows Prometheus' query timeout (2 min by
                # default): a measured outcome, not a failure of podtally.
                print(f"exact PromQL gave no answer: {str(err)[-80:]}")
                results["exact PromQL"] = str(err)[-200:]
                ok = ok and "timed out" in str(err)
            t = time.perf_counter()
            out = subprocess.run(
                [str(ROOT / ".venv/bin/podtally"), "report", "--prometheus-url", prom.url,
                 "--start", MONTH_START.date().isoformat(), "--end",
                 MONTH_END.date().isoformat(), "--by", "team", "--format", "csv"],
                capture_output=True, text=True, check=True, timeout=600)
            elapsed = time.perf_counter() - t
            rows = [r for r in csv.DictReader(io.StringIO(out.stdout)) if r["team"] != "TOTAL"]
            ways["podtally report"] = ({r["team"]: float(r["tokens_total"]) for r in rows},
                                       elapsed)

            print(f"{'way':<26} {'seconds':>8}  " + "  ".join(
                f"{team:>22}" for team in sorted(truth)))
            print(f"{'truth (generated calls)':<26} {'':>8}  " + "  ".join(
                f"{truth[team]:>22,}" for team in sorted(truth)))
            for way, (got, seconds) in ways.items():
                cells = []
                for team in sorted(truth):
                    v = got.get(team, float("nan"))
                    cells.append(f"{v:>13,.0f} ({(v / truth[team] - 1) * 100:+.3f}%)")
                print(f"{way:<26} {seconds:>8.2f}  " + "  ".join(cells))
                results[way] = {"seconds": round(seconds, 3), "by_team": got}
            for way in (w for w in ways if w != "increase()"):
                if ways[way][0] != {k: float(v) for k, v in truth.items()}:
                    print(f"FAIL: {way} is not exact")
                    ok = False
    results["truth"] = truth
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
