//! Running the node's programs (iptables saves at start, `nfacct list` at
//! each scrape) with a time limit: output read while the program runs, since
//! a save can be tens of MB, and the program killed once the limit passes.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A program that ended within its limit.
#[derive(Debug)]
pub struct Finished {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Why a program gave no output.
#[derive(Debug)]
pub enum Failure {
    /// This machine has no such program.
    Missing,
    /// It could not be started, for another reason.
    Spawn(String),
    /// It was still running at the limit, and was killed.
    TimedOut,
}

/// Runs `program args`, killed after `limit`.
pub fn run_within(program: &str, args: &[&str], limit: Duration) -> Result<Finished, Failure> {
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Failure::Missing),
        Err(e) => return Err(Failure::Spawn(e.to_string())),
    };
    let drain = |stream: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut stream) = stream {
                let _ = stream.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(child.stdout.take().map(|s| Box::new(s) as _));
    let stderr = drain(child.stderr.take().map(|s| Box::new(s) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Failure::TimedOut);
            }
        }
    };
    Ok(Finished {
        success: status.success(),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_status_and_limits_are_reported() {
        let done = run_within(
            "sh",
            &["-c", "echo out; echo err >&2; exit 3"],
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(!done.success);
        assert_eq!(
            (done.stdout.as_str(), done.stderr.as_str()),
            ("out\n", "err\n")
        );
        let started = Instant::now();
        assert!(matches!(
            run_within("sleep", &["5"], Duration::from_millis(100)),
            Err(Failure::TimedOut)
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(matches!(
            run_within("no-such-program-here", &[], Duration::from_secs(1)),
            Err(Failure::Missing)
        ));
    }
}
