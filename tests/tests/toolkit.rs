//! Tools for plugin authors, through the real binary: `gateway guest replay`; and the CLI's
//! output into a pipe whose reader has gone.

use std::process::{Command, Stdio};

use gateway_tests::guests;
use serde_json::Value;

fn gateway() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("gateway")
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gateway-toolkit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn replay(guest: &str, client: &str, events: &str) -> (bool, Vec<Value>, String) {
    replay_with(guest, client, events, &[])
}

fn replay_with(
    guest: &str,
    client: &str,
    events: &str,
    flags: &[&str],
) -> (bool, Vec<Value>, String) {
    let output = Command::new(gateway())
        .args(["guest", "replay", guest])
        .args(flags)
        .arg("--client")
        .arg(write(&format!("{}-client.jsonl", events.len()), client))
        .arg("--events")
        .arg(write(&format!("{}-events.jsonl", events.len()), events))
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (
        output.status.success(),
        lines,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn replay_runs_the_reference_guest_offline_frame_by_frame() {
    let client = r#"{"type":"subscribe","thread_id":"t1"}

{"type":"ping"}
"#;
    let events = r#"{"user_id":"alice","kind":"agent_started","payload":{"api_key":"sk-1","step":1},"run_id":"r1","thread_id":"t1"}
{"kind":"agent_thinking","payload":{"n":2},"thread_id":"t2"}
"#;
    let (ok, lines, stderr) = replay(guests::REFERENCE, client, events);
    assert!(ok, "{stderr}");
    let calls: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["call"].as_str().unwrap(),
                l["frame"]["type"].as_str().unwrap(),
            )
        })
        .collect();
    // The second event's thread is not subscribed: no frame for it.
    assert_eq!(
        calls,
        [
            ("init", "welcome"),
            ("on-client-message", "subscribed"),
            ("on-client-message", "pong"),
            ("on-event", "event"),
        ]
    );
    assert_eq!(lines[1]["line"], 1);
    assert_eq!(lines[2]["line"], 3, "blank lines keep their numbers");
    let event = &lines[3]["frame"];
    assert_eq!(event["payload"]["api_key"], "[redacted]");
    assert_eq!(
        (event["seq"].as_u64(), event["run_state"].as_str()),
        (Some(1), Some("started"))
    );
}

/// `--hibernate` saves and restores the handler into a fresh instance before every call
/// after `init`: the reference guest's frames, counters and run states come out the same.
#[test]
fn replay_hibernating_between_calls_gives_the_same_frames() {
    let client = r#"{"type":"subscribe","thread_id":"t1"}
{"type":"ping"}
"#;
    let events = r#"{"kind":"agent_started","payload":{"token":"x"},"run_id":"r1","thread_id":"t1"}
{"kind":"tool_executing","payload":{"n":2},"run_id":"r1","thread_id":"t1"}
{"kind":"agent_thinking","payload":{"n":3},"thread_id":"t2"}
{"kind":"tool_completed","payload":{"n":4},"run_id":"r1","thread_id":"t1"}
"#;
    let (ok, plain, stderr) = replay(guests::REFERENCE, client, events);
    assert!(ok, "{stderr}");
    let (ok, hibernated, stderr) = replay_with(guests::REFERENCE, client, events, &["--hibernate"]);
    assert!(ok, "{stderr}");
    let (saves, frames): (Vec<Value>, Vec<Value>) =
        hibernated.into_iter().partition(|l| l["call"] == "save");
    assert_eq!(
        saves.len(),
        6,
        "one save before each frame and event: {saves:?}"
    );
    assert!(
        saves
            .iter()
            .all(|s| s["hibernated"] == true && s["bytes"].as_u64() > Some(0))
    );
    // The welcome carries the token's expiry, computed at each run's start.
    let strip = |mut frames: Vec<Value>| {
        frames[0]["frame"]["expires_at"] = Value::Null;
        frames
    };
    assert_eq!(strip(frames), strip(plain));
}

#[test]
fn replay_reports_a_fault_and_fails() {
    let (ok, lines, stderr) = replay(guests::CHAOS, "hello\ntrap\nnever\n", "");
    assert!(!ok);
    assert!(stderr.contains("the guest faulted: trap"), "{stderr}");
    let last = lines.last().unwrap();
    assert_eq!(
        (last["call"].as_str(), last["line"].as_u64()),
        (Some("on-client-message"), Some(2))
    );
    assert_eq!(last["fault"], "trap");
    assert_eq!(lines.len(), 3, "welcome, the echo, the fault: {lines:?}");
}

/// `gateway guest new` writes a project that builds outside this repository, passes
/// `guest check` and replays its samples (`make test` in the project does all three).
#[test]
fn a_new_rust_project_builds_checks_and_replays() {
    let dir = std::env::temp_dir().join(format!("gateway-guest-new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let status = Command::new(gateway())
        .args(["guest", "new", "demo-handler"])
        .current_dir(&dir)
        .status()
        .unwrap();
    assert!(status.success());
    let project = dir.join("demo-handler");
    // The project's own cargo, as an author would run it: none of this build's settings.
    let output = Command::new("make")
        .arg("test")
        .arg(format!("GATEWAY={}", gateway().display()))
        .current_dir(&project)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("demo-handler.wasm: accepted"), "{stdout}");
    assert!(stdout.contains("hibernation:  saved"), "{stdout}");
    assert!(project.join("demo-handler.wasm").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `guest new --lang js|python`: the generated project builds with its pinned tool (the
/// copies `make guests` installed under target/, so the test does not download them again),
/// passes `guest check` and replays its samples.
#[test]
fn new_javascript_and_python_projects_build_check_and_replay() {
    let target = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    let js_tool = target.join("js-guest/node_modules/.bin/componentize-js");
    let py_tools = target.join("py-guest");
    assert!(
        js_tool.exists() && py_tools.join("bin/componentize-py").exists(),
        "the build tools are missing: `make guests` installs them (`make test` does that first)"
    );
    for (lang, tool) in [
        ("js", format!("COMPONENTIZE_JS={}", js_tool.display())),
        ("python", format!("PY_TOOLS={}", py_tools.display())),
    ] {
        let dir =
            std::env::temp_dir().join(format!("gateway-guest-new-{lang}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new(gateway())
            .args(["guest", "new", "agent-ui", "--lang", lang])
            .current_dir(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "{lang}");
        let project = dir.join("agent-ui");
        let output = Command::new("make")
            .arg("test")
            .arg(format!("GATEWAY={}", gateway().display()))
            .arg(&tool)
            .current_dir(&project)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{lang}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains("agent-ui.wasm: accepted"),
            "{lang}: {stdout}"
        );
        assert!(stdout.contains("hibernation:  saved"), "{lang}: {stdout}");
        let replayed = std::fs::read_to_string(project.join("target/replay.jsonl")).unwrap();
        assert!(
            replayed.contains(r#""kind":"agent_completed""#),
            "{lang}: {replayed}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `gateway config reference | head -c0`: a reader that went away before the output was
/// written (EPIPE) is not an error of the gateway's. It exits 0, with no panic and no
/// complaint. The pipe's read end is closed before the gateway starts, so every write fails.
#[test]
fn output_into_a_pipe_nobody_reads_is_not_an_error() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = Command::new(gateway())
        .args(["config", "reference"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{}: {stderr}", output.status);
    assert!(stderr.is_empty(), "{stderr}");
}
