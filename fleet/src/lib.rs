//! ferry-fleet: the fleet's side of ferry. It provisions the namespace,
//! roles and grants the gateways need, issues their tokens and configs, and
//! keeps the latest state of every device in a database (see
//! ARCHITECTURE.md, "ferry-fleet").
//!
//! - [`config`]: fleet.toml, and the names of every gateway's topics;
//! - [`admin`]: Pulsar's admin REST API, each failure naming its call;
//! - [`provision`]: what the broker holds against what fleet.toml declares,
//!   the changes between them (pure), and applying them;
//! - [`token`]: gateway JWTs (HS256, RS256);
//! - [`gateway_config`]: a gateway's `ferry.toml`;
//! - [`view`], [`db`]: the latest state of every device;
//! - [`serve`], [`metrics`]: the view over HTTP (`GET /devices/{id}`,
//!   `/metrics`);
//! - [`replay`]: rebuilding the view from the compacted status topics;
//! - [`refill`]: copying the gateways' records into a cluster that lost them.

pub mod admin;
pub mod config;
pub mod db;
pub mod desire;
pub mod dlq;
pub mod gateway_config;
pub mod metrics;
pub mod provision;
pub mod pulsar_client;
pub mod reader;
pub mod refill;
pub mod replay;
pub mod serve;
pub mod token;
pub mod view;
