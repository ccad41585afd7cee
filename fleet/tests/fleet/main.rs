//! ferry-fleet's integration tests, against the real brokers started by
//! `tests/stack/stack` (the agent's harness, shared: `tests/it/harness`).

#[allow(dead_code)]
#[path = "../../../tests/it/harness/mod.rs"]
mod harness;

/// The `ferry-fleet` binary under test.
#[allow(dead_code)]
pub fn fleet_bin() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_ferry-fleet"))
}

mod check;
mod desire;
mod kill;
mod provision;
mod regions;
mod serve;
mod view;
