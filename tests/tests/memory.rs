//! What a hibernated connection gives back. A binary of its own: the allocator's totals are
//! the whole process's, and other tests' connections would move them.

use futures_util::future::join_all;
use gateway_tests::{TestGateway, config, guests, wait_until};

const CONNECTIONS: usize = 200;

/// Hibernation drops the instance; its heap (wasmtime's structures for the store and the
/// instances) must leave the process's resident memory too, not stay among the sessions'
/// blocks: the allocator returns freed pages within about a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hibernating_returns_the_instances_heap_to_the_system() {
    let mut cfg = config(guests::REFERENCE);
    cfg.limits.hibernate_after_secs = 3;
    let gw = TestGateway::start_with(cfg).await;
    let users: Vec<String> = (0..CONNECTIONS)
        .map(|i| format!("user{}", i % 40))
        .collect();
    let clients = join_all(users.iter().map(|user| gw.connect(user))).await;
    gw.wait_metric("gateway_instances_live", CONNECTIONS as f64)
        .await;
    let allocated_live = gw.metric("gateway_heap_allocated_bytes").await;
    let resident_live = gw.metric("gateway_heap_resident_bytes").await;
    assert!(allocated_live > 0.0 && resident_live >= allocated_live);

    gw.wait_metric("gateway_sessions_hibernated", CONNECTIONS as f64)
        .await;
    gw.wait_metric("gateway_instances_live", 0.0).await;
    let allocated = gw.metric("gateway_heap_allocated_bytes").await;
    let freed = (allocated_live - allocated) / CONNECTIONS as f64;
    assert!(
        freed > 8.0 * 1024.0,
        "each hibernation frees its instance's heap: {freed:.0} bytes per connection"
    );
    // Most of what was freed leaves the resident set (not all: pages shared with live
    // blocks stay).
    wait_until("the freed heap is returned to the system", async || {
        let resident = gw.metric("gateway_heap_resident_bytes").await;
        (resident_live - resident) / CONNECTIONS as f64 > 0.6 * freed
    })
    .await;
    drop(clients);
}
