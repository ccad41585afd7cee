//! Pulsar's admin REST API: namespaces with deduplication on, produce
//! grants, compaction, a topic's entry count. As the super-user (admin
//! token) on the secured brokers.

use std::time::{Duration, Instant};

use super::{unique, Stack};

/// The admin REST API of one broker.
#[derive(Debug, Clone)]
pub struct Admin {
    /// `http://127.0.0.1:<web port>/admin/v2`
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// `persistent://tenant/ns/topic` without its scheme.
fn topic_path(topic: &str) -> &str {
    topic
        .strip_prefix("persistent://")
        .expect("persistent topic")
}

impl Admin {
    pub fn new(web_port: u16, token: Option<String>) -> Admin {
        Admin {
            base: format!("http://127.0.0.1:{web_port}/admin/v2"),
            token,
            http: reqwest::Client::new(),
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}/{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Creates namespace `name` (`tenant/ns`) with deduplication on; returns
    /// its name.
    pub async fn create_namespace(&self, name: &str) -> String {
        self.create_namespace_with(name, true).await
    }

    /// Creates namespace `name`, with deduplication on or (as a new user
    /// might leave it) off.
    pub async fn create_namespace_with(&self, name: &str, deduplication: bool) -> String {
        let r = self
            .request(reqwest::Method::PUT, &format!("namespaces/{name}"))
            .send()
            .await
            .expect("admin api");
        assert!(
            r.status().is_success(),
            "create namespace {name}: {}",
            r.status()
        );
        let r = self
            .request(
                reqwest::Method::POST,
                &format!("namespaces/{name}/deduplication"),
            )
            .header("Content-Type", "application/json")
            .body(deduplication.to_string())
            .send()
            .await
            .expect("admin api");
        assert!(
            r.status().is_success(),
            "set deduplication {deduplication} on {name}: {}",
            r.status()
        );
        name.to_string()
    }

    /// Creates the topic if needed and grants `role` the right to produce on
    /// it, and nothing else.
    pub async fn grant_produce(&self, topic: &str, role: &str) {
        self.grant(topic, role, "produce").await;
    }

    /// Creates the topic if needed and grants `role` the right to consume
    /// it (any subscription), and nothing else.
    pub async fn grant_consume(&self, topic: &str, role: &str) {
        self.grant(topic, role, "consume").await;
    }

    async fn grant(&self, topic: &str, role: &str, action: &str) {
        let path = format!("persistent/{}", topic_path(topic));
        let r = self
            .request(reqwest::Method::PUT, &path)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success() || r.status() == reqwest::StatusCode::CONFLICT,
            "create {topic}: {}",
            r.status()
        );
        let r = self
            .request(reqwest::Method::POST, &format!("{path}/permissions/{role}"))
            .header("Content-Type", "application/json")
            .body(format!(r#"["{action}"]"#))
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "grant {action} on {topic} to {role}: {}",
            r.status()
        );
    }

    /// Triggers compaction of a topic and waits until it has finished.
    pub async fn compact(&self, topic: &str) {
        let path = format!("persistent/{}/compaction", topic_path(topic));
        let r = self
            .request(reqwest::Method::PUT, &path)
            .send()
            .await
            .expect("admin api");
        assert!(
            r.status().is_success(),
            "trigger compaction: {}",
            r.status()
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let body: serde_json::Value = self
                .request(reqwest::Method::GET, &path)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            match body["status"].as_str() {
                Some("SUCCESS") => return,
                Some("ERROR") => panic!("compaction failed: {body}"),
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "compaction did not finish: {body}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// How many entries the topic's ledgers hold (internal stats), if the
    /// broker says. Ferry sends unbatched, so that is the message count.
    pub async fn try_entries_in_topic(&self, topic: &str) -> Result<u64, String> {
        let path = format!("persistent/{}/internalStats", topic_path(topic));
        let body: serde_json::Value = self
            .request(reqwest::Method::GET, &path)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        body["numberOfEntries"]
            .as_u64()
            .ok_or_else(|| format!("internal stats: {body}"))
    }

    /// [`Admin::try_entries_in_topic`], or a failure.
    pub async fn entries_in_topic(&self, topic: &str) -> u64 {
        self.try_entries_in_topic(topic)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Deletes a topic, its subscriptions and producers too (best effort;
    /// the benchmark cleans up with it).
    #[allow(dead_code)]
    pub async fn delete_topic(&self, topic: &str) {
        if let Some(path) = topic.strip_prefix("persistent://") {
            let _ = self
                .request(
                    reqwest::Method::DELETE,
                    &format!("persistent/{path}?force=true"),
                )
                .send()
                .await;
        }
    }
}

/// A Pulsar namespace of one test, with deduplication on.
pub struct Namespace {
    pub name: String,
    admin: Admin,
}

impl Namespace {
    pub async fn create(stack: &Stack, test: &str) -> Namespace {
        let admin = stack.admin_api();
        let name = admin
            .create_namespace(&format!("public/{}", unique(test)))
            .await;
        Namespace { name, admin }
    }

    /// A namespace with deduplication off (exactly once is not kept).
    pub async fn without_deduplication(stack: &Stack, test: &str) -> Namespace {
        let admin = stack.admin_api();
        let name = admin
            .create_namespace_with(&format!("public/{}", unique(test)), false)
            .await;
        Namespace { name, admin }
    }

    pub fn topic(&self, local: &str) -> String {
        format!("persistent://{}/{local}", self.name)
    }

    /// Triggers compaction of a topic through the admin REST API and waits
    /// until it has finished.
    pub async fn compact(&self, local: &str) {
        self.admin.compact(&self.topic(local)).await;
    }
}
