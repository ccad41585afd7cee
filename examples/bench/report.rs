//! The results table: each ferry figure beside what bounds it, as Markdown
//! (`results.md`) and as plain text (the terminal).

use serde_json::Value;

use crate::{best3_spread_pct, spread_pct, Settings, SPREAD_LIMIT_PCT};

/// One line of the table: a ferry figure beside what bounds it.
pub struct Row {
    figure: String,
    ferry: String,
    bound: String,
    ratio: String,
    /// Passes run and their spread (`spread_cell`), for a throughput line.
    spread: String,
    target: String,
    met: String,
}

pub fn fmt_rate(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A line's passes and their spread, from its JSON (`best_of`): "3
/// passes: 4.2%", or with more than three "5 passes: 14.0% > 10%; best 3:
/// 6.1%"; "1 pass, no spread" for a line measured once; empty for a line
/// that failed or was skipped.
pub fn spread_cell(v: &Value) -> String {
    let flag = |p: f64| {
        if p > SPREAD_LIMIT_PCT {
            format!("{p:.1}% > {SPREAD_LIMIT_PCT:.0}%")
        } else {
            format!("{p:.1}%")
        }
    };
    let rates: Vec<f64> = match v.get("rates").and_then(Value::as_array) {
        Some(r) => r.iter().filter_map(Value::as_f64).collect(),
        None if v.get("rate").is_some() => return "1 pass, no spread".into(),
        None => return String::new(),
    };
    match (spread_pct(&rates), best3_spread_pct(&rates)) {
        (Some(all), Some(best3)) if rates.len() > 3 => format!(
            "{} passes: {}; best 3: {}",
            rates.len(),
            flag(all),
            flag(best3)
        ),
        (Some(all), _) => format!("{} passes: {}", rates.len(), flag(all)),
        _ => "1 pass, no spread".into(),
    }
}

/// The JSON of one line, by its path.
fn json_at<'a>(r: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(r, |v, p| &v[*p])
}

pub fn met(ok: bool) -> String {
    if ok { "met" } else { "not met" }.to_string()
}

pub fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut v = v;
    for p in path {
        v = v.get(*p)?;
    }
    v.as_f64()
}

