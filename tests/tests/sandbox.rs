//! The sandbox boundary: what a guest may import, the identity handshake, and faults that
//! stay inside their own connection.

use std::process::Command;

use gateway::AppState;
use gateway_tests::{Client, TestGateway, claims, config, guests};
use serde_json::json;

#[test]
fn a_guest_importing_wasi_is_refused_at_start_up_naming_each_import() {
    let err = AppState::new(config(guests::WASI_IMPORT)).expect_err("must be refused");
    let message = err.to_string();
    for import in [
        "wasi:clocks/wall-clock@0.2.0",
        "wasi:clocks/monotonic-clock@0.2.0",
    ] {
        assert!(message.contains(import), "{message:?} should name {import}");
    }
    assert!(
        message.contains("wasm32-unknown-unknown"),
        "{message:?} should say how to build"
    );
}

/// The same through the real binary, configured by environment only.
#[test]
fn the_binary_exits_with_the_named_imports() {
    let exe = std::env::current_exe().unwrap();
    let binary = exe.parent().unwrap().parent().unwrap().join("gateway");
    assert!(
        binary.exists(),
        "{} not built (make test builds it)",
        binary.display()
    );
    let output = Command::new(binary)
        .arg("serve")
        .env("GATEWAY_LISTEN", "127.0.0.1:0")
        .env("GATEWAY_JWT_SECRET", gateway_tests::SECRET)
        .env("GATEWAY_GUEST", guests::WASI_IMPORT)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("wasi:clocks/wall-clock@0.2.0"), "{stderr}");
    assert!(
        stderr.contains("wasi:clocks/monotonic-clock@0.2.0"),
        "{stderr}"
    );
}

async fn chaos() -> TestGateway {
    let mut cfg = config(guests::CHAOS);
    cfg.limits.guest_memory_bytes = 4 << 20;
    TestGateway::start_with(cfg).await
}

