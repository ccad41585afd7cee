//! The secured uplink against a real broker with TLS, token authentication
//! and authorization: exactly once over TLS, tokens rotated without dropping
//! the connection, refusals told apart, nothing lost while refused.

use std::time::{Duration, Instant};

use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_updates_over_tls_with_a_token_arrive_exactly_once() {
    let (stack, _shared) = Stack::shared().await;
    let secure = tokio::task::block_in_place(Secure::get);
    let ns = secure.namespace("tls").await;
    let Granted {
        topic,
        role,
        prefix,
        mut ferry,
    } = secure
        .granted_ferry(stack, &ns, "device-status", "tls", false)
        .await;
    ferry.start_ready().await;

    let mut devices = Devices::connect(stack, &prefix, 100).await;
    devices.publish_rounds(0, 100).await;
    ferry.wait_drained(10_000, SECS(180)).await;
    let msgs = read_secure_topic(secure, &topic, 10_000, SECS(30)).await;
    let t = tally(&msgs, &devices.ids, 100);
    report("tls", &format!("over TLS as role {role}: {t:?}"));
    assert_eq!(t, exact(10_000));
    let log = ferry.log_text();
    assert!(!log.contains("eyJ"), "a token never appears in the log");
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_rotated_on_disk_never_drop_the_connection() {
    let (stack, _shared) = Stack::shared().await;
    let secure = tokio::task::block_in_place(Secure::get);
    let ns = secure.namespace("rotate").await;
    let Granted {
        topic,
        role,
        prefix,
        mut ferry,
    } = secure
        .granted_ferry(stack, &ns, "device-status", "rotate", false)
        .await;
    // Tokens live 12 s; a new one lands on disk every 4 s.
    let token = ferry.token_path();
    write_secret(&token, &secure.token(&role, Some(12)));
    ferry.start_ready().await;

    let mut devices = Devices::connect(stack, &prefix, 20).await;
    let started = Instant::now();
    let mut rotations = 0;
    let mut next_rotation = Instant::now() + SECS(4);
    for round in 0..40u64 {
        devices.publish_rounds(round * 5, round * 5 + 5).await;
        tokio::time::sleep(Duration::from_millis(900)).await;
        if Instant::now() >= next_rotation {
            write_secret(&token, &secure.token(&role, Some(12)));
            rotations += 1;
            next_rotation = Instant::now() + SECS(4);
        }
    }
    ferry.wait_drained(4000, SECS(60)).await;
    let challenges = ferry.log_count("auth challenge answered");
    let reconnects = ferry.log_count("uplink disconnected") + ferry.log_count("uplink blocked");
    let sessions = ferry.log_count("producer ready");
    report(
        "rotate",
        &format!(
            "{:.0} s stream, {rotations} token rotations, {challenges} auth challenges answered, {reconnects} reconnects, {sessions} producer session(s)",
            started.elapsed().as_secs_f64()
        ),
    );
    let msgs = read_secure_topic(secure, &topic, 4000, SECS(30)).await;
    let t = tally(&msgs, &devices.ids, 200);
    report("rotate", &format!("{t:?}"));
    assert_eq!(t, exact(4000));
    assert!(
        challenges >= 2,
        "the broker challenged expiring tokens: {challenges}"
    );
    assert_eq!(reconnects, 0, "expiry never dropped the connection");
    assert_eq!(sessions, 1);
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_a_cannot_write_gateway_b_topic_and_its_own_data_keeps_flowing() {
    let (stack, _shared) = Stack::shared().await;
    let secure = tokio::task::block_in_place(Secure::get);
    let ns = secure.namespace("authz").await;
    // A's own ferry, and a second one with A's token aimed at B's topic.
    let Granted {
        topic: topic_a,
        role: role_a,
        prefix: prefix_a,
        ferry: mut good,
    } = secure
        .granted_ferry(stack, &ns, "status-a", "authz-good", false)
        .await;
    let topic_b = format!("persistent://{ns}/status-b");
    let role_b = unique("gw-b");
    secure.grant_produce(&topic_b, &role_b).await;
    let prefix_b = unique("authz-b");
    let mut bad = secure.ferry_as(stack, "authz-bad", &role_a, &prefix_b, &topic_b, false);
    good.start();
    bad.start();
    good.wait_log("producer ready", SECS(30)).await;
    good.wait_log("mqtt subscribed", SECS(30)).await;
    bad.wait_log("mqtt subscribed", SECS(30)).await;
    let refusal = format!("not authorized to produce on {topic_b} as role {role_a}");
    bad.wait_log(&refusal, SECS(30)).await;

    let mut devices_a = Devices::connect(stack, &prefix_a, 10).await;
    let mut devices_b = Devices::connect(stack, &prefix_b, 10).await;
    devices_a.publish_rounds(0, 50).await;
    devices_b.publish_rounds(0, 50).await;
    good.wait_drained(500, SECS(60)).await;
    bad.wait_stored(500, SECS(60)).await;
    let attempts_before = bad.log_count("uplink blocked");
    tokio::time::sleep(SECS(6)).await;
    let attempts = bad.log_count("uplink blocked") - attempts_before;
    assert!(bad.is_running(), "a refusal does not end ferry");
    assert_eq!(bad.pending(), 500, "nothing refused is lost");
    let (code, out) = bad.check_online();
    report(
        "authz",
        &format!(
            "refused ferry: {attempts} attempts in 6 s; check --online exit {code:?}: {}",
            out.trim()
        ),
    );
    assert_eq!(code, Some(3));
    assert!(out.contains(&refusal), "{out}");
    assert!(
        attempts <= 4,
        "no busy loop: {attempts} attempts in 6 s with backoff_max 2 s"
    );

    let msgs = read_secure_topic(secure, &topic_a, 500, SECS(30)).await;
    let t = tally(&msgs, &devices_a.ids, 50);
    report("authz", &format!("gateway A's own topic: {t:?}"));
    assert_eq!(t, exact(500));

    // The operator grants the permission: the held records go out.
    secure.grant_produce(&topic_b, &role_a).await;
    bad.wait_drained(500, SECS(60)).await;
    let msgs = read_secure_topic(secure, &topic_b, 500, SECS(30)).await;
    assert_eq!(tally(&msgs, &devices_b.ids, 50), exact(500));
    devices_a.disconnect().await;
    devices_b.disconnect().await;
    assert_eq!(good.terminate(), Some(0));
    assert_eq!(bad.terminate(), Some(0));
}

/// Starts `ferry` broken, checks the message and that `check --online` says
/// the same, publishes 100 updates that must wait, then applies `fix`.
async fn broken_then_fixed(
    stack: &Stack,
    secure: &Secure,
    ferry: &mut Ferry,
    prefix: &str,
    topic: &str,
    expect: &str,
    fix: impl FnOnce(&mut Ferry),
) -> String {
    ferry.start_subscribed().await;
    ferry.wait_log(expect, SECS(30)).await;
    let line = ferry
        .log_text()
        .lines()
        .find(|l| l.contains(expect))
        .unwrap_or_default()
        .to_string();
    let (code, out) = ferry.check_online();
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains(expect), "check --online says why: {out}");
    let mut devices = Devices::connect(stack, prefix, 10).await;
    devices.publish_rounds(0, 10).await;
    ferry.wait_stored(100, SECS(30)).await;
    assert_eq!(ferry.pending(), 100, "held, not lost");
    fix(ferry);
    ferry.wait_drained(100, SECS(60)).await;
    let msgs = read_secure_topic(secure, topic, 100, SECS(30)).await;
    assert_eq!(tally(&msgs, &devices.ids, 10), exact(100));
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_hostname_mismatch_and_expired_token_each_say_why_and_recover() {
    let (stack, _shared) = Stack::shared().await;
    let secure = tokio::task::block_in_place(Secure::get);
    let ns = secure.namespace("tlsfail").await;

    // Wrong CA: the CA file is re-read at every connection, so fixing the
    // file is enough.
    let Granted {
        topic,
        role: _,
        prefix,
        mut ferry,
    } = secure
        .granted_ferry(stack, &ns, "wrong-ca", "wrong-ca", false)
        .await;
    let ca = ferry.ca_path();
    std::fs::copy(secure.pki.join("other-ca.pem"), &ca).unwrap();
    let real_ca = secure.pki.join("ca.pem");
    let line = broken_then_fixed(
        stack,
        secure,
        &mut ferry,
        &prefix,
        &topic,
        "not signed by a trusted CA",
        |_| {
            std::fs::copy(&real_ca, &ca).unwrap();
        },
    )
    .await;
    report("tlsfail", &format!("wrong CA: {line}"));
    let tls = ferry.audit_events_of("tls-failure");
    assert_eq!(
        tls.len(),
        1,
        "one audit event, however often it retried: {tls:?}"
    );
    assert!(
        tls[0]["reason"]
            .as_str()
            .unwrap()
            .contains("not signed by a trusted CA"),
        "{tls:?}"
    );

    // Hostname mismatch: the certificate names localhost only.
    let Granted {
        topic,
        role: _,
        prefix,
        mut ferry,
    } = secure
        .granted_ferry(stack, &ns, "hostname", "hostname", false)
        .await;
    let by_ip = format!("pulsar+ssl://127.0.0.1:{}", secure.tls_port);
    ferry.point_pulsar_at(&by_ip);
    let fixed_url = secure.service_url();
    let line = broken_then_fixed(
        stack,
        secure,
        &mut ferry,
        &prefix,
        &topic,
        "hostname mismatch",
        |f| {
            f.terminate();
            f.point_pulsar_at(&fixed_url);
            f.start();
        },
    )
    .await;
    report("tlsfail", &format!("hostname mismatch: {line}"));
    let tls = ferry.audit_events_of("tls-failure");
    assert_eq!(tls.len(), 1, "{tls:?}");
    assert!(
        tls[0]["reason"]
            .as_str()
            .unwrap()
            .contains("hostname mismatch"),
        "{tls:?}"
    );

    // Expired token: the token file is re-read at every connection.
    let Granted {
        topic,
        role,
        prefix,
        mut ferry,
    } = secure
        .granted_ferry(stack, &ns, "expired", "expired", false)
        .await;
    let token = ferry.token_path();
    write_secret(&token, &secure.token(&role, Some(-60)));
    let fresh = secure.token(&role, None);
    let line = broken_then_fixed(
        stack,
        secure,
        &mut ferry,
        &prefix,
        &topic,
        "broker rejected the token",
        |_| {
            write_secret(&token, &fresh);
        },
    )
    .await;
    report("tlsfail", &format!("expired token: {line}"));
    assert!(line.contains(&role), "the message names the role: {line}");
    assert!(
        line.contains("the token expired"),
        "the message says the token expired: {line}"
    );
    let refused = ferry.audit_events_of("auth-refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["role"], role.as_str());
    // The expired token was read, then the fresh one: a rotation.
    assert_eq!(ferry.audit_events_of("token-read").len(), 1);
    assert_eq!(ferry.audit_events_of("token-rotated").len(), 1);
}

/// Every token ferry reads is in the audit trail by its fingerprint, never
/// by its value: 3 rotations during a stream give 3 rotation events with 3
/// new fingerprints, and no token is written anywhere in ferry's folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_rotations_are_audited_by_fingerprint_and_no_token_is_written_anywhere() {
    let (stack, _shared) = Stack::shared().await;
    let secure = tokio::task::block_in_place(Secure::get);
    let ns = secure.namespace("auditrot").await;
    let Granted {
        topic,
        role,
        prefix,
        mut ferry,
    } = secure
        .granted_ferry(stack, &ns, "device-status", "auditrot", false)
        .await;
    let path = ferry.token_path();
    // Tokens live 10 s; each new one is written 3 s before the one in use
    // expires, and the broker (checking every 5 s) then challenges ferry,
    // which reads the file again: a rotation without a refusal.
    let ttl = 10;
    let mut tokens = vec![secure.token(&role, Some(ttl))];
    let mut expires = std::time::Instant::now() + SECS(ttl as u64);
    write_secret(&path, &tokens[0]);
    ferry.start_ready().await;
    let mut devices = Devices::connect(stack, &prefix, 10).await;
    let mut round = 0;
    for rotation in 1..=3usize {
        while std::time::Instant::now() + SECS(3) < expires {
            devices.publish_rounds(round, round + 1).await;
            round += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let t = secure.token(&role, Some(ttl));
        expires = std::time::Instant::now() + SECS(ttl as u64);
        write_secret(&path, &t);
        tokens.push(t);
        let deadline = std::time::Instant::now() + SECS(30);
        while ferry.audit_events_of("token-rotated").len() < rotation {
            assert!(
                std::time::Instant::now() < deadline,
                "rotation {rotation} not audited; log:\n{}",
                ferry.log_text()
            );
            devices.publish_rounds(round, round + 1).await;
            round += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    ferry.wait_drained(round as i64 * 10, SECS(60)).await;
    assert_eq!(ferry.terminate(), Some(0));

    let read = ferry.audit_events_of("token-read");
    let rotated = ferry.audit_events_of("token-rotated");
    let fps = |es: &[serde_json::Value]| -> Vec<String> {
        es.iter()
            .map(|e| e["fingerprint"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    report(
        "auditrot",
        &format!(
            "{round} rounds; token read {:?}, rotated {:?}",
            fps(&read),
            fps(&rotated)
        ),
    );
    assert_eq!(read.len(), 1);
    assert_eq!(rotated.len(), 3);
    assert_eq!(ferry.audit_events_of("auth-refused").len(), 0);
    let fingerprints: Vec<&str> = read
        .iter()
        .chain(&rotated)
        .map(|e| e["fingerprint"].as_str().unwrap())
        .collect();
    let distinct: std::collections::BTreeSet<_> = fingerprints.iter().collect();
    assert_eq!(distinct.len(), 4, "{fingerprints:?}");
    for (i, e) in rotated.iter().enumerate() {
        assert_eq!(e["previous_fingerprint"], fingerprints[i]);
        assert_eq!(e["subject"], role.as_str());
        assert!(e["expires_at"].as_str().is_some(), "{e}");
    }
    // No token (nor its signature) in any file ferry wrote.
    let mut files = vec![ferry.dir.clone()];
    let mut checked = 0;
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if p == path {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for t in &tokens {
            let signature = t.rsplit('.').next().unwrap();
            assert!(!text.contains(signature), "a token in {}", p.display());
        }
        checked += 1;
    }
    assert!(
        checked >= 4,
        "store, log, config and audit files checked: {checked}"
    );
    let msgs = read_secure_topic(secure, &topic, round as usize * 10, SECS(30)).await;
    assert_eq!(
        tally(&msgs, &devices.ids, round),
        exact(round as usize * 10)
    );
    devices.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_requiring_client_certificates_accepts_ferry_with_one_and_refuses_it_without() {
    let (stack, _shared) = Stack::shared().await;
    let mtls = tokio::task::block_in_place(Secure::mtls);
    let ns = mtls.namespace("mtls").await;

    let Granted {
        topic: _,
        role: _,
        prefix: _,
        ferry: mut without,
    } = mtls
        .granted_ferry(stack, &ns, "without", "mtls-without", false)
        .await;
    without.start();
    without.wait_log("uplink blocked", SECS(30)).await;
    let line = without
        .log_text()
        .lines()
        .find(|l| l.contains("uplink blocked"))
        .unwrap_or_default()
        .to_string();
    report("mtls", &format!("without a client certificate: {line}"));
    assert!(line.contains("client certificate"), "{line}");
    assert_eq!(without.check_online().0, Some(3));
    assert_eq!(without.terminate(), Some(0));

    let Granted {
        topic,
        role: _,
        prefix,
        ferry: mut with,
    } = mtls
        .granted_ferry(stack, &ns, "with", "mtls-with", true)
        .await;
    with.start_ready().await;
    let (code, out) = with.check_online();
    assert_eq!(code, Some(0), "{out}");
    let mut devices = Devices::connect(stack, &prefix, 10).await;
    devices.publish_rounds(0, 100).await;
    with.wait_drained(1000, SECS(60)).await;
    let entries = mtls.entries_in_topic(&topic).await;
    let delivered = with.counters().get("delivered").copied();
    report("mtls", &format!("with a client certificate: {entries} messages in the topic, store delivered {delivered:?}"));
    assert_eq!(entries, 1000);
    assert_eq!(delivered, Some(1000));
    devices.disconnect().await;
    assert_eq!(with.terminate(), Some(0));
}