pub fn rows(r: &Value, s: &Settings) -> Vec<Row> {
    // A phase that failed or was skipped: its JSON says which.
    let failed = || "n/a".to_string();
    let a_crate = num(r, &["ceilings", "a_pulsar_crate", "rate"]);
    let a_bare = num(r, &["ceilings", "a_pulsar_bare", "rate"]);
    // Ceiling A is what the broker was shown to take: the faster client.
    let a = match (a_crate, a_bare) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    let b = num(r, &["ceilings", "b_mqtt", "rate"]);
    let c = num(r, &["ceilings", "c_sqlite", "rate"]);
    let named = [("A", a), ("B", b), ("C", c)];
    let lowest = named
        .iter()
        .filter_map(|(n, v)| v.map(|v| (*n, v)))
        .min_by(|x, y| x.1.total_cmp(&y.1));
    let mut out = Vec::new();
    let sqlite = format!("SQLite, {} per commit (WAL, synchronous=FULL)", s.batch);
    let crate_name = format!(
        "Pulsar publish, pulsar crate's producer (unbatched, window {})",
        s.window
    );
    let bare_name = format!(
        "Pulsar publish, bare protocol producer (unbatched, window {})",
        s.window
    );
    let cycle = num(r, &["extra", "c_sqlite_insert_and_delete", "rate"]);
    let e2e_spread = spread_cell(json_at(r, &["ferry", "end_to_end"]));
    let sqlite_cycle = format!(
        "SQLite insert, then delete, {} per commit (info: ferry's store does both)",
        s.batch
    );
    let pipeline = num(r, &["extra", "p_pipeline_without_store", "rate"]);
    let p_name = format!(
        "the pipeline without a store: MQTT through Mosquitto, forwarded at once by the bare producer (info, window {})",
        s.window
    );
    for (label, name, v, path) in [
        (
            "A1",
            crate_name.as_str(),
            a_crate,
            ["ceilings", "a_pulsar_crate"],
        ),
        (
            "A2",
            bare_name.as_str(),
            a_bare,
            ["ceilings", "a_pulsar_bare"],
        ),
        (
            "B",
            "MQTT QoS 1 through Mosquitto to one subscriber",
            b,
            ["ceilings", "b_mqtt"],
        ),
        ("C", sqlite.as_str(), c, ["ceilings", "c_sqlite"]),
        (
            "C'",
            sqlite_cycle.as_str(),
            cycle,
            ["extra", "c_sqlite_insert_and_delete"],
        ),
        (
            "P",
            p_name.as_str(),
            pipeline,
            ["extra", "p_pipeline_without_store"],
        ),
    ] {
        out.push(Row {
            figure: format!("ceiling {label}: {name}, updates/s"),
            ferry: "".into(),
            bound: v.map(fmt_rate).unwrap_or_else(failed),
            ratio: "".into(),
            spread: spread_cell(json_at(r, &path)),
            target: "".into(),
            met: "".into(),
        });
    }
    let e2e = num(r, &["ferry", "end_to_end", "rate"]);
    out.push(Row {
        figure: "ferry end to end (durable), updates/s".into(),
        ferry: e2e.map(fmt_rate).unwrap_or_else(failed),
        bound: lowest
            .map(|(n, v)| format!("{} (lowest: {n})", fmt_rate(v)))
            .unwrap_or_else(failed),
        ratio: match (e2e, lowest) {
            (Some(f), Some((_, l))) => format!("{:.0}%", 100.0 * f / l),
            _ => "".into(),
        },
        spread: e2e_spread.clone(),
        target: "≥ 85% of lowest ceiling".into(),
        met: match (e2e, lowest) {
            (Some(f), Some((_, l))) => met(f >= 0.85 * l),
            _ => "".into(),
        },
    });
    out.push(Row {
        figure: "ferry end to end vs P: the same pipeline without a store, this machine (info)"
            .into(),
        ferry: e2e.map(fmt_rate).unwrap_or_else(failed),
        bound: pipeline
            .map(|v| format!("{} (P)", fmt_rate(v)))
            .unwrap_or_else(failed),
        ratio: match (e2e, pipeline) {
            (Some(f), Some(p)) => format!("{:.0}%", 100.0 * f / p),
            _ => "".into(),
        },
        spread: e2e_spread,
        target: "".into(),
        met: "".into(),
    });
    let drain = num(r, &["ferry", "drain", "rate"]);
    let shed = num(r, &["ferry", "drain", "shed"]).unwrap_or(0.0);
    let shed_note = if shed > 0.0 {
        format!(" ({} shed by the store's limits)", fmt_rate(shed))
    } else {
        String::new()
    };
    out.push(Row {
        figure: format!(
            "drain of {} after an outage, updates/s{shed_note}",
            fmt_rate(s.backlog as f64)
        ),
        ferry: drain.map(fmt_rate).unwrap_or_else(failed),
        bound: a
            .map(|v| format!("{} (A, the faster)", fmt_rate(v)))
            .unwrap_or_else(failed),
        ratio: match (drain, a) {
            (Some(f), Some(a)) => format!("{:.0}%", 100.0 * f / a),
            _ => "".into(),
        },
        spread: spread_cell(json_at(r, &["ferry", "drain"])),
        target: "≥ 90% of A".into(),
        met: match (drain, a) {
            (Some(f), Some(a)) => met(f >= 0.9 * a),
            _ => "".into(),
        },
    });
    for (q, key, goal) in [("p50", "p50_ms", 3.0), ("p99", "p99_ms", 12.0)] {
        let f = num(r, &["ferry", "latency", key]);
        let l = num(r, &["ceilings", "l_no_store", key]);
        out.push(Row {
            figure: format!("latency {q} at {}/s, MQTT publish to consumer, ms", s.rate),
            ferry: f.map(|v| format!("{v:.1}")).unwrap_or_else(failed),
            bound: l
                .map(|v| format!("{v:.1} (L: no store)"))
                .unwrap_or_else(failed),
            ratio: match (f, l) {
                (Some(f), Some(l)) if l > 0.0 => format!("{:.1}×", f / l),
                _ => "".into(),
            },
            spread: String::new(),
            target: format!("≤ {goal} ms"),
            met: f.map(|v| met(v <= goal)).unwrap_or_default(),
        });
    }
    let lat_cpu = num(r, &["ferry", "latency", "cpu_us_per_update"]);
    let lat_bytes = num(r, &["ferry", "latency", "write_bytes_per_update"]);
    out.push(Row {
        figure: format!(
            "ferry at {}/s (info): CPU µs and bytes written to disk per update",
            s.rate
        ),
        ferry: match (lat_cpu, lat_bytes) {
            (Some(c), Some(b)) => format!("{c:.1} µs, {b:.0} bytes"),
            _ => failed(),
        },
        bound: format!("{} (payload)", s.payload),
        ratio: lat_bytes
            .map(|b| format!("{:.1}×", b / s.payload as f64))
            .unwrap_or_default(),
        spread: String::new(),
        target: "".into(),
        met: "".into(),
    });
    out.extend(downlink_rows(r, s, b));
    out.extend(fleet_rows(r, s));
    let rss = num(r, &["ferry", "resources", "peak_rss_kb"]);
    out.push(Row {
        figure: "ferry peak RSS (VmHWM), MiB".into(),
        ferry: rss
            .map(|v| format!("{:.1}", v / 1024.0))
            .unwrap_or_else(failed),
        bound: "".into(),
        ratio: "".into(),
        spread: String::new(),
        target: "≤ 16 MiB".into(),
        met: rss.map(|v| met(v / 1024.0 <= 16.0)).unwrap_or_default(),
    });
    let cpu = num(r, &["ferry", "resources", "cpu_us_per_update"]);
    out.push(Row {
        figure: "ferry CPU, s per 100,000 updates (µs per update)".into(),
        ferry: cpu
            .map(|v| format!("{:.2} ({v:.1} µs)", v / 10.0))
            .unwrap_or_else(failed),
        bound: "".into(),
        ratio: "".into(),
        spread: String::new(),
        target: "≤ 8 µs per update".into(),
        met: cpu.map(|v| met(v <= 8.0)).unwrap_or_default(),
    });
    let w = num(r, &["ferry", "resources", "write_bytes_per_update"]);
    out.push(Row {
        figure: "ferry bytes written to disk per update".into(),
        ferry: w.map(|v| format!("{v:.0}")).unwrap_or_else(failed),
        bound: format!("{} (payload)", s.payload),
        ratio: w
            .map(|v| format!("{:.1}×", v / s.payload as f64))
            .unwrap_or_default(),
        spread: String::new(),
        target: "≤ 3× payload".into(),
        met: w
            .map(|v| met(v <= 3.0 * s.payload as f64))
            .unwrap_or_default(),
    });
    // A record stored during the outage and sent in the drain: every byte
    // written for it, both phases.
    let life = match (
        num(r, &["ferry", "drain", "outage", "write_bytes"]),
        num(r, &["ferry", "drain", "write_bytes"]),
    ) {
        (Some(fill), Some(drain)) => Some((fill + drain) / s.backlog as f64),
        _ => None,
    };
    out.push(Row {
        figure:
            "ferry bytes written over a buffered record's life (stored in an outage, then drained)"
                .into(),
        ferry: life.map(|v| format!("{v:.0}")).unwrap_or_else(failed),
        bound: format!("{} (payload)", s.payload),
        ratio: life
            .map(|v| format!("{:.1}×", v / s.payload as f64))
            .unwrap_or_default(),
        spread: String::new(),
        target: "≤ 5× payload".into(),
        met: life
            .map(|v| met(v <= 5.0 * s.payload as f64))
            .unwrap_or_default(),
    });
    out.extend(large_rows(r, s));
    out
}

