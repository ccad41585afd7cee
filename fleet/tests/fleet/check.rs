//! `ferry-fleet check`: a good file passes, a bad one lists every problem
//! with its key path and exits 2.

use crate::fleet_bin;

#[test]
fn check_lists_every_problem_and_exits_2() {
    let dir = std::env::temp_dir().join(format!("fleet-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[pulsar]\nservice_url = \"x\"\n[namespace]\ntenant = \"iot\"\n[[gateways]]\nid = \"a b\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(fleet_bin())
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for path in [
        "pulsar.service_url",
        "pulsar.admin_url",
        "namespace.name",
        "gateways[0].id",
    ] {
        assert!(err.contains(&format!("\n  {path}: ")), "{path} in {err}");
    }
    assert!(err.contains("4 problems"), "{err}");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[pulsar]\nservice_url = \"pulsar://127.0.0.1:6650\"\nadmin_url = \"http://127.0.0.1:8080\"\n[namespace]\ntenant = \"iot\"\nname = \"fleet\"\n[[gateways]]\nid = \"gw-1\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(fleet_bin())
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}: ok (1 gateways in iot/fleet)", good.display())
    );
    let _ = std::fs::remove_dir_all(&dir);
}
