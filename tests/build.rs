//! Builds every guest the tests use from source: the reference guest and the test guests
//! under `guests/`. Each is compiled for wasm32-unknown-unknown by a nested cargo with its
//! own target directory, then wrapped into a component with `wit-component` (no WASI
//! adapter), so a component imports exactly what its world imports. Paths land in
//! `$OUT_DIR/guests.rs` as constants.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (constant name, cargo package, library file stem)
const GUESTS: &[(&str, &str, &str)] = &[
    ("REFERENCE", "gateway-guest", "gateway_guest"),
    ("CHAOS", "chaos-guest", "chaos_guest"),
    ("WASI_IMPORT", "wasi-import-guest", "wasi_import_guest"),
    ("ECHO", "echo-guest", "echo_guest"),
];

const TARGET: &str = "wasm32-unknown-unknown";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let target_dir = out_dir.join("guest-target");

    for dir in ["guest", "wit", "tests/guests"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(&workspace)
        .args([
            "build",
            "--locked",
            "--profile",
            "guest",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // The outer build's flags are for the host triple, not for wasm32.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        // Under `cargo clippy` the outer build wraps rustc; the guests are linted by
        // `make lint` on their own.
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CLIPPY_ARGS");
    for (_, package, _) in GUESTS {
        build.args(["-p", package]);
    }
    let status = build.status().expect("cannot run cargo for the guests");
    assert!(
        status.success(),
        "building the guests failed; is the target installed? \
         (rustup target add {TARGET}, which `make test` does)"
    );

    let mut constants = String::new();
    for (name, _, stem) in GUESTS {
        let module = target_dir
            .join(TARGET)
            .join("guest")
            .join(format!("{stem}.wasm"));
        let component = out_dir.join(format!("{stem}.component.wasm"));
        wrap(&module, &component);
        writeln!(
            constants,
            "pub const {name}: &str = {:?};",
            component.display().to_string()
        )
        .unwrap();
    }
    std::fs::write(out_dir.join("guests.rs"), constants).unwrap();
}

fn wrap(module: &Path, component: &Path) {
    let bytes =
        std::fs::read(module).unwrap_or_else(|e| panic!("cannot read {}: {e}", module.display()));
    let wrapped = wit_component::ComponentEncoder::default()
        .module(&bytes)
        .and_then(|encoder| encoder.validate(true).encode())
        .unwrap_or_else(|e| panic!("cannot wrap {} into a component: {e:#}", module.display()));
    std::fs::write(component, wrapped).unwrap();
}
