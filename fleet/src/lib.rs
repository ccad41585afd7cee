//! ferry-fleet: the fleet's side of ferry. It provisions the namespace,
//! roles and grants the gateways need, issues their tokens and configs, and
//! keeps the latest state of every device in a database (see
//! ARCHITECTURE.md, "ferry-fleet").

pub mod config;
pub mod db;
pub mod dlq;
pub mod pulsar_client;
pub mod view;
