//! Where things live: the repository, the build's binaries, the caches kept
//! outside the clone.

use std::path::PathBuf;

/// The repository root (this crate sits in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// Caches kept outside the clone: Kubernetes binaries, the moto venv.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("CAUSEWAY_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/causeway"),
    }
}

/// A binary built by this workspace (`causeway-agent`, `causeway-echo`, …), found
/// next to the running test or program: `<target>/<profile>/<name>`. Integration
/// tests of other packages cannot use `CARGO_BIN_EXE_*`, so `make test` builds
/// every binary before running the tests.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current executable path");
    for dir in exe.ancestors().skip(1) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
        if dir.file_name().is_some_and(|n| n == "target") {
            break;
        }
    }
    panic!(
        "{name} is not built next to {}: run `cargo build --workspace --bins` first (make test does)",
        exe.display()
    );
}
