#!/usr/bin/env python3
"""Summarises keel-bench JSON lines (bench/results/*.jsonl) as Markdown tables, one
per scenario shape, servers side by side, with each figure's ratio to the best peer
(the best non-Keel server of that row)."""

import json
import sys
from collections import defaultdict


def key(r):
    s = r["scenario"]
    if s == "idle":
        return f"idle, {r['connections']} connections"
    if s in ("fanout", "slow"):
        extra = f", {r['slow_subscribers']} stalled" if r.get("slow_subscribers") else ""
        return f"{s}, {r['subscribers']} subscribers x {r['rate']} msg/s{extra}"
    if s == "rooms":
        return f"rooms, {r['rooms']} x {r['per_room']} at {r['rate_per_member']} msg/s"
    if s == "churn":
        rate = f" at {r['rate']:,}/s offered" if r.get("rate") else ""
        return f"churn, {r['cycles']:,} cycles{rate}"
    return s


COLUMNS = {
    "idle": [("rss_per_connection_bytes", "RSS/conn (B)", min), ("server_cpu_pct_idle", "idle CPU %", min), ("still_open", "open at end", max)],
    "fanout": [("deliveries_per_s", "deliveries/s", max), ("loss", "loss", min), ("server_cpu_s_per_million_deliveries", "CPU s / M deliveries", min), ("server_cpu_pct", "CPU %", min), ("p50", "p50 us", min), ("p99", "p99 us", min), ("p999", "p99.9 us", min)],
    "rooms": [("deliveries_per_s", "deliveries/s", max), ("server_cpu_s_per_million_deliveries", "CPU s / M deliveries", min), ("p99", "p99 us", min)],
    "churn": [("cycles_per_s", "cycles/s", max), ("server_cpu_us_per_cycle", "CPU us / cycle", min), ("server_cpu_pct", "CPU %", min), ("rss_growth_pct", "RSS growth %", min), ("rss_growth_repeat_pct", "RSS growth, repeat storm %", min), ("failed", "failed", min)],
}
COLUMNS["slow"] = COLUMNS["fanout"] + [("server_rss", "RSS (B)", min)]


def value(r, field):
    if field in ("p50", "p99", "p999"):
        return r.get("latency_us", {}).get(field)
    return r.get(field)


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:,.0f}"
    return f"{v:,}"


def outcome(p):
    """What the attack of one abuse phase came to, in a few words."""
    ph = p["phase"]
    if ph == "spray":
        if "accepted" not in p:
            return p.get("attack", "-")
        refused = ", ".join(f"{v:,} {k}" for k, v in (p.get("refused") or {}).items())
        return f"{p['accepted']:,} accepted" + (f"; refused: {refused}" if refused else "")
    if ph == "slowloris":
        closed = p.get("slow_closed_by_server", 0)
        after = p.get("slow_closed_after_max_s")
        when = f", the last after {after:.1f} s" if after else ""
        return f"{closed:,} of {p.get('slow_opened', 0):,} closed by the server{when}"
    if ph == "flood":
        acc = p.get("flood_accepted")
        acc = f", {acc:,} accepted" if acc is not None else ""
        return f"{p.get('flood_sent', 0):,} sent{acc}; ended: {p.get('flood_ended')}"
    if ph == "nesting":
        ref = p.get("deep_refused")
        ref = f"{ref} refused, " if ref is not None else ""
        return f"{ref}{p.get('probe_deep_received', 0)} reached the probe"
    return ""


def abuse_table(by_server):
    """One row per server and phase of the abuse scenario."""
    print("\n### abuse: a hostile client against each server at its defaults\n")
    print("| server | phase | RSS end / peak (MB) | CPU % | probe p50 / p99 (ms) | probe received | attack |")
    print("|---|---|---|---|---|---|---|")
    for server, r in by_server.items():
        for p in r["phases"]:
            lost = f" ({p['probe_lost']})" if p.get("probe_lost") else ""
            one = lambda v: "-" if v is None else f"{v:.0f}"
            print(
                f"| {server} | {p['phase']} | {one(p.get('rss_mb_end'))} / {one(p.get('rss_mb_peak'))} "
                f"| {one(p.get('cpu_pct'))} | {p['probe_p50_us'] / 1000:.1f} / {p['probe_p99_us'] / 1000:.1f} "
                f"| {p['probe_received']} of {p['probe_sent']}{lost} | {outcome(p)} |"
            )


def main(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    groups = defaultdict(dict)
    errors = []
    for r in rows:
        if "error" in r:
            errors.append(r)
            continue
        groups[key(r)][r["label"]] = r
    if "abuse" in groups:
        abuse_table(groups.pop("abuse"))
    for title, by_server in groups.items():
        scenario = next(iter(by_server.values()))["scenario"]
        cols = COLUMNS.get(scenario, [])
        servers = list(by_server)
        print(f"\n### {title}\n")
        print("| figure | " + " | ".join(servers) + " | Keel vs best peer |")
        print("|---|" + "---|" * (len(servers) + 1))
        for field, label, better in cols:
            vals = {s: value(by_server[s], field) for s in servers}
            peers = [v for s, v in vals.items() if s != "keel" and isinstance(v, (int, float)) and v == v]
            ratio = "-"
            k = vals.get("keel")
            if peers and isinstance(k, (int, float)):
                best = better(peers)
                if best:
                    ratio = f"{k / best:.2f}x"
            print(f"| {label} | " + " | ".join(fmt(vals[s]) for s in servers) + f" | {ratio} |")
        notes = [f"{s}: {r['note']}" for s, r in by_server.items() if r.get("note")]
        for n in notes:
            print(f"\n> {n}")
    for e in errors:
        print(f"\n> {e['label']} {e['scenario']} ({e.get('args', '')}): run failed")


if __name__ == "__main__":
    main(sys.argv[1])
