//! Pulsar protocol commands for the programs that speak the binary protocol
//! without ferry's uplink: the fake broker of `hostile_broker` and the
//! benchmark's bare producer. Framing is ferry's own
//! (`ferry::uplink::frame`).

use pulsar::proto::{base_command::Type, BaseCommand};

/// A command of type `kind`, its fields set by `fill`.
pub fn command(kind: Type, fill: impl FnOnce(&mut BaseCommand)) -> BaseCommand {
    let mut c = BaseCommand {
        r#type: kind as i32,
        ..Default::default()
    };
    fill(&mut c);
    c
}
