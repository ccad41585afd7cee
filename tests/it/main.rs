//! Integration tests: ferry against the real Pulsar and Mosquitto.
//!
//! One test binary (see Cargo.toml, `autotests = false`); every scenario is a
//! module. The harness starts the broker stack once with
//! `tests/stack/stack up` and fails, never skips, when it cannot.

mod audit;
mod bad_input;
mod clock;
mod downlink;
mod harness;
mod hostile_broker;
mod hostile_mqtt;
mod metrics;
mod outage;
mod overflow;
mod regions;
mod resume;
mod retained;
mod secure;
mod special_files;
mod status;
mod stream;
mod systemd;