/// The large-payload line: ferry's peak RSS while storing and while
/// draining, the drain rate, the topic's check and the bytes written.
fn large_rows(r: &Value, s: &Settings) -> Vec<Row> {
    let failed = || "n/a".to_string();
    let large = json_at(r, &["ferry", "large"]);
    let f = |path: &[&str]| num(large, path);
    let what = format!(
        "{} payloads of {} bytes",
        fmt_rate(s.large_n as f64),
        fmt_rate(s.large_payload as f64)
    );
    let mib = |kb: Option<f64>| {
        kb.map(|v| format!("{:.1}", v / 1024.0))
            .unwrap_or_else(failed)
    };
    let row = |figure: String, ferry: String| Row {
        figure,
        ferry,
        bound: "".into(),
        ratio: "".into(),
        spread: String::new(),
        target: "".into(),
        met: "".into(),
    };
    let mut out = Vec::new();
    out.push(row(
        format!(
            "large payloads: ferry peak RSS (VmHWM) while {what} are published and stored (Pulsar out of reach), MiB"
        ),
        mib(f(&["outage", "peak_rss_kb"])),
    ));
    let drain_rss = f(&["peak_rss_kb"]);
    out.push(Row {
        target: "≤ 32 MiB".into(),
        met: drain_rss
            .map(|v| met(v / 1024.0 <= 32.0))
            .unwrap_or_default(),
        ..row(
            "large payloads: ferry peak RSS (VmHWM) while draining them (restarted, pointed at the broker), MiB".into(),
            mib(drain_rss),
        )
    });
    let shed = f(&["shed"]).unwrap_or(0.0);
    let shed_note = if shed > 0.0 {
        format!(" ({} shed by the store's limits)", fmt_rate(shed))
    } else {
        String::new()
    };
    out.push(Row {
        spread: spread_cell(large),
        ..row(
            format!("large payloads: drain of {what}, updates/s (MB/s of payload){shed_note}"),
            match (f(&["rate"]), f(&["mb_per_s"])) {
                (Some(r), Some(m)) => format!("{} ({m:.1} MB/s)", fmt_rate(r)),
                _ => failed(),
            },
        )
    });
    let check = |k: &str| f(&["topic_check", k]);
    let exact = match (
        check("received"),
        check("lost"),
        check("duplicated"),
        check("out_of_order"),
        check("wrong_size"),
    ) {
        (Some(n), Some(l), Some(d), Some(o), Some(w)) => Some((n, l, d, o, w)),
        _ => None,
    };
    out.push(Row {
        bound: format!("{} (published)", fmt_rate(s.large_n as f64)),
        target: "all, once each, in order".into(),
        met: exact
            .map(|(n, l, d, o, w)| met(n == s.large_n as f64 && l + d + o + w == 0.0))
            .unwrap_or_default(),
        ..row(
            "large payloads: read back from the topic: received (lost, duplicated, out of order, wrong size)".into(),
            exact
                .map(|(n, l, d, o, w)| format!("{} ({l}, {d}, {o}, {w})", fmt_rate(n)))
                .unwrap_or_else(failed),
        )
    });
    let per = |k: &str| f(&["write_bytes_per_update", k]);
    let total = per("total");
    out.push(Row {
        bound: format!("{} (payload)", fmt_rate(s.large_payload as f64)),
        ratio: total
            .map(|v| format!("{:.2}×", v / s.large_payload as f64))
            .unwrap_or_default(),
        ..row(
            "large payloads: bytes written to disk per update, stored + drained".into(),
            match (total, per("stored"), per("drained")) {
                (Some(t), Some(a), Some(b)) => {
                    format!("{} ({} + {})", fmt_rate(t), fmt_rate(a), fmt_rate(b))
                }
                _ => failed(),
            },
        )
    });
    out
}

