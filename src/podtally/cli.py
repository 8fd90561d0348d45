"""The `podtally` command line: one entry point, a subcommand per component."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from podtally import __version__


def _fail(err: ValidationError | ValueError) -> click.ClickException:
    return click.ClickException(str(err))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="podtally")
def main() -> None:
    """podtally: LLM usage metering at the pod, attributed by workload identity."""


_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@main.command()
@click.option("--ca-cert", type=_FILE, required=True,
              help="PEM CA certificate used to mint leaf certificates for LLM hosts.")
@click.option("--ca-key", type=_FILE, required=True, help="PEM private key of that CA.")
@click.option("--mode", type=click.Choice(["transparent", "regular"]), default="transparent",
              show_default=True, help="transparent (iptables redirect) or regular (proxy).")
@click.option("--port", type=int, default=15001, show_default=True, help="Proxy port.")
@click.option("--listen-host", default="", help="Proxy listen address (default: all).")
@click.option("--metrics-port", type=int, default=15090, show_default=True,
              help="Port of /metrics, /healthz, /readyz.")
@click.option("--upstream-ca-bundle", type=_FILE,
              help="Extra CAs trusted for upstream TLS (on top of the system store).")
@click.option("--labels-file", type=click.Path(dir_okay=False, path_type=Path),
              default="/etc/podinfo/labels", show_default=True,
              help="Downward-API labels file (key=\"value\" per line).")
@click.option("--team-label", "team_labels", multiple=True, default=("team",), show_default=True,
              help="Pod label naming the team; repeat for a fallback order.")
@click.option("--llm-host", "llm_hosts", multiple=True, metavar="HOST=PROVIDER",
              help="Extra LLM endpoint to decrypt and meter (globs allowed); repeatable.")
@click.option("--inject-stream-usage/--no-inject-stream-usage", default=True, show_default=True,
              help="Ask OpenAI chat streams for usage, invisibly to the client.")
@click.option("--price-overrides", type=_FILE,
              help="YAML/JSON per-model prices that win over the bundled table.")
@click.option("--drain-timeout", type=float, default=25.0, show_default=True,
              help="Seconds, after SIGTERM, to finish streams and await a last scrape.")
def sidecar(**kwargs: object) -> None:
    """Run the metering proxy (in the pod, as uid 1337)."""
    from podtally.sidecar.run import main as run
    from podtally.sidecar.settings import SidecarSettings

    try:
        settings = SidecarSettings.model_validate(kwargs)
    except (ValidationError, ValueError) as err:
        raise _fail(err) from err
    raise SystemExit(run(settings))


@main.command("init-iptables")
@click.option("--proxy-uid", type=int, default=1337, show_default=True,
              help="The sidecar's uid: its own traffic is never redirected.")
@click.option("--proxy-port", type=int, default=15001, show_default=True)
@click.option("--ports", default="443,80", show_default=True,
              help="Destination TCP ports to redirect; empty for all TCP.")
@click.option("--exclude-cidrs", default="", help="Comma-separated CIDRs never redirected.")
@click.option("--ipv6/--no-ipv6", default=True, show_default=True,
              help="Also redirect IPv6 (best effort where ip6tables exists).")
@click.option("--dry-run", is_flag=True, help="Print the iptables-restore input; change nothing.")
def init_iptables(proxy_uid: int, proxy_port: int, ports: str, exclude_cidrs: str,
                  ipv6: bool, dry_run: bool) -> None:
    """Redirect the pod's outbound traffic to the sidecar (idempotent; needs NET_ADMIN)."""
    from podtally import iptables

    try:
        cfg = iptables.IptablesConfig(
            proxy_uid=proxy_uid, proxy_port=proxy_port, ipv6=ipv6,
            ports=iptables.parse_ports(ports), exclude_cidrs=iptables.parse_cidrs(exclude_cidrs),
        )
    except (ValidationError, ValueError) as err:
        raise _fail(err) from err
    if dry_run:
        click.echo(iptables.build_rules(cfg), nl=False)
        return
    try:
        iptables.apply(cfg)
    except iptables.IptablesError as err:
        raise click.ClickException(str(err)) from err
    click.echo("podtally: iptables redirect installed", err=True)


@main.command()
@click.option("-f", "--filename", "manifest", type=click.File("r"), required=True,
              help="Manifest to inject (YAML, multi-document; - for stdin).")
@click.option("--namespace", default="default", show_default=True,
              help="Namespace of objects that name none.")
@click.option("--namespace-labels", default="", metavar="k=v,...",
              help="Labels of that namespace (opt-in label, team).")
@click.option("--operator-namespace", default="podtally-system", show_default=True)
@click.option("--image", default=None, help="podtally image for the init step and sidecar.")
@click.option("--plain-sidecar", is_flag=True,
              help="A plain container instead of a native sidecar (Kubernetes < 1.29).")
