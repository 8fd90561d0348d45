"""`podtally report`: exact LLM usage and cost per group over a period, from Prometheus.

Period
    [start, end): from 00:00:00 UTC of --start up to, not including, 00:00:00 UTC of --end.

What a counter series counts in the period
    Every increment belongs to the scrape that first shows it. For each sample s_i of the
    series whose timestamp lies in [start, end), add s_i − s_(i−1), where s_(i−1) is the
    series' previous sample — for the first one in the period that is the baseline, the
    last sample before start — or s_i itself when s_i < s_(i−1): a counter reset (the
    sidecar restarted and counted from 0, as Prometheus assumes).

    - Nothing is interpolated or extrapolated (`increase()` extrapolates to the edges of
      its window, which gives fractions of tokens and periods that do not add up). Integer
      counters give integers, and reports of consecutive periods add up exactly to the
      report of their union.
    - The baseline is looked for within --lookback (default 1h) before start. A series with
      no sample there — born in the period, or back after a longer gap — is counted from
      its first sample in the period, whose own value is not counted. podtally's sidecar
      exposes every new series at 0 before counting into it (zero-first), and again after a
      restart, so for its series that first sample is 0 and nothing is lost. A series that
      appears already non-zero (a scrape that missed the zero, or not podtally's) loses what
      its first sample held, as with Prometheus' own increase().
    - A series that ends in the period (the pod is gone) counts up to its last sample.
    - A call counted after the last scrape before `end` lands in the next period.

Labels
    Rows group by the metric's own labels. If a scrape without honor_labels made Prometheus
    rename one because the target has a label of that name (`namespace` → the metric's
    value in `exported_namespace`, the target's pod namespace in `namespace`), the
    `exported_` value is used: the metric's identity is the metered pod's, also when
    another component (the eBPF agent in podtally-system) exported it. The chart's
    PodMonitor sets honorLabels, so no renaming happens there. Each sidecar must be scraped
    by one job only, or its calls count once per job.

Values
    tokens from podtally_llm_tokens_total (token_type buckets are disjoint; tokens_total is
    their sum), cost from podtally_llm_cost_usd_total (the bundled price table's list
    prices; rounded to 1e-9 USD per row, and TOTAL is the sum of the rounded rows), requests
    from podtally_llm_requests_total (every operation and status code). Groups where all
    are 0 are left out.

Finance
    `chargeback`: the attribution coverage (share of cost with a known team, `unattributed`
    on its own row) and `--invoice` (each provider's invoice split over the groups by
    metered cost, to the cent, with the variance per provider); `budgets`: monthly budgets
    per team, actual and projected to the month's end. Each increase is also kept per day
    of the period, for FOCUS' daily charges and the HTML page's chart by day.

Egress
    `egress`: the eBPF agent's `podtally_llm_connections_total{via}`, increased the same
    way: connections to LLM endpoints metered by a sidecar (`via="sidecar"`) against
    unmetered ones (`via="direct"`) per group, and the egress coverage (metered share) —
    apart from the attribution coverage. No agent samples: "no eBPF agent data".

Records
    `usage_records` builds the same report from the sidecars' JSON lines (`--records`):
    each call on the day it started, for reconciliation with Prometheus.

How
    Raw samples over [start − lookback, end), fetched by `podtally.report.prometheus` (the
    only module here doing I/O), then pure arithmetic: `increase` (per series), `build`
    (series to report), `rows` (grouping), `egress` (connections), `render`/`focus`/`html`
    (output).
"""