/// Connects to the chaos guest with `sid` choosing its identity behaviour, without waiting
/// for a welcome.
async fn chaos_connect(gw: &TestGateway, user: &str, sid: Option<&str>) -> Client {
    let mut c = claims(user);
    c.sid = sid.map(str::to_owned);
    gw.try_connect(&gateway_tests::token(c)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_violations_close_with_policy_violation() {
    let gw = chaos().await;
    for (sid, kind) in [
        ("no-ack", "unacknowledged"),
        ("ack-other-user", "ack_mismatch"),
        ("ack-other-connection", "ack_mismatch"),
        ("emit-before-ack", "unacknowledged"),
    ] {
        let mut client = chaos_connect(&gw, "alice", Some(sid)).await;
        // Not a frame before the close: not the welcome the guest emits after its ack, and
        // for `emit-before-ack` not the frame it emitted before acknowledging its identity.
        let (frames, closed) = client.frames_until_close().await;
        assert_eq!(frames, Vec::<serde_json::Value>::new(), "{sid}: {closed:?}");
        assert_eq!(closed.code, 1008, "{sid}: {closed:?}");
        assert!(closed.reason.contains(kind), "{sid}: {closed:?}");
    }
    assert_eq!(
        gw.metric(r#"gateway_guest_faults_total{kind="ack_mismatch"}"#)
            .await,
        2.0
    );
    gw.wait_metric("gateway_instances_live", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_close_only_their_own_connection() {
    let gw = chaos().await;
    let publisher = gw.publisher_token();
    let mut healthy = Vec::new();
    for _ in 0..3 {
        let mut c = chaos_connect(&gw, "alice", None).await;
        assert!(c.next_json().await.is_ok());
        healthy.push(c);
    }

    let mut count = 0;
    for (trigger, kind) in [
        ("trap", "trap"),
        ("loop", "cpu"),
        ("grow", "memory"),
        ("flood", "emit_budget"),
        ("big", "emit_too_large"),
    ] {
        // The faulty connection belongs to the same user as the healthy ones: the
        // strongest case for containment.
        let mut faulty = chaos_connect(&gw, "alice", None).await;
        assert!(faulty.next_json().await.is_ok());
        faulty.send_text(trigger).await;
        // The loop is cut by its CPU budget (the reason says so), however long a loaded
        // machine takes to get there: no wall-clock guess here.
        let closed = faulty.closed().await;
        assert_eq!(closed.code, 1011, "{trigger}: {closed:?}");
        assert!(closed.reason.contains(kind), "{trigger}: {closed:?}");

        let (status, reply) = gw
            .publish(
                &publisher,
                &json!({"user_id": "alice", "kind": trigger, "payload": {}}),
            )
            .await;
        assert_eq!(status, 200);
        count += 1;
        for client in &mut healthy {
            let frame = client.next_json().await.unwrap();
            assert_eq!(frame["seq"], reply["seq"], "{frame}");
            assert_eq!(frame["kind"], trigger);
            // The instance's own counter: its state survived the neighbours' faults.
            assert_eq!(frame["count"], count, "{frame}");
        }
        assert_eq!(
            gw.metric(&format!(r#"gateway_guest_faults_total{{kind="{kind}"}}"#))
                .await,
            1.0
        );
    }
    gw.wait_metric("gateway_instances_live", 3.0).await;
}

/// `guest_cache_dir`: the second load of the same component with the same engine settings
/// takes the compiled code from disk; a damaged or unauthenticated artifact is compiled
/// again and replaced, other engine settings get their own artifact, and a directory others
/// may write to, or a symbolic link, is not trusted.
#[test]
fn compiled_guests_are_cached_per_component_and_engine_settings() {
    use std::path::Path;
    use std::sync::Arc;

    use gateway::config::ReservationPolicy;
    use gateway::metrics::Metrics;
    use gateway::sandbox::Sandbox;
    use gateway::sandbox::cache::Compiled;

    let root = std::env::temp_dir().join(format!("gateway-compile-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let cache = root.join("cache");
    let mut cfg = config(guests::REFERENCE);
    cfg.guest_cache_dir = Some(cache.clone());
    let load = |cfg: &gateway::config::Config| {
        Sandbox::load(
            Path::new(guests::REFERENCE),
            cfg,
            100,
            Arc::new(Metrics::new()),
        )
        .unwrap()
    };

    assert_eq!(load(&cfg).compiled, Compiled::Stored);
    let cached = load(&cfg);
    assert_eq!(cached.compiled, Compiled::Hit);
    cached.trial(&cfg).expect("the cached guest runs");

    let artifacts = |cache: &Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(cache)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|x| x == "cwasm"))
            .collect()
    };
    let stored = artifacts(&cache);
    assert_eq!(stored.len(), 1);
    let genuine = std::fs::read(&stored[0]).unwrap();
    std::fs::write(&stored[0], b"not compiled code").unwrap();
    assert_eq!(
        load(&cfg).compiled,
        Compiled::Stored,
        "a damaged artifact is replaced"
    );
    assert_eq!(load(&cfg).compiled, Compiled::Hit);
    // Compiled code that the cache's key did not authenticate (here: the genuine artifact
    // with its MAC cut off, a valid wasmtime serialization) is not loaded.
    std::fs::write(&stored[0], &genuine[32..]).unwrap();
    assert_eq!(
        load(&cfg).compiled,
        Compiled::Stored,
        "an unauthenticated artifact is replaced"
    );
    assert_eq!(load(&cfg).compiled, Compiled::Hit);

    let mut compact = cfg.clone();
    compact.limits.guest_memory_reservation = ReservationPolicy::Compact;
    let mut full = cfg.clone();
    full.limits.guest_memory_reservation = ReservationPolicy::Full;
    assert_eq!(
        load(&compact).compiled,
        Compiled::Stored,
        "other engine settings, other code"
    );
    assert_eq!(load(&full).compiled, Compiled::Hit);
    assert_eq!(load(&compact).compiled, Compiled::Hit);

    // Old artifacts (guests replaced long ago) are pruned when a new one is stored.
    let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
    for i in 0..10 {
        let old = cache.join(format!("old-{i}.cwasm"));
        std::fs::write(&old, b"an old artifact").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
    }
    let mut compact_large = compact.clone();
    compact_large.limits.guest_memory_bytes = 64 << 20;
    assert_eq!(load(&compact_large).compiled, Compiled::Stored);
    assert_eq!(
        artifacts(&cache).len(),
        gateway::sandbox::cache::MAX_ARTIFACTS
    );
    assert!(cache.join(gateway::sandbox::cache::KEY_FILE).is_file());
    assert_eq!(
        load(&cfg).compiled,
        Compiled::Hit,
        "recently used ones stay"
    );

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(
            load(&cfg).compiled,
            Compiled::NotStored,
            "a shared directory is not trusted"
        );
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = root.join("link");
        std::os::unix::fs::symlink(&cache, &link).unwrap();
        let mut linked = cfg.clone();
        linked.guest_cache_dir = Some(link);
        assert_eq!(
            load(&linked).compiled,
            Compiled::NotStored,
            "a symbolic link is not followed"
        );
        assert_eq!(load(&cfg).compiled, Compiled::Hit);
    }
    let _ = std::fs::remove_dir_all(&root);
}