/// ferry-fleet's lines: the view's apply rate on SQLite and PostgreSQL
/// beside the raw consume rate of the same topic, and replay's time.
fn fleet_rows(r: &Value, s: &Settings) -> Vec<Row> {
    let failed = || "n/a".to_string();
    let raw = num(r, &["fleet", "view", "raw_consume_rate"]);
    let mut out = Vec::new();
    for (db, key) in [("SQLite", "sqlite"), ("PostgreSQL", "postgres")] {
        let rate = num(r, &["fleet", "view", key, "rate"]);
        out.push(Row {
            figure: format!(
                "ferry-fleet view on {db}: updates applied per s ({} updates over {} devices, one view)",
                fmt_rate(s.n as f64),
                s.devices
            ),
            ferry: rate.map(fmt_rate).unwrap_or_else(failed),
            bound: raw
                .map(|v| format!("{} (raw consume)", fmt_rate(v)))
                .unwrap_or_else(failed),
            ratio: match (rate, raw) {
                (Some(f), Some(c)) => format!("{:.0}%", 100.0 * f / c),
                _ => "".into(),
            },
            spread: spread_cell(json_at(r, &["fleet", "view", key])),
            target: "≥ 70% of raw consume".into(),
            met: match (rate, raw) {
                (Some(f), Some(c)) => met(f >= 0.7 * c),
                _ => "".into(),
            },
        });
    }
    out.push(Row {
        figure: format!(
            "ferry-fleet replay of {} devices into an empty SQLite view, s",
            fmt_rate(s.replay_devices as f64)
        ),
        ferry: num(r, &["fleet", "replay", "seconds"])
            .map(|v| format!("{v:.1}"))
            .unwrap_or_else(failed),
        bound: "".into(),
        ratio: "".into(),
        spread: String::new(),
        target: "".into(),
        met: "".into(),
    });
    out
}

