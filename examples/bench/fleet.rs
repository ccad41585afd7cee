//! ferry-fleet's lines: the `view`'s apply rate on SQLite and on
//! PostgreSQL against the raw consume rate of the same topic, and the time
//! `replay` takes to rebuild a view of 100,000 devices.
//!
//! The status topic is filled first by the bare producer with ferry's key
//! and properties (`ferry.gateway` = `bench`, the topic `bench-status` of
//! that gateway). The raw rate is the `pulsar` crate's consumer (the view's
//! own client) reading and acknowledging every message from the start,
//! with nothing else to do. Each view is a real `ferry-fleet view` process
//! with a subscription of its own, timed from its first consumed message to
//! its last (its `/metrics`), so start-up is not counted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use crate::bare::{raw_pump, RawProducer};
use crate::harness::{
    ferry_bin, free_port, reader_from_start, scrape_port, unique, Namespace, Stack,
};
use crate::{Ctx, Settings};

/// The `ferry-fleet` binary beside `ferry`.
fn fleet_bin() -> PathBuf {
    ferry_bin().with_file_name("ferry-fleet")
}

/// A fleet.toml for gateway `bench` of namespace `ns`, its view in
/// `database` under `subscription`, serving on `port`.
fn fleet_config(
    dir: &Path,
    stack: &Stack,
    ns: &Namespace,
    database: &str,
    subscription: &str,
    port: u16,
) -> PathBuf {
    let (tenant, name) = ns.name.split_once('/').unwrap();
    let text = format!(
        "[pulsar]\nservice_url = \"{}\"\nadmin_url = \"http://127.0.0.1:{}\"\n\n\
         [namespace]\ntenant = \"{tenant}\"\nname = \"{name}\"\n\n\
         [view]\ndatabase = \"{database}\"\nsubscription = \"{subscription}\"\n\
         listen = \"127.0.0.1:{port}\"\n\n[[gateways]]\nid = \"bench\"\n",
        stack.service_url(),
        stack.web_port,
    );
    let path = dir.join(format!("{subscription}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Fills `topic` with updates `0..n` over `devices` devices.
async fn fill(ctx: &Ctx, topic: &str, n: u64, devices: usize) -> Result<(), String> {
    let s = Settings {
        devices,
        ..ctx.s.clone()
    };
    let mut p = RawProducer::connect(ctx.stack, topic).await?;
    raw_pump(&mut p, &s, 0, n).await
}

/// Reads and acknowledges `n` messages of `topic` from its start: updates
/// per second from the first message to the last.
async fn raw_consume(ctx: &Ctx, topic: &str, n: u64) -> Result<f64, String> {
    let mut consumer = reader_from_start(&ctx.pulsar, topic, "bench-raw", false)
        .await
        .map_err(|e| format!("consumer: {e}"))?;
    let mut first: Option<Instant> = None;
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(30), consumer.next()).await {
            Ok(Some(Ok(msg))) => {
                first.get_or_insert_with(Instant::now);
                consumer.ack(&msg).await.map_err(|e| format!("ack: {e}"))?;
                got += 1;
            }
            other => return Err(format!("raw consume stopped at {got}: {other:?}")),
        }
    }
    let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    Ok((n - 1) as f64 / secs.max(1e-9))
}

/// What a view consumed so far, from its `/metrics`.
async fn consumed(port: u16) -> Option<f64> {
    let m = scrape_port(port).await?;
    m.get("ferry_fleet_view_consumed_total").copied()
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a view on `database` until it consumed `n`: updates per second from
/// its first consumed message to its `n`th.
async fn view_rate(
    ctx: &Ctx,
    dir: &Path,
    ns: &Namespace,
    database: &str,
    n: u64,
) -> Result<Value, String> {
    let port = free_port();
    let sub = unique("bench-view");
    let config = fleet_config(dir, ctx.stack, ns, database, &sub, port);
    let log = std::fs::File::create(dir.join(format!("{sub}.log"))).unwrap();
    let child = Command::new(fleet_bin())
        .args(["view", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{}: {e}", fleet_bin().display()))?;
    let _view = Process(child);
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first: Option<(Instant, f64)> = None;
    loop {
        let c = consumed(port).await.unwrap_or(0.0);
        if c > 0.0 && first.is_none() {
            first = Some((Instant::now(), c));
        }
        if c >= n as f64 {
            let (t0, c0) = first.expect("set above");
            let secs = t0.elapsed().as_secs_f64();
            return Ok(json!({
                "rate": (c - c0) / secs.max(1e-9),
                "updates": n,
                "seconds": secs,
            }));
        }
        if Instant::now() > deadline {
            return Err(format!("view consumed {c} of {n}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The view's lines: raw consume, view on SQLite, view on PostgreSQL.
pub async fn fleet_view(ctx: &mut Ctx) -> Result<Value, String> {
    let n = ctx.s.n;
    let ns = Namespace::create(ctx.stack, "bench-view").await;
    let topic = ns.topic("bench-status");
    let dir = ctx.out_dir.join("fleet");
    std::fs::create_dir_all(&dir).unwrap();
    fill(ctx, &topic, n, ctx.s.devices).await?;
    let raw = raw_consume(ctx, &topic, n).await?;
    let sqlite = view_rate(
        ctx,
        &dir,
        &ns,
        &format!(
            "sqlite:{}",
            dir.join(format!("{}.db", unique("view"))).display()
        ),
        n,
    )
    .await?;
    let postgres = view_rate(
        ctx,
        &dir,
        &ns,
        &ctx.stack.new_postgres_database("bench_view")?,
        n,
    )
    .await?;
    Ok(json!({
        "updates": n,
        "devices": ctx.s.devices,
        "raw_consume_rate": raw,
        "sqlite": sqlite,
        "postgres": postgres,
    }))
}

/// `ferry-fleet replay` of `devices` devices (one update each) into an
/// empty SQLite view: the process's time, start to exit.
pub async fn fleet_replay(ctx: &mut Ctx, devices: u64) -> Result<Value, String> {
    let ns = Namespace::create(ctx.stack, "bench-replay").await;
    let topic = ns.topic("bench-status");
    let dir = ctx.out_dir.join("fleet");
    std::fs::create_dir_all(&dir).unwrap();
    fill(ctx, &topic, devices, devices as usize).await?;
    let db = dir.join(format!("{}.db", unique("replay")));
    let config = fleet_config(
        &dir,
        ctx.stack,
        &ns,
        &format!("sqlite:{}", db.display()),
        &unique("bench-replay"),
        free_port(),
    );
    let started = Instant::now();
    let out = Command::new(fleet_bin())
        .args(["replay", "--config"])
        .arg(&config)
        .output()
        .map_err(|e| format!("{}: {e}", fleet_bin().display()))?;
    let secs = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !text.contains(&format!("applied {devices},")) {
        return Err(format!(
            "replay: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(json!({ "devices": devices, "seconds": secs, "said": text.trim() }))
}
