//! Bad input to the agent's command line: clear errors, never a panic.

use anyhow::Result;
use causeway_tests::paths::workspace_bin;
use std::process::Command;

fn agent(args: &[&str]) -> Result<(i32, String)> {
    let out = Command::new(workspace_bin("causeway-agent"))
        .args(args)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

#[test]
fn trace_with_an_address_that_is_not_an_ip_is_a_usage_error() -> Result<()> {
    let (code, text) = agent(&[
        "trace",
        "--src",
        "10.0.0.300",
        "--dst",
        "10.96.0.1",
        "--dport",
        "80",
    ])?;
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("invalid value '10.0.0.300' for '--src <SRC>'"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    let (code, text) = agent(&[
        "trace",
        "--src",
        "10.0.0.1",
        "--dst",
        "10.96.0.1",
        "--dport",
        "80",
        "--proto",
        "icmp",
    ])?;
    assert_ne!(code, 0);
    assert!(
        text.contains("--proto \"icmp\": use tcp, udp or sctp"),
        "{text}"
    );
    // Two valid addresses that no one packet can carry.
    let (code, text) = agent(&[
        "trace",
        "--src",
        "fd00::1",
        "--dst",
        "10.96.0.10",
        "--dport",
        "53",
    ])?;
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("--src fd00::1 and --dst 10.96.0.10 are of different IP families")
            && text.contains("Usage: causeway-agent trace"),
        "{text}"
    );
    Ok(())
}

#[test]
fn render_names_the_file_the_object_and_the_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("web.yaml");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, protocol: QUIC}\n",
    )?;
    let file = path.display().to_string();
    let (code, text) = agent(&["render", "--manifests", &file, "--node-name", "n"])?;
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains(&file)
            && text.contains("Service shop/web")
            && text.contains("spec.ports[0].protocol"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");

    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Service\nmetadata: [not, a, map]\n",
    )?;
    let (code, text) = agent(&["render", "--manifests", &file, "--node-name", "n"])?;
    assert_ne!(code, 0, "{text}");
    assert!(text.contains(&file) && !text.contains("panicked"), "{text}");
    Ok(())
}
