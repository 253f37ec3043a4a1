//! RFC 6455 conformance: the Autobahn fuzzing cases (run by `tests/autobahn/run.py` with the
//! PyPI package kosoku, installed on first use under `target/`) against the real binary
//! serving the echo guest. Any case that does not pass, or does not run, fails the build; the
//! only cases not run are the permessage-deflate ones (12.*, 13.*), an extension the gateway
//! does not offer.

use std::path::Path;
use std::process::Command;

use gateway_tests::guests;

#[test]
fn autobahn_cases_pass_against_the_echo_guest() {
    let exe = std::env::current_exe().unwrap();
    let binary = exe.parent().unwrap().parent().unwrap().join("gateway");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("autobahn");
    let output = Command::new("python3")
        .arg(repo.join("tests/autobahn/run.py"))
        .arg("--gateway")
        .arg(&binary)
        .args(["--guest", guests::ECHO])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "Autobahn cases failed (report in {}):\n{stdout}\n{stderr}",
        out.display()
    );
    let summary = stdout
        .lines()
        .chain(stderr.lines())
        .find(|l| l.starts_with("autobahn:") && l.contains(" passed, "))
        .expect("a summary line");
    // Every case ran and passed: the suite's 301 outside 12.* and 13.*, none skipped.
    assert_eq!(
        summary, "autobahn: 301 passed, 0 failed",
        "{stdout}{stderr}"
    );
}
