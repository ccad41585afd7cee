//! The results table: each ferry figure beside what bounds it, as Markdown
//! (`results.md`) and as plain text (the terminal).

use serde_json::Value;

use crate::Settings;

/// One line of the table: a ferry figure beside what bounds it.
pub struct Row {
    figure: String,
    ferry: String,
    bound: String,
    ratio: String,
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
    let sqlite_cycle = format!(
        "SQLite insert, then delete, {} per commit (info: ferry's store does both)",
        s.batch
    );
    for (label, name, v) in [
        ("A1", crate_name.as_str(), a_crate),
        ("A2", bare_name.as_str(), a_bare),
        ("B", "MQTT QoS 1 through Mosquitto to one subscriber", b),
        ("C", sqlite.as_str(), c),
        ("C'", sqlite_cycle.as_str(), cycle),
    ] {
        out.push(Row {
            figure: format!("ceiling {label}: {name}, updates/s"),
            ferry: "".into(),
            bound: v.map(fmt_rate).unwrap_or_else(failed),
            ratio: "".into(),
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
        target: "≥ 80% of lowest ceiling".into(),
        met: match (e2e, lowest) {
            (Some(f), Some((_, l))) => met(f >= 0.8 * l),
            _ => "".into(),
        },
    });
    let pipeline = num(r, &["extra", "p_pipeline_without_store", "rate"]);
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
        target: "≥ 90% of A".into(),
        met: match (drain, a) {
            (Some(f), Some(a)) => met(f >= 0.9 * a),
            _ => "".into(),
        },
    });
    for (q, key) in [("p50", "p50_ms"), ("p99", "p99_ms")] {
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
            target: "".into(),
            met: "".into(),
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
        target: "≤ 10 µs per update".into(),
        met: cpu.map(|v| met(v <= 10.0)).unwrap_or_default(),
    });
    let w = num(r, &["ferry", "resources", "write_bytes_per_update"]);
    out.push(Row {
        figure: "ferry bytes written to disk per update".into(),
        ferry: w.map(|v| format!("{v:.0}")).unwrap_or_else(failed),
        bound: format!("{} (payload)", s.payload),
        ratio: w
            .map(|v| format!("{:.1}×", v / s.payload as f64))
            .unwrap_or_default(),
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
        target: "≤ 5× payload".into(),
        met: life
            .map(|v| met(v <= 5.0 * s.payload as f64))
            .unwrap_or_default(),
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
            target: "".into(),
            met: "".into(),
        });
    }
    out
}

pub fn markdown(rows: &[Row]) -> String {
    let mut t = String::from("| figure | ferry | ceiling / bound | ratio | reach for | |\n");
    t.push_str("|---|--:|--:|--:|---|---|\n");
    for r in rows {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.figure, r.ferry, r.bound, r.ratio, r.target, r.met
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
        "reach for",
        "",
    ];
    let cells: Vec<[&str; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.figure.as_str(),
                r.ferry.as_str(),
                r.bound.as_str(),
                r.ratio.as_str(),
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
    let line = |c: [&str; 6]| {
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