def inject(manifest: Any, namespace: str, namespace_labels: str, operator_namespace: str,
           image: str | None, plain_sidecar: bool) -> None:
    """Inject the sidecar into manifests offline (like istioctl kube-inject); prints YAML."""
    import yaml

    from podtally.injection.manifests import inject_documents
    from podtally.injection.render import InjectionConfig

    try:
        labels = dict(
            kv.split("=", 1) for kv in namespace_labels.split(",") if kv.strip()
        )
    except ValueError as err:
        raise click.BadParameter(f"not k=v pairs: {namespace_labels!r}") from err
    try:
        docs = [d for d in yaml.safe_load_all(manifest) if d is not None]
    except yaml.YAMLError as err:
        raise click.ClickException(f"{manifest.name}: not valid YAML: {err}") from err
    overrides: dict[str, Any] = {"native_sidecar": not plain_sidecar}
    if image:
        overrides["image"] = image
    out = inject_documents(docs, config=InjectionConfig(**overrides),
                           default_namespace=namespace, namespace_labels=labels,
                           operator_namespace=operator_namespace)
    click.echo(yaml.safe_dump_all(out, sort_keys=False), nl=False)


@main.command()
@click.option("--namespace", envvar="POD_NAMESPACE", default="podtally-system",
              show_default=True, show_envvar=True,
              help="The operator's namespace (webhook Secret, Lease); never injected.")
@click.option("--webhook-port", type=int, default=9443, show_default=True,
              help="HTTPS port of the admission webhook (POST /inject).")
@click.option("--metrics-port", type=int, default=9090, show_default=True,
              help="Port of /metrics, /healthz, /readyz.")
@click.option("--webhook-service", default="podtally-webhook", show_default=True,
              help="Service of the webhook: the serving certificate's DNS names.")
@click.option("--webhook-config", default="podtally", show_default=True,
              help="MutatingWebhookConfiguration whose caBundle is kept (self-managed certs).")
@click.option("--cert-dir", type=click.Path(file_okay=False, path_type=Path),
              default="/tmp/podtally-webhook", show_default=True,
              help="Directory of the webhook's tls.crt/tls.key (written, or mounted).")
@click.option("--cert-manager", is_flag=True,
              help="cert-manager provides the certificate in --cert-dir and sets caBundle.")
@click.option("--injection-config", type=_FILE,
              help="YAML of injection settings (InjectionConfig fields).")
@click.option("--injection-template", type=_FILE,
              help="Injection template (default: the packaged one).")
@click.option("--leader-election/--no-leader-election", default=True, show_default=True,
              help="Reconcile only on the replica holding the Lease.")
@click.option("--lease-name", default="podtally-operator", show_default=True)
@click.option("--ca-validity-days", type=int, default=365, show_default=True,
              help="Lifetime of the namespace CAs and the webhook's certificate.")
@click.option("--ca-rotate-before-days", type=int, default=30, show_default=True,
              help="Rotate a CA with less than this many days left.")
@click.option("--resync-seconds", type=float, default=60.0, show_default=True,
              help="Full reconcile period.")
@click.option("--kubeconfig", type=_FILE, help="Out of cluster: the kubeconfig to use.")
def operator(**kwargs: Any) -> None:
    """Run the admission webhook and the namespace controller (in the cluster)."""
    from podtally.control.run import OperatorSettings, load_injection_config, run
    from podtally.injection.render import render_parts

    try:
        settings = OperatorSettings.model_validate(kwargs)
        settings.policy()
        config = load_injection_config(settings.injection_config)
        render_parts(config, "probe", template_path=settings.injection_template)
    except (ValidationError, ValueError, OSError) as err:
        raise click.ClickException(str(err)) from err
    except Exception as err:  # a template that does not render
        raise click.ClickException(f"injection template: {err}") from err
    raise SystemExit(run(settings))


_REPORT_FORMATS = ("table", "csv", "json", "focus", "html")
_DAY = click.DateTime(formats=["%Y-%m-%d"])


def _progress_reporter(quiet: bool) -> tuple[Any, Any]:
    """(callback for the Prometheus client, closer): a live bar on a terminal, else a line
    per query on standard error; never on standard output, which may be the report."""
    import sys

    if quiet:
        return None, lambda: None
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(console=Console(stderr=True), transient=True)
        tasks: dict[str, Any] = {}
        bar.start()

        def live(metric: str, done: int, total: int, samples: int) -> None:
            if metric not in tasks:
                tasks[metric] = bar.add_task(metric, total=max(total, 1))
            bar.update(tasks[metric], completed=done if total else 1,
                       description=f"{metric} ({samples:,} samples)")

        return live, bar.stop

    def lines(metric: str, done: int, total: int, samples: int) -> None:
        click.echo(f"podtally: {metric}: query {done}/{total}, {samples:,} samples", err=True)

    return lines, lambda: None


