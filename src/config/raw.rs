//! The file as written: TOML text into [`RawConfig`], a serde mirror with
//! every field optional and unknown keys refused. Only syntax and types are
//! checked here; what the values mean is [`super::validate`]'s concern.
//!
//! Messages never quote the file: a value typed into the wrong key (or a
//! line the parser could not read) may be a secret.

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub gateway_id: Option<String>,
    pub log_level: Option<String>,
    pub mqtt: Option<RawMqtt>,
    pub pulsar: Option<RawPulsar>,
    pub streams: Option<Vec<RawStream>>,
    pub store: Option<RawStore>,
    pub uplink: Option<RawUplink>,
    pub metrics: Option<RawMetrics>,
    pub downlink: Option<RawDownlink>,
    pub audit: Option<RawAudit>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub dir: Option<String>,
    pub max_file_bytes: Option<i64>,
    pub keep_files: Option<i64>,
    pub journald: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDownlink {
    pub topic: Option<String>,
    pub mqtt_topic: Option<String>,
    pub ack_topic: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStream {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub topic: Option<String>,
    pub history_topic: Option<String>,
    pub overflow: Option<String>,
    pub max_records: Option<i64>,
    pub max_bytes: Option<i64>,
    pub max_age_secs: Option<i64>,
    pub subscriptions: Option<Vec<RawSubscription>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub enabled: Option<bool>,
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    pub host: Option<String>,
    pub port: Option<i64>,
    pub client_id: Option<String>,
    pub keep_alive_secs: Option<i64>,
    pub subscriptions: Option<Vec<RawSubscription>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubscription {
    pub filter: Option<String>,
    pub device_id_level: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPulsar {
    pub service_url: Option<String>,
    pub topic: Option<String>,
    pub tls: Option<RawTls>,
    pub auth: Option<RawAuth>,
    pub clusters: Option<Vec<RawCluster>>,
}

/// One of `[[pulsar.clusters]]`: a cluster ferry writes every record to.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub name: Option<String>,
    pub service_url: Option<String>,
    pub tls: Option<RawTls>,
    pub auth: Option<RawAuth>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca_file: Option<String>,
    pub use_system_roots: Option<bool>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub token_file: Option<String>,
    pub token_credential: Option<String>,
    pub token_env: Option<String>,
    /// Refused with a clear message: a token must not sit in the config.
    pub token: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub path: Option<String>,
    pub max_payload_bytes: Option<i64>,
    pub commit_max_wait_ms: Option<i64>,
    pub commit_max_batch: Option<i64>,
    pub max_bytes: Option<i64>,
    pub durability: Option<String>,
    pub sync_interval_ms: Option<i64>,
    pub dead_letters_max: Option<i64>,
    pub dead_letters_max_bytes: Option<i64>,
    pub dead_letters_max_age_secs: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUplink {
    pub max_in_flight: Option<i64>,
    pub max_in_flight_bytes: Option<i64>,
    pub connect_timeout_ms: Option<i64>,
    pub operation_timeout_ms: Option<i64>,
    pub backoff_min_ms: Option<i64>,
    pub backoff_max_ms: Option<i64>,
    pub drain_timeout_ms: Option<i64>,
}

impl RawConfig {
    /// Parses TOML text. A syntax error is one problem for the whole file;
    /// type errors and unknown keys are listed section by section.
    pub(super) fn from_text(text: &str) -> Result<RawConfig, Vec<ConfigError>> {
        RawConfig::from_table(toml_table(text)?)
    }

    /// Deserializes section by section so that a type error in one section
    /// does not hide the problems of the others.
    fn from_table(mut table: toml::Table) -> Result<RawConfig, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let (t, e) = (&mut table, &mut errors);
        let raw = RawConfig {
            gateway_id: take_section(t, "gateway_id", e),
            log_level: take_section(t, "log_level", e),
            mqtt: take_section(t, "mqtt", e),
            pulsar: take_section(t, "pulsar", e),
            streams: take_section(t, "streams", e),
            store: take_section(t, "store", e),
            uplink: take_section(t, "uplink", e),
            metrics: take_section(t, "metrics", e),
            downlink: take_section(t, "downlink", e),
            audit: take_section(t, "audit", e),
        };
        unknown_keys(&table, &mut errors);
        if errors.is_empty() {
            Ok(raw)
        } else {
            Err(errors)
        }
    }
}

/// TOML text as a table. A syntax error is one problem for the whole file;
/// the parser's own rendering quotes the offending line, which may hold a
/// secret, so only where, and what the parser says. (`ferry-fleet` reads
/// its file with the same rules.)
pub fn toml_table(text: &str) -> Result<toml::Table, Vec<ConfigError>> {
    toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map(|s| {
                let (line, column) = line_column(text, s.start);
                format!(" at line {line}, column {column}")
            })
            .unwrap_or_default();
        vec![ConfigError {
            path: String::new(),
            message: format!("not valid TOML{at}: {}", scrub(e.message())),
        }]
    })
}