/// The downlink's lines: versions applied per second beside ceiling B (both
/// are MQTT QoS 1 publishes to one subscriber), versions read per second
/// (for information), and the latency at the fixed rate beside a plain
/// Pulsar consumer's of the same messages.
fn downlink_rows(r: &Value, s: &Settings, b: Option<f64>) -> Vec<Row> {
    let failed = || "n/a".to_string();
    let dl = |k: &str| num(r, &["ferry", "downlink", k]);
    let b_cell = b
        .map(|v| format!("{} (B)", fmt_rate(v)))
        .unwrap_or_else(failed);
    let ratio = |f: Option<f64>| match (f, b) {
        (Some(f), Some(b)) => format!("{:.0}%", 100.0 * f / b),
        _ => "".into(),
    };
    let (applied, read) = (dl("rate"), dl("read_rate"));
    let backlog = num(r, &["ferry", "downlink_backlog", "rate"]);
    let mut out = vec![
        Row {
            figure: format!(
                "downlink: a backlog of {} desired updates (one per device) from Pulsar to retained MQTT publishes, per s, from ferry's start",
                fmt_rate(s.downlink_n as f64),
            ),
            ferry: backlog.map(fmt_rate).unwrap_or_else(failed),
            bound: b_cell.clone(),
            ratio: ratio(backlog),
            spread: spread_cell(json_at(r, &["ferry", "downlink_backlog"])),
            target: "≥ 80% of B".into(),
            met: match (backlog, b) {
                (Some(f), Some(b)) => met(f >= 0.8 * b),
                _ => "".into(),
            },
        },
        Row {
            figure: format!(
                "downlink, live (info): desired versions read from Pulsar and applied as retained MQTT publishes, per s ({} written over {} devices while ferry runs, first write to every device's last version at the subscriber)",
                fmt_rate(s.downlink_n as f64),
                fmt_rate(s.downlink_devices as f64)
            ),
            ferry: applied.map(fmt_rate).unwrap_or_else(failed),
            bound: b_cell.clone(),
            ratio: ratio(applied),
            spread: spread_cell(json_at(r, &["ferry", "downlink"])),
            target: "".into(),
            met: "".into(),
        },
        Row {
            figure: format!(
                "downlink: desired versions read from Pulsar, per s, same pass (info: {} of them superseded in the store by a newer version before their publish)",
                dl("superseded").map(fmt_rate).unwrap_or_else(failed)
            ),
            ferry: read.map(fmt_rate).unwrap_or_else(failed),
            bound: b_cell,
            ratio: ratio(read),
            spread: spread_cell(json_at(r, &["ferry", "downlink"])),
            target: "".into(),
            met: "".into(),
        },
    ];
    // What bounds the backlog line besides B: each leg of the downlink
    // alone, measured in the same run.
    let b_r = num(r, &["ceilings", "b_retained", "rate"]);
    let d = num(r, &["ferry", "downlink_backlog", "plain_read_rate"]);
    for (figure, bound, label) in [
        (
            "downlink backlog (info) against ceiling B_r: the same retained QoS 1 publishes, one topic per device, 1,000 in flight, by one MQTT client to one subscriber",
            b_r,
            "B_r",
        ),
        (
            "downlink backlog (info) against ceiling D: the same backlog (another topic) read by a plain Pulsar consumer",
            d,
            "D",
        ),
    ] {
        out.push(Row {
            figure: figure.into(),
            ferry: backlog.map(fmt_rate).unwrap_or_else(failed),
            bound: bound
                .map(|v| format!("{} ({label})", fmt_rate(v)))
                .unwrap_or_else(failed),
            ratio: match (backlog, bound) {
                (Some(f), Some(b)) => format!("{:.0}%", 100.0 * f / b),
                _ => "".into(),
            },
            spread: spread_cell(json_at(r, &["ferry", "downlink_backlog"])),
            target: "".into(),
            met: "".into(),
        });
    }
    for (q, key) in [("p50", "p50_ms"), ("p99", "p99_ms")] {
        let f = num(r, &["ferry", "downlink_latency", key]);
        let c = num(r, &["ferry", "downlink_latency", "pulsar_consumer", key]);
        out.push(Row {
            figure: format!(
                "downlink latency {q} at {}/s, fleet's write to MQTT subscriber, ms",
                s.downlink_rate
            ),
            ferry: f.map(|v| format!("{v:.1}")).unwrap_or_else(failed),
            bound: c
                .map(|v| format!("{v:.1} (plain Pulsar consumer)"))
                .unwrap_or_else(failed),
            ratio: match (f, c) {
                (Some(f), Some(c)) if c > 0.0 => format!("{:.1}×", f / c),
                _ => "".into(),
            },
            spread: String::new(),
            target: "".into(),
            met: "".into(),
        });
    }
    out
}