@main.command()
@click.option("--prometheus-url", metavar="URL",
              help="Prometheus' base URL (its /api/v1 is queried).")
@click.option("--records", "records_path", metavar="PATH",
              type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="Instead of Prometheus: the sidecars' JSON usage records (one per line; "
                   "- for stdin): exact per-call numbers, for reconciliation.")
@click.option("--start", required=True, type=_DAY, metavar="YYYY-MM-DD",
              help="First day of the period (00:00 UTC, inclusive).")
@click.option("--end", required=True, type=_DAY, metavar="YYYY-MM-DD",
              help="Day after the period (00:00 UTC, exclusive).")
@click.option("--by", "by_text", default="team,namespace,model", show_default=True,
              metavar="LABEL,...",
              help="Group by these of team,namespace,app,workload,service_account,model,"
                   "provider.")
@click.option("--format", "fmt", type=click.Choice(_REPORT_FORMATS), default="table",
              show_default=True,
              help="csv: the --by columns, values, a TOTAL row; focus: FinOps FOCUS 1.3 "
                   "rows per day at the finest grain (--by does not apply); html: one "
                   "self-contained page with charts.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this file instead of standard output.")
@click.option("--invoice", "invoice_text", metavar="PROVIDER=USD,...",
              help="Chargeback: each provider's real invoice (e.g. openai=12345.67,"
                   "anthropic=890), split over the groups by metered cost.")
@click.option("--budgets", "budgets_path", type=_FILE, metavar="FILE",
              help="YAML of monthly budgets per team (teams: {team: USD}): actual against "
                   "budget and the projected month end.")
@click.option("--as-of", type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
              metavar="YYYY-MM-DD[THH:MM:SS]",
              help="'Now' for the budgets' projection, in UTC (default: now).")
@click.option("--lookback", default="1h", show_default=True, metavar="DURATION",
              help="How far before --start to look for each series' last value.")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for each Prometheus answer.")
@click.option("--max-samples-per-query", type=click.IntRange(min=1), default=500_000,
              show_default=True, help="Split the period into queries of about this many "
                                      "samples each.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on standard error.")
def report(prometheus_url: str | None, records_path: Path | None, start: Any, end: Any,
           by_text: str, fmt: str, output: Path | None, invoice_text: str | None,
           budgets_path: Path | None, as_of: Any, lookback: str, timeout: float,
           max_samples_per_query: int, quiet: bool) -> None:
    """Exact LLM usage and cost per group over [start, end), from Prometheus or records."""
    import sys
    from dataclasses import replace
    from datetime import UTC, datetime

    from podtally.report.budgets import month_bounds, parse_budgets
    from podtally.report.build import build_report
    from podtally.report.chargeback import check_invoices, parse_invoices
    from podtally.report.formats import render_as
    from podtally.report.period import Period, iso, parse_duration
    from podtally.report.prometheus import PrometheusClient, PrometheusError
    from podtally.report.rows import parse_by
    from podtally.report.usage_records import RecordError, read_records

    if (prometheus_url is None) == (records_path is None):
        raise click.UsageError("give one of --prometheus-url URL or --records PATH")
    try:
        period = Period.from_days(start.date(), end.date())
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--end'") from err
    try:
        by = parse_by(by_text)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--by'") from err
    try:
        lookback_ms = parse_duration(lookback)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--lookback'") from err
    try:
        invoices = parse_invoices(invoice_text) if invoice_text is not None else {}
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--invoice'") from err
    budgets = None
    if budgets_path is not None:
        try:
            budgets = parse_budgets(budgets_path.read_text(encoding="utf-8"), str(budgets_path))
            month_bounds(period)
        except (ValueError, OSError) as err:
            raise click.BadParameter(str(err), param_hint="'--budgets'") from err
    now = as_of.replace(tzinfo=UTC) if as_of is not None else datetime.now(UTC)

    if records_path is not None:
        name = "-" if str(records_path) == "-" else str(records_path)
        try:
            with click.open_file(name, encoding="utf-8", errors="replace") as lines:
                result, stats = read_records(lines, period, by=by, source=name)
        except OSError as err:
            raise click.ClickException(f"cannot read {name}: {err}") from err
        except RecordError as err:
            raise click.ClickException(str(err)) from err
        if not quiet:
            click.echo(f"podtally: {name}: {stats.lines:,} lines, {stats.records:,} usage "
                       f"records, {stats.in_period:,} in the period", err=True)
        if not result.samples:
            raise click.ClickException(
                f"no usage records in {iso(period.start)} – {iso(period.end)} in {name} "
                f"({stats.records:,} records in other periods, {len(stats.skipped):,} lines "
                "that are not records): nothing to report")
    else:
        assert prometheus_url is not None
        callback, stop = _progress_reporter(quiet)
        try:
            with PrometheusClient(prometheus_url, timeout=timeout, progress=callback,
                                  max_samples_per_query=max_samples_per_query) as prom:
                result = build_report(prom, period, by=by, lookback_ms=lookback_ms,
                                      source_name=prom.url)
                result = replace(result, warnings=tuple(prom.warnings))
        except PrometheusError as err:
            raise click.ClickException(str(err)) from err
        finally:
            stop()
        if not result.samples:
            raise click.ClickException(
                f"Prometheus at {prometheus_url} has no samples of podtally_llm_* in "
                f"{iso(period.start)} – {iso(period.end)}: nothing to report (is the period "
                "right? does this Prometheus scrape the sidecars, and keep data that long?)")
    result = replace(result, invoices=invoices, budgets=budgets, as_of=now)
    try:
        check_invoices(result)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--invoice'") from err
    for warning in result.warnings:
        click.echo(f"podtally: warning: {warning}", err=True)
    if not result.rows():
        click.echo("podtally: the period has samples but no LLM usage (every counter flat)",
                   err=True)
    try:
        text = render_as(result, fmt)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    if output is None:
        if fmt == "table" and sys.stdout.isatty():
            from rich.console import Console

            from podtally.report.render import table_renderables

            parts = table_renderables(result)
            console = Console()
            # Never truncate a number to fit the terminal: widen to the table instead (the
            # terminal wraps long lines; `-o` or a pipe gives plain text).
            wide = Console(width=10_000)
            needed = max(wide.measure(p).maximum for p in parts)
            if needed > console.width:
                console = Console(width=needed)
            for part in parts:
                console.print(part)
            return
        click.echo(text, nl=False)
    else:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as err:
            raise click.ClickException(f"cannot write {output}: {err}") from err


