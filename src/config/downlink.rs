//! `[downlink]`: desired state from the fleet down to the devices. The
//! gateway reads its compacted desired topic and publishes each device's
//! desired document, retained, on the device's MQTT topic; every version
//! applied is acknowledged on an events topic, through a stream of its own
//! that ferry adds to the configured ones.

use super::raw::RawDownlink;
use super::streams::check_topic;
use super::validate::Validator;
use super::{Limits, Overflow, StreamConfig, StreamKind};
use crate::layout::matches_filter;

/// The name of the stream that carries the downlink's acknowledgements.
pub const ACK_STREAM: &str = "desired-acks";

/// Where a device finds its desired state unless configured otherwise.
pub const DEFAULT_DESIRED_MQTT_TOPIC: &str = "devices/{device}/desired";

/// The placeholder for the device id in `downlink.mqtt_topic`.
const DEVICE: &str = "{device}";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownlinkConfig {
    /// The gateway's compacted desired topic: key = device id, property
    /// `version` rising per device.
    pub topic: String,
    /// The MQTT topic of a device's desired state; `{device}` is one whole
    /// level.
    pub mqtt_topic: String,
    /// The events topic of the acknowledgements (one per applied version).
    pub ack_topic: String,
}

impl DownlinkConfig {
    /// The MQTT topic `device` reads its desired state from.
    pub fn mqtt_topic_for(&self, device: &str) -> String {
        self.mqtt_topic.replace(DEVICE, device)
    }
}

/// Validates `[downlink]` and adds the acknowledgement stream to `streams`.
pub(super) fn downlink(
    v: &mut Validator,
    raw: RawDownlink,
    streams: &mut Vec<StreamConfig>,
) -> DownlinkConfig {
    let taken = |t: &str| streams.iter().any(|s| s.topics().any(|x| x == t));
    let topic = v.required("downlink.topic", raw.topic).unwrap_or_default();
    if !topic.is_empty() {
        if let Err(e) = check_topic(&topic) {
            v.error("downlink.topic", &e);
        } else if taken(&topic) {
            v.error(
                "downlink.topic",
                "is a topic ferry writes to (a stream's); the desired topic is written by the fleet",
            );
        }
    }
    let ack_topic = v
        .required("downlink.ack_topic", raw.ack_topic)
        .unwrap_or_default();
    if !ack_topic.is_empty() {
        if let Err(e) = check_topic(&ack_topic) {
            v.error("downlink.ack_topic", &e);
        } else if taken(&ack_topic) || ack_topic == topic {
            v.error(
                "downlink.ack_topic",
                "must be a topic of its own (not a stream's, not the desired topic)",
            );
        }
    }
    let mqtt_topic = raw
        .mqtt_topic
        .unwrap_or_else(|| DEFAULT_DESIRED_MQTT_TOPIC.to_string());
    match check_mqtt_topic(&mqtt_topic) {
        Err(e) => v.error("downlink.mqtt_topic", &e),
        Ok(()) => {
            if let Some(e) = loops_back(&mqtt_topic, streams) {
                v.error("downlink.mqtt_topic", &e);
            }
        }
    }
    if let Some(i) = streams.iter().position(|s| s.name == ACK_STREAM) {
        v.error(
            &format!("streams[{i}].name"),
            &format!("`{ACK_STREAM}` is the downlink's acknowledgement stream; pick another name"),
        );
    }
    // Acknowledgements are events: never held back (nothing upstream could
    // keep them), the oldest shed first under the store's budget, counted.
    streams.push(StreamConfig {
        name: ACK_STREAM.into(),
        kind: StreamKind::Events,
        subscriptions: Vec::new(),
        topic: ack_topic.clone(),
        history_topic: None,
        overflow: Overflow::DropOldest,
        limits: Limits::default(),
    });
    DownlinkConfig {
        topic,
        mqtt_topic,
        ack_topic,
    }
}

/// A topic ferry may publish on: no wildcard, not a `$` topic, and
/// `{device}` exactly once, as a whole level.
fn check_mqtt_topic(t: &str) -> Result<(), String> {
    let levels: Vec<&str> = t.split('/').collect();
    if t.contains(['+', '#', '\0']) || t.starts_with('$') {
        return Err(format!(
            "`{t}` must be a plain topic: no wildcard, not starting with $"
        ));
    }
    let at: Vec<usize> = (0..levels.len())
        .filter(|i| levels[*i].contains(DEVICE))
        .collect();
    if at.len() != 1 || levels[at[0]] != DEVICE || t.matches(DEVICE).count() != 1 {
        return Err(format!(
            "`{t}` must hold {DEVICE} exactly once, as a whole level (like {DEFAULT_DESIRED_MQTT_TOPIC})"
        ));
    }
    if t.len() > 4096 {
        return Err("is longer than 4096 bytes".into());
    }
    Ok(())
}