pub fn markdown(rows: &[Row]) -> String {
    let mut t = String::from(
        "| figure | ferry | ceiling / bound | ratio | passes: spread | reach for | |\n",
    );
    t.push_str("|---|--:|--:|--:|---|---|---|\n");
    for r in rows {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.figure, r.ferry, r.bound, r.ratio, r.spread, r.target, r.met
        ));
    }
    t
}

pub fn plain_table(rows: &[Row]) -> String {
    let head = [
        "figure",
        "ferry",
        "ceiling / bound",
        "ratio",
        "passes: spread",
        "reach for",
        "",
    ];
    let cells: Vec<[&str; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.figure.as_str(),
                r.ferry.as_str(),
                r.bound.as_str(),
                r.ratio.as_str(),
                r.spread.as_str(),
                r.target.as_str(),
                r.met.as_str(),
            ]
        })
        .collect();
    let mut width = head.map(|h| h.chars().count());
    for c in &cells {
        for (i, v) in c.iter().enumerate() {
            width[i] = width[i].max(v.chars().count());
        }
    }
    let line = |c: [&str; 7]| {
        let mut s = String::new();
        for (i, v) in c.iter().enumerate() {
            let pad = width[i] - v.chars().count();
            if i == 0 || i >= 4 {
                s.push_str(v);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str(&" ".repeat(pad));
                s.push_str(v);
            }
            s.push_str("  ");
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(head);
    for c in cells {
        out.push_str(&line(c));
    }
    out
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}

pub fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