@main.command("ebpf-agent")
@click.option("--metrics-port", type=int, default=15091, show_default=True,
              help="Port of /metrics, /healthz, /readyz.")
@click.option("--metrics-host", default="0.0.0.0", show_default=True)
@click.option("--llm-host", "llm_hosts", multiple=True, metavar="HOST=PROVIDER",
              help="Extra LLM endpoint to meter (globs allowed); exact names are also "
                   "resolved for coverage. Repeatable.")
@click.option("--llm-endpoint", "llm_endpoints", multiple=True,
              metavar="CIDR[:PORT]=PROVIDER",
              help="LLM endpoint addresses for coverage (unmetered connections). Repeatable.")
@click.option("--proxy-uid", type=int, default=1337, show_default=True,
              help="The sidecar's uid: never copied, its connections are the proxy's.")
@click.option("--team-label", "team_labels", multiple=True, default=("team",),
              show_default=True, help="Pod/namespace label naming the team; repeatable.")
@click.option("--node-name", envvar="NODE_NAME", show_envvar=True,
              help="Watch only this node's pods.")
@click.option("--kubeconfig", type=_FILE, help="Kubeconfig (default: in-cluster).")
@click.option("--api-server", metavar="URL", help="Explicit API server URL.")
@click.option("--kubernetes/--no-kubernetes", default=True, show_default=True,
              help="Read pod metadata from the API server (when one is configured).")
@click.option("--cgroup", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Trace only tasks under this cgroup v2 directory.")
@click.option("--ringbuf-pages", type=int, default=1024, show_default=True,
              help="Ring buffer size in pages (a power of two); when full, events are "
                   "dropped and counted.")
@click.option("--libssl", multiple=True, type=_FILE,
              help="A libssl (or static OpenSSL binary) to attach to; repeatable.")
@click.option("--fast-probes/--no-fast-probes", default=True, show_default=True,
              help="Probe OpenSSL's internal write/read functions where the code matches "
                   "(one trap per call); else the public SSL_* symbols.")
@click.option("--discover/--no-discover", default=True, show_default=True,
              help="Attach to every libssl that processes map, rescanning /proc.")
@click.option("--rescan-seconds", type=float, default=10.0, show_default=True)
@click.option("--max-connections", type=int, default=4096, show_default=True,
              help="TLS connections followed at once.")
@click.option("--price-overrides", type=_FILE,
              help="YAML/JSON per-model prices that win over the bundled table.")
@click.option("--records/--no-records", default=True, show_default=True,
              help="One JSON usage record per call on stdout.")
def ebpf_agent(**kwargs: object) -> None:
    """Run the node agent: meter OpenSSL TLS without a proxy, count unmetered connections."""
    from podtally.ebpf.agent import main as run
    from podtally.ebpf.settings import AgentSettings

    try:
        settings = AgentSettings.model_validate(kwargs)
    except (ValidationError, ValueError) as err:
        raise _fail(err) from err
    raise SystemExit(run(settings))


if __name__ == "__main__":
    main()
