#!/usr/bin/env python3
"""Generates the Grafana dashboards in this directory (run it after editing; the JSON is
committed so Grafana provisioning needs no build step). Every panel uses the
`datasource` template variable; uids are stable."""
import json, os

DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"

def panel(pid, title, exprs, x, y, w=12, h=8, unit="short", kind="timeseries", desc=""):
    return {
        "id": pid, "type": kind, "title": title, "description": desc, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
        "targets": [{"datasource": DS, "refId": chr(65 + i), "expr": e, "legendFormat": l}
                    for i, (e, l) in enumerate(exprs)],
    }

def dashboard(uid, title, panels, extra_vars=()):
    return {
        "uid": uid, "title": title, "tags": ["sagawatch"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{
            "name": "datasource", "label": "Data source", "type": "datasource",
            "query": "prometheus", "current": {}, "hide": 0,
        }] + list(extra_vars)},
        "panels": panels,
    }

overview = dashboard("sagawatch-overview", "sagawatch / overview", [
    panel(1, "Events received by source", [(f"sum by (source) (rate(sagawatch_events_received_total[{RI}]))", "{{source}}")], 0, 0, unit="ops",
          desc="Is data flowing? Events read from each source per second."),
    panel(2, "Events rejected by source and reason", [(f"sum by (source, reason) (rate(sagawatch_events_rejected_total[{RI}]))", "{{source}} {{reason}}")], 12, 0, unit="ops",
          desc="Malformed events: bad JSON, not an object, no or bad time field."),
    panel(3, "Missing steps by rule", [(f"sum by (rule) (rate(sagawatch_steps_total{{outcome=\"missing\"}}[{RI}]))", "{{rule}}")], 0, 8, unit="ops",
          desc="Which sagas are stalling: steps whose deadline passed without their correlate."),
    panel(4, "Late steps by rule", [(f"sum by (rule) (rate(sagawatch_steps_total{{outcome=\"late\"}}[{RI}]))", "{{rule}}")], 12, 8, unit="ops",
          desc="Correlates that arrived after their deadline: windows too tight, or a slow service."),
    panel(5, "Open instances by rule", [("sum by (rule) (sagawatch_open_instances)", "{{rule}}")], 0, 16, unit="short",
          desc="Sagas in flight. Steady growth means triggers without correlates."),
    panel(6, "Oldest open deadline (age)", [("max by (instance) (sagawatch_oldest_open_deadline_age_seconds)", "{{instance}}")], 12, 16, unit="s",
          desc="Engine clock minus the earliest open deadline, per daemon: negative is the time left until it is due. Measured on the engine clock, so a clock that stands still shows in Clock lag, not here."),
    panel(7, "Step latency (trigger to correlate)", [
        (f"histogram_quantile(0.5, sum by (le) (rate(sagawatch_step_latency_seconds_bucket[{RI}])))", "p50"),
        (f"histogram_quantile(0.95, sum by (le) (rate(sagawatch_step_latency_seconds_bucket[{RI}])))", "p95"),
        (f"histogram_quantile(0.99, sum by (le) (rate(sagawatch_step_latency_seconds_bucket[{RI}])))", "p99")], 0, 24, unit="s",
          desc="How long after the trigger the correlates that came in time arrive (late ones are not counted: see Late steps); a p99 close to the rules' `within` means windows are tight."),
    panel(8, "Outbox backlog by sink", [("sum by (sink) (sagawatch_outbox_backlog)", "{{sink}}"),
                                        ("max by (sink) (sagawatch_outbox_oldest_age_seconds)", "{{sink}} oldest (s)")], 12, 24, unit="short",
          desc="Alerts and compensations waiting for delivery, and how long the oldest has waited (seconds). Growing: a receiver is down or slow."),
    panel(9, "Deliveries by sink and result", [(f"sum by (sink, result) (rate(sagawatch_outbox_deliveries_total[{RI}]))", "{{sink}} {{result}}")], 0, 32, unit="ops",
          desc="Delivered, retried and given-up attempts per second."),
    panel(10, "Given up (last hour)", [("sum by (sink) (increase(sagawatch_outbox_deliveries_total{result=\"given_up\"}[1h]))", "{{sink}}")], 12, 32, unit="short",
          desc="Messages abandoned after outbox.give_up: each one is an alert or compensation that never arrived."),
    panel(11, "Source lag (bytes behind)", [("sum by (source) (sagawatch_source_lag_bytes)", "{{source}}")], 0, 40, unit="bytes",
          desc="File sources: bytes written but not yet read."),
    panel(12, "Clock lag", [("max by (instance) (sagawatch_clock_lag_seconds)", "{{instance}}")], 12, 40, unit="s",
          desc="Per daemon: wall time minus time.lateness minus the engine clock, how far the clock is behind where it could be (deadlines fire that much late). Negative: events dated ahead of the wall clock moved it past."),
    panel(13, "State commit duration", [
        (f"histogram_quantile(0.5, sum by (le) (rate(sagawatch_state_commit_duration_seconds_bucket[{RI}])))", "p50"),
        (f"histogram_quantile(0.99, sum by (le) (rate(sagawatch_state_commit_duration_seconds_bucket[{RI}])))", "p99")], 0, 48, unit="s",
          desc="SQLite commit time per batch; high values mean slow disk."),
    panel(14, "Rules reloads", [(f"sum by (result) (increase(sagawatch_rules_reloads_total[1h]))", "{{result}}")], 12, 48, unit="short",
          desc="Reloads in the last hour by result; a failure means the previous rules still run."),
])