/// A stream subscription that would take ferry's own desired-state
/// publishes back in, if any.
fn loops_back(mqtt_topic: &str, streams: &[StreamConfig]) -> Option<String> {
    let sample = mqtt_topic.replace(DEVICE, "any-device");
    let levels: Vec<&str> = sample.split('/').collect();
    streams.iter().enumerate().find_map(|(i, s)| {
        s.subscriptions.iter().enumerate().find_map(|(j, sub)| {
            matches_filter(&sub.filter, &levels).then(|| {
                format!(
                    "streams[{i}].subscriptions[{j}].filter `{}` matches it: ferry would take its own desired-state publishes back in",
                    sub.filter
                )
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::BASE;
    use super::super::parse;
    use super::*;

    const DOWN: &str = r#"
[downlink]
topic = "persistent://t/n/desired-gw-1"
ack_topic = "persistent://t/n/desired-acks"
"#;

    fn with(stream_lines: &str, downlink: &str) -> String {
        format!("{BASE}{stream_lines}\n{downlink}")
    }

    #[test]
    fn a_downlink_gets_its_default_mqtt_topic_and_an_acknowledgement_stream() {
        let c = parse(&with("", DOWN)).unwrap();
        let d = c.downlink.as_ref().unwrap();
        assert_eq!(d.mqtt_topic, DEFAULT_DESIRED_MQTT_TOPIC);
        assert_eq!(d.mqtt_topic_for("pump-7"), "devices/pump-7/desired");
        let acks = c.streams.last().unwrap();
        assert_eq!(acks.name, ACK_STREAM);
        assert_eq!(acks.kind, StreamKind::Events);
        assert_eq!(acks.topic, "persistent://t/n/desired-acks");
        assert!(acks.subscriptions.is_empty());
        assert_eq!(c.streams.len(), 2);
        assert!(parse(BASE).unwrap().downlink.is_none());
    }

    #[test]
    fn downlink_problems_are_listed_with_their_key_paths() {
        let errs = parse(&with(
            "",
            "[downlink]\nmqtt_topic = \"devices/+/desired\"\n",
        ))
        .unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "downlink.topic",
                "downlink.ack_topic",
                "downlink.mqtt_topic"
            ]
        );
        for (topic, want) in [
            ("d/{device}/{device}", "exactly once"),
            ("d/x{device}/desired", "whole level"),
            ("$sys/{device}", "plain topic"),
            ("d/desired", "exactly once"),
        ] {
            let text = with("", &format!("{DOWN}mqtt_topic = \"{topic}\"\n"));
            let errs = parse(&text).unwrap_err();
            assert_eq!(errs.len(), 1, "{topic}: {errs:?}");
            assert_eq!(errs[0].path, "downlink.mqtt_topic");
            assert!(
                errs[0].message.contains(want),
                "{topic}: {}",
                errs[0].message
            );
        }
        let same = DOWN.replace("desired-acks", "status");
        let errs = parse(&with("", &same)).unwrap_err();
        assert_eq!(errs[0].path, "downlink.ack_topic");
        let own = DOWN.replace("desired-gw-1", "status");
        let errs = parse(&with("", &own)).unwrap_err();
        assert_eq!(errs[0].path, "downlink.topic");
        assert!(errs[0].message.contains("fleet"), "{}", errs[0].message);
    }

    #[test]
    fn a_subscription_that_would_take_the_desired_state_back_in_is_refused() {
        let text = format!(
            "{BASE}\n[[streams]]\nname = \"all\"\nkind = \"events\"\ntopic = \"persistent://t/n/all\"\nsubscriptions = [{{ filter = \"devices/#\", device_id_level = 1 }}]\n{DOWN}"
        );
        let errs = parse(&text).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].path, "downlink.mqtt_topic");
        assert!(
            errs[0]
                .message
                .contains("streams[1].subscriptions[0].filter `devices/#`"),
            "{}",
            errs[0].message
        );
        let named = format!(
            "{BASE}\n[[streams]]\nname = \"{ACK_STREAM}\"\nkind = \"events\"\ntopic = \"persistent://t/n/x\"\nsubscriptions = [{{ filter = \"x/+\", device_id_level = 1 }}]\n{DOWN}"
        );
        let errs = parse(&named).unwrap_err();
        assert_eq!(errs[0].path, "streams[1].name");
    }
}