/// Takes section `key` out of `table` and deserializes it; a type error or
/// an unknown key in it is one problem (with the section's key path), so
/// that one section's mistake does not hide the others'.
pub fn take_section<T: serde::de::DeserializeOwned>(
    table: &mut toml::Table,
    key: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    let value = table.remove(key)?;
    match value.try_into::<T>() {
        Ok(v) => Some(v),
        Err(e) => {
            errors.push(ConfigError {
                path: key.to_string(),
                message: scrub(e.message()),
            });
            None
        }
    }
}

/// Every key left in `table` (after the known sections were taken) is a
/// problem.
pub fn unknown_keys(table: &toml::Table, errors: &mut Vec<ConfigError>) {
    for key in table.keys() {
        errors.push(ConfigError {
            path: key.clone(),
            message: "unknown key".into(),
        });
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// A parser or serde message on one line, without the quoted values some of
/// them carry (`invalid type: string "...", expected ...`): a value may be
/// a secret typed into the wrong key.
fn scrub(s: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match (c, quoted) {
            ('"', false) => {
                quoted = true;
                if out.ends_with(' ') {
                    out.pop();
                }
            }
            ('"', true) => quoted = false,
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    one_line(&out)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::BASE;
    use super::super::parse;

    #[test]
    fn type_errors_in_several_sections_are_all_reported() {
        let text = r#"
gateway_id = 5
[mqtt]
port = "x"
[store]
path = "/tmp/f.db"
bogus = 1
"#;
        let errs = parse(text).unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["gateway_id", "mqtt", "store"]);
        assert!(errs[2].message.contains("bogus"), "{}", errs[2].message);
    }

    #[test]
    fn a_toml_syntax_error_gives_line_and_column_but_never_the_text_of_the_line() {
        let text =
            format!("{BASE}[pulsar.auth]\ntoken_file = \"/etc/ferry/eyJhbGciOiJIUzI1NiJ9.secret\n");
        let errs = parse(&text).unwrap_err();
        assert_eq!(errs.len(), 1);
        let msg = errs[0].to_string();
        assert!(!msg.contains("eyJ"), "the line is echoed: {msg}");
        assert!(!msg.contains("secret"), "the line is echoed: {msg}");
        assert!(msg.contains("line 12, column 53"), "{msg}");
        assert!(msg.starts_with("not valid TOML"), "{msg}");
        // A value in the wrong type's place is not echoed either.
        let typed = BASE.replace(
            "gateway_id = \"gw-1\"",
            "gateway_id = \"gw-1\"\n[mqtt]\nport = \"eyJsecret\"",
        );
        let errs = parse(&typed).unwrap_err();
        assert_eq!(errs[0].path, "mqtt");
        assert!(!errs[0].message.contains("eyJ"), "{}", errs[0].message);
    }
}