rule_var = {"name": "rule", "label": "Rule", "type": "query", "datasource": DS,
            "query": {"query": "label_values(sagawatch_open_instances, rule)", "refId": "rule"},
            "definition": "label_values(sagawatch_open_instances, rule)", "refresh": 2, "includeAll": False, "hide": 0}
rule = dashboard("sagawatch-rule", "sagawatch / rule", [
    panel(1, "Open instances", [('sum(sagawatch_open_instances{rule="$rule"})', "open")], 0, 0, unit="short"),
    panel(2, "Opened and closed", [
        (f'sum(rate(sagawatch_instances_opened_total{{rule="$rule"}}[{RI}]))', "opened"),
        (f'sum by (outcome) (rate(sagawatch_instances_closed_total{{rule="$rule"}}[{RI}]))', "closed {{outcome}}")], 12, 0, unit="ops"),
    panel(3, "Steps by outcome", [(f'sum by (step, outcome) (rate(sagawatch_steps_total{{rule="$rule"}}[{RI}]))', "{{step}} {{outcome}}")], 0, 8, unit="ops"),
    # A late step counts once as missing and once as late: the ratio is of steps decided.
    panel(4, "Missing ratio by step", [(f'sum by (step) (rate(sagawatch_steps_total{{rule="$rule",outcome="missing"}}[{RI}])) / sum by (step) (rate(sagawatch_steps_total{{rule="$rule",outcome=~"missing|satisfied"}}[{RI}]))', "{{step}}")], 12, 8, unit="percentunit"),
    panel(5, "Step latency p50 / p99 by step", [
        (f'histogram_quantile(0.5, sum by (le, step) (rate(sagawatch_step_latency_seconds_bucket{{rule="$rule"}}[{RI}])))', "{{step}} p50"),
        (f'histogram_quantile(0.99, sum by (le, step) (rate(sagawatch_step_latency_seconds_bucket{{rule="$rule"}}[{RI}])))', "{{step}} p99")], 0, 16, unit="s"),
    panel(6, "Alerts and compensations", [(f'sum by (outcome) (rate(sagawatch_outcomes_total{{rule="$rule",outcome=~"alert|compensate"}}[{RI}]))', "{{outcome}}")], 12, 16, unit="ops"),
], extra_vars=[rule_var])

here = os.path.dirname(os.path.abspath(__file__))
for d in (overview, rule):
    with open(os.path.join(here, d["uid"] + ".json"), "w") as f:
        json.dump(d, f, indent=2)
        f.write("\n")
