//! The `gateway` command line: `serve`, `token`, and `guest` tools for plugin authors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::auth::{Audience, Claims, PUBLISH_SCOPE, mint_hs256, now_secs};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::sandbox::Sandbox;
use crate::{AppState, serve_with_ops};

/// Where `--dev` keeps the generated HS256 secret, relative to the working directory.
pub const DEV_SECRET_FILE: &str = ".gateway-dev-secret";

#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    version,
    about = "WebSocket gateway with one Wasm sandbox per connection"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Mint an HS256 token for the configured secret (for development and tests).
    Token(TokenArgs),
    /// Tools for guest authors.
    #[command(subcommand)]
    Guest(GuestCommand),
    /// Tools for operators: check a configuration, print the reference.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file with the GATEWAY_* environment applied (values, key and
    /// certificate files) and print the effective configuration, secrets masked.
    Check {
        /// The TOML file; without it, the defaults and the environment.
        file: Option<PathBuf>,
    },
    /// Print the configuration reference (every key, default and environment variable) as
    /// Markdown.
    Reference,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// TOML config file; GATEWAY_* environment variables override it.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Development mode: tokens are signed with the generated secret in
    /// ./.gateway-dev-secret (created on first use), never with configured keys, so a
    /// production configuration cannot be combined with it.
    #[arg(long)]
    pub dev: bool,
    /// With --dev: serve on an address other than loopback (the dev endpoints mint tokens
    /// for anyone who can reach the port).
    #[arg(long, requires = "dev")]
    pub dev_allow_remote: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Listen address (overrides config and GATEWAY_LISTEN).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Guest component (overrides config and GATEWAY_GUEST).
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long, env = "GATEWAY_LOG_JSON")]
    pub log_json: bool,
    /// Benchmark builds only: run the reference handler natively, without a sandbox.
    #[cfg(feature = "native-handler")]
    #[arg(long)]
    pub native_handler_for_benchmark: bool,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Mint a connect token for this user (the `sub` claim).
    #[arg(
        long,
        conflicts_with = "publisher",
        required_unless_present = "publisher"
    )]
    pub user: Option<String>,
    /// Mint a publisher token (scope events:publish).
    #[arg(long)]
    pub publisher: bool,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
    /// `tenant` claim.
    #[arg(long)]
    pub tenant: Option<String>,
    /// `sid` claim (the client's session id).
    #[arg(long)]
    pub sid: Option<String>,
    /// Extra space-separated scopes.
    #[arg(long)]
    pub scope: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum GuestCommand {
    /// Wrap a core module built for wasm32-unknown-unknown into a component.
    Wrap {
        /// The core module (e.g. target/wasm32-unknown-unknown/release/my_handler.wasm).
        module: PathBuf,
        /// Where to write the component.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Check that a component would be accepted by this gateway and can run under the
    /// configured limits (`--config` / GATEWAY_* as for serve): reports its interface, size,
    /// compile time, a trial instantiation and the cost of a few synthetic events.
    Check {
        component: PathBuf,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Write a buildable handler project in ./NAME: the WIT world, a handler, sample
    /// frames and events, and a Makefile whose default target builds NAME/NAME.wasm
    /// (`make test` replays the samples through it).
    New {
        name: String,
        /// `rust`, `js` (componentize-js) or `python` (componentize-py).
        #[arg(long, default_value = "rust")]
        lang: String,
    },
    /// Run a guest offline under the configured limits: a context, then each client frame
    /// (`--client`, one text frame a line), then each event (`--events`, one publish body a
    /// line, `user_id` optional), then on-close. Prints one JSON line per emitted frame, and
    /// one for a fault, which ends the run with status 1.
    Replay {
        component: PathBuf,
        #[arg(long)]
        events: PathBuf,
        #[arg(long)]
        client: Option<PathBuf>,
        /// Hibernate the handler before every frame and event after the first: `save`, a
        /// fresh instance, `restore` (a line `{"call":"save","bytes":N}` each time). The
        /// frames must come out the same as without it.
        #[arg(long)]
        hibernate: bool,
        /// The user id in the context the guest gets.
        #[arg(long, default_value = "replay-user")]
        user: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

pub fn load_config(args: &ConfigArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(args.config.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    if args.dev {
        refuse_production_keys(&config)?;
        config.jwt_secret = Some(dev_secret(Path::new(DEV_SECRET_FILE))?);
    }
    config.dev = args.dev;
    Ok(config)
}

/// Development mode mints tokens for anyone who asks: with a production key or issuer it
/// would mint production tokens, so it refuses them instead of choosing one.
fn refuse_production_keys(config: &Config) -> anyhow::Result<()> {
    let configured: Vec<&str> = [
        (
            "jwt_secret (GATEWAY_JWT_SECRET)",
            config.jwt_secret.is_some(),
        ),
        ("auth.public_keys", !config.auth.public_keys.is_empty()),
        ("auth.jwks_file", config.auth.jwks_file.is_some()),
        ("auth.issuer", config.auth.issuer.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if !configured.is_empty() {
        anyhow::bail!(
            "--dev signs tokens with its own generated secret ({DEV_SECRET_FILE}) and refuses \
             configured keys; remove {} or run without --dev",
            configured.join(", ")
        );
    }
    Ok(())
}

/// A secret file is trusted only if it is a regular file of this process's user that no one
/// else may read or write: another local user who planted it would know every dev token.
fn check_private_file(path: &Path, meta: &std::fs::Metadata) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let me = nix::unistd::geteuid().as_raw();
        if !meta.file_type().is_file() {
            anyhow::bail!(
                "{} is not a regular file (a link?); remove it",
                path.display()
            );
        }
        if meta.uid() != me {
            anyhow::bail!(
                "{} belongs to uid {}, not to this user (uid {me}); remove it",
                path.display(),
                meta.uid()
            );
        }
        if meta.mode() & 0o077 != 0 {
            anyhow::bail!(
                "{} may be read or written by others (mode {:o}); remove it or chmod 600",
                path.display(),
                meta.mode() & 0o777
            );
        }
    }
    #[cfg(not(unix))]
    let _ = (path, meta);
    Ok(())
}

/// Dev mode's endpoints answer anyone who reaches the port: loopback only, unless the
/// operator says otherwise with `--dev-allow-remote`.
fn refuse_remote_dev(listen: std::net::SocketAddr, allow_remote: bool) -> anyhow::Result<()> {
    if !allow_remote && !listen.ip().is_loopback() {
        anyhow::bail!(
            "--dev on {listen}: the dev endpoints mint tokens for anyone who can reach it; \
             listen on a loopback address or add --dev-allow-remote"
        );
    }
    Ok(())
}

/// Reads the development secret, creating it on first use. An existing file is trusted only
/// if it is a regular file (not a link) of this process's user that no one else can read.
fn dev_secret(path: &Path) -> anyhow::Result<String> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            check_private_file(path, &meta)?;
            let secret = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            return Ok(secret.trim().to_owned());
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    // Created with mode 0600 from the start (never readable by others, not even for the
    // moment between a write and a chmod), and never over an existing file.
    let mut file = std::fs::OpenOptions::new();
    file.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        file.mode(0o600);
    }
    let mut file = file
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    std::io::Write::write_all(&mut file, secret.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(secret)
}

/// Writes to standard output. A reader that went away (`gateway token | head -c0`, a
/// closed pipe) is not an error of ours: the output is simply not wanted any more.
pub fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("cannot write to standard output"),
    }
}

pub async fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = load_config(&args.config)?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(guest) = args.guest {
        config.guest = Some(guest);
    }
    let listen = config.listen;
    if args.config.dev {
        refuse_remote_dev(listen, args.config.dev_allow_remote)?;
    }
    #[cfg(not(feature = "native-handler"))]
    let state = AppState::new(config)?;
    #[cfg(feature = "native-handler")]
    let state = AppState::with_sandbox(config, |sandbox| {
        if args.native_handler_for_benchmark {
            tracing::warn!("benchmark mode: handlers run natively, WITHOUT a sandbox");
            sandbox.use_native_handler_for_benchmark();
        }
    })?;
    state.join_cluster().await?;
    let ops_listen = state.config.ops_listen;
    let listener = bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let ops = match ops_listen {
        Some(ops) => {
            Some(bind(ops).with_context(|| format!("cannot listen on {ops} (ops_listen)"))?)
        }
        None => None,
    };
    if args.config.dev {
        print_dev_help(addr);
    }
    // Registered now, not when first polled: a SIGTERM that arrives as soon as the gateway
    // says it is listening must drain it, not kill it with the default action.
    let shutdown = shutdown_signal();
    serve_with_ops(listener, ops, state, shutdown).await?;
    tracing::info!("gateway stopped");
    Ok(())
}

/// Pending connections the kernel may queue (it clamps to `net.core.somaxconn`). The
/// default of 128 overflows in a connect storm, and each overflow costs the client a 1 s SYN
/// retry.
const LISTEN_BACKLOG: u32 = 4096;

fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

fn print_dev_help(addr: std::net::SocketAddr) {
    let _ = print_out(&format!(
        "\ngateway (dev) listening on http://{addr}\n\
         \n  demo page:     http://{addr}/  (a live agent run in the browser client)\n\
         \n  mint tokens:   USER=$(target/release/gateway token --dev --user alice)\n\
         \x20                PUB=$(target/release/gateway token --dev --publisher)\n\
         \x20 connect:       websocat \"ws://{addr}/ws?access_token=$USER\"\n\
         \x20 publish:       curl -s -H \"Authorization: Bearer $PUB\" -H 'content-type: application/json' \\\n\
         \x20                  -d '{{\"user_id\":\"alice\",\"kind\":\"agent_started\",\"payload\":{{\"step\":1}},\"run_id\":\"r1\"}}' \\\n\
         \x20                  http://{addr}/v1/publish\n"
    ));
}

/// Registers the shutdown signals at once and returns the future that completes on the
/// first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        match term {
            Some(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            None => {
                let _ = ctrl_c.await;
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested: draining sessions");
    }
}

pub fn run_token(args: TokenArgs) -> anyhow::Result<String> {
    let config = load_config(&args.config)?;
    let secret = config.jwt_secret.as_deref().context(
        "no HS256 secret configured: set GATEWAY_JWT_SECRET, jwt_secret in the config, or use --dev",
    )?;
    let (sub, mut scopes) = match args.user {
        Some(user) => (user, Vec::new()),
        None => ("publisher".to_owned(), vec![PUBLISH_SCOPE.to_owned()]),
    };
    scopes.extend(
        args.scope
            .iter()
            .flat_map(|s| s.split_whitespace().map(str::to_owned)),
    );
    let claims = Claims {
        sub,
        exp: now_secs() + args.ttl,
        nbf: None,
        iss: config.auth.issuer.clone(),
        aud: config.auth.audience.as_deref().map(Audience::from),
        scope: (!scopes.is_empty()).then(|| scopes.join(" ")),
        tenant: args.tenant,
        sid: args.sid,
        iat: Some(now_secs()),
    };
    Ok(mint_hs256(secret, &claims)?)
}

pub fn run_config(command: ConfigCommand) -> anyhow::Result<String> {
    match command {
        ConfigCommand::Reference => Ok(crate::config::reference::markdown()),
        ConfigCommand::Check { file } => {
            let config = Config::load(file.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
            check_config(&config)
        }
    }
}

/// What `config check` says of a loaded configuration: an error naming what is wrong, or
/// the effective configuration as TOML with the secret masked.
pub fn check_config(config: &Config) -> anyhow::Result<String> {
    config.validate()?;
    // The files the configuration names must load as they would at start-up.
    crate::auth::Verifier::from_config(config)?;
    crate::tls::Tls::load(&config.tls)?;
    if let Some(guest) = &config.guest
        && !guest.is_file()
    {
        anyhow::bail!("guest = {}: no such file", guest.display());
    }
    let mut effective = config.clone();
    if effective.cluster.token.is_some() {
        effective.cluster.token = Some("<redacted>".into());
    }
    if effective.jwt_secret.is_some() {
        effective.jwt_secret = Some("<redacted>".into());
    }
    let toml = toml::to_string_pretty(&effective).context("cannot print the configuration")?;
    let warnings: String = config_warnings(config)
        .iter()
        .map(|w| format!("# warning: {w}\n"))
        .collect();
    Ok(format!(
        "{warnings}# valid; the effective configuration (defaults, file, environment):\n{toml}"
    ))
}

/// Settings that start but work against each other.
fn config_warnings(config: &Config) -> Vec<String> {
    let l = &config.limits;
    let mut warnings = Vec::new();
    if l.max_message_bytes > l.outbound_queue_bytes {
        warnings.push(format!(
            "limits.max_message_bytes ({}) exceeds limits.outbound_queue_bytes ({}): a handler \
             that echoes a maximal client message faults (emit_too_large) instead of sending it",
            l.max_message_bytes, l.outbound_queue_bytes
        ));
    }
    if l.outbound_queue_bytes >= l.max_queued_bytes {
        warnings.push(format!(
            "limits.outbound_queue_bytes ({}) is not below limits.max_queued_bytes ({}): one \
             client that stops reading can hold this node's whole delivery budget (and in cluster \
             mode pause every feed) until it is closed as a slow client",
            l.outbound_queue_bytes, l.max_queued_bytes
        ));
    }
    warnings
}

pub fn run_guest(command: GuestCommand) -> anyhow::Result<()> {
    match command {
        GuestCommand::Wrap { module, output } => {
            let bytes = std::fs::read(&module)
                .with_context(|| format!("cannot read {}", module.display()))?;
            let component = wrap_module(&bytes)
                .with_context(|| format!("cannot wrap {} into a component", module.display()))?;
            std::fs::write(&output, component)
                .with_context(|| format!("cannot write {}", output.display()))?;
            print_out(&format!("wrote {}\n", output.display()))?;
        }
        GuestCommand::New { name, lang } => {
            let dir = new_project(Path::new("."), &name, &lang)?;
            print_out(&format!(
                "wrote {}: `make -C {name}` builds {name}/{name}.wasm, `make -C {name} test` replays samples through it\n",
                dir.display()
            ))?;
        }
        GuestCommand::Replay {
            component,
            events,
            client,
            user,
            hibernate,
            config,
        } => {
            let config = load_config(&config)?;
            config.validate()?;
            let sandbox = Sandbox::load(&component, &config, 1, Arc::new(Metrics::new()))?;
            let open = |path: &Path| {
                std::fs::File::open(path)
                    .map(std::io::BufReader::new)
                    .with_context(|| format!("cannot read {}", path.display()))
            };
            let mut events = open(&events)?;
            let mut client = client.as_deref().map(open).transpose()?;
            let stdout = std::io::stdout();
            let outcome = crate::replay::replay(
                &sandbox,
                &config,
                &user,
                hibernate,
                client.as_mut().map(|c| c as &mut dyn std::io::BufRead),
                &mut events,
                &mut stdout.lock(),
            )?;
            if let crate::replay::Outcome::Faulted(fault) = outcome {
                anyhow::bail!("the guest faulted: {}", fault.as_str());
            }
        }
        GuestCommand::Check { component, config } => {
            let config = load_config(&config)?;
            config.validate()?;
            let report = check_guest(&component, &config)?;
            print_out(&format!("{report}\n"))?;
        }
    }
    Ok(())
}

/// The Rust handler template, `{{name}}` and `{{lib}}` filled in by `new_project`.
const RUST_TEMPLATE: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("templates/rust/Cargo.toml.tmpl")),
    ("Makefile", include_str!("templates/rust/Makefile.tmpl")),
    ("src/lib.rs", include_str!("templates/rust/lib.rs.tmpl")),
    (".gitignore", "target/\n*.wasm\n"),
];

/// Files every project gets: the world and sample inputs for `make test`.
const COMMON_TEMPLATE: &[(&str, &str)] = &[
    ("wit/world.wit", include_str!("../../wit/world.wit")),
    (
        "tests/frames.jsonl",
        include_str!("templates/rust/frames.jsonl"),
    ),
    (
        "tests/events.jsonl",
        include_str!("templates/rust/events.jsonl"),
    ),
];

/// A JavaScript project: componentize-js pinned exactly as the reference JavaScript
/// handler's (`guest/js`), whose package files it shares.
const JS_TEMPLATE: &[(&str, &str)] = &[
    ("Makefile", include_str!("templates/js/Makefile.tmpl")),
    (
        "src/handler.js",
        include_str!("templates/js/handler.js.tmpl"),
    ),
    ("gateway.toml", include_str!("templates/js/gateway.toml")),
    ("package.json", include_str!("../../guest/js/package.json")),
    (
        "package-lock.json",
        include_str!("../../guest/js/package-lock.json"),
    ),
    (".gitignore", "node_modules/\ntarget/\n*.wasm\n"),
];

/// A Python project: componentize-py pinned as the reference Python handler's.
const PYTHON_TEMPLATE: &[(&str, &str)] = &[
    ("Makefile", include_str!("templates/python/Makefile.tmpl")),
    ("app.py", include_str!("templates/python/app.py.tmpl")),
    (
        "gateway.toml",
        include_str!("templates/python/gateway.toml"),
    ),
    (
        "requirements.txt",
        include_str!("../../guest/python/requirements.txt"),
    ),
    (".gitignore", ".tools/\ntarget/\n__pycache__/\n*.wasm\n"),
];

/// Writes a new handler project `name` under `parent`; refuses to touch an existing path.
pub fn new_project(parent: &Path, name: &str, lang: &str) -> anyhow::Result<PathBuf> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    anyhow::ensure!(
        valid,
        "project name {name:?}: lower-case letters, digits, `-` and `_`, starting with a letter, at most 64"
    );
    let files = match lang {
        "rust" => RUST_TEMPLATE,
        "js" | "javascript" => JS_TEMPLATE,
        "python" | "py" => PYTHON_TEMPLATE,
        other => anyhow::bail!("--lang {other}: one of rust, js, python"),
    };
    let dir = parent.join(name);
    anyhow::ensure!(!dir.exists(), "{} already exists", dir.display());
    let lib = name.replace('-', "_");
    // The Makefile runs the gateway that wrote it, whether or not one is on PATH.
    let gateway = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "gateway".into());
    for (file, text) in files.iter().chain(COMMON_TEMPLATE) {
        let path = dir.join(file);
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder)
                .with_context(|| format!("cannot create {}", folder.display()))?;
        }
        // The shared package files name the reference handler; a project gets its own name.
        let text = text
            .replace("{{name}}", name)
            .replace("{{lib}}", &lib)
            .replace("{{gateway}}", &gateway)
            .replace("gateway-handler-js", name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(dir)
}

/// What `gateway guest check` reports, one fact a line.
fn check_guest(path: &Path, config: &Config) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    let sandbox = Sandbox::load(path, config, 1, Arc::new(Metrics::new()))?;
    let (imports, exports) = sandbox.interface();
    let trial = sandbox.trial(config)?;
    let synthetic = sandbox.synthetic_events(EVENTS_TIMED)?;
    let mut out = String::new();
    let _ = writeln!(out, "{}: accepted", path.display());
    let _ = writeln!(out, "  world:        {}", sandbox.world());
    let _ = writeln!(out, "  imports:      {}", imports.join(", "));
    let _ = writeln!(out, "  exports:      {}", exports.join(", "));
    let _ = writeln!(out, "  size:         {size} bytes");
    let _ = writeln!(
        out,
        "  compile:      {} ms ({})",
        sandbox.compile_time.as_millis(),
        match sandbox.compiled {
            crate::sandbox::cache::Compiled::Hit => "from guest_cache_dir",
            crate::sandbox::cache::Compiled::Stored => "compiled, stored in guest_cache_dir",
            crate::sandbox::cache::Compiled::NotStored => "compiled",
        }
    );
    let _ = writeln!(out, "  version:      {}", sandbox.version.label());
    if let Some(shape) = std::fs::read(path)
        .ok()
        .and_then(|bytes| crate::sandbox::shape::of(&bytes))
    {
        let _ = writeln!(
            out,
            "  shape:        {} core instances, {} memories ({} bytes at start), {} tables",
            shape.core_instances, shape.memories, shape.initial_memory_bytes, shape.tables
        );
    }
    let _ = writeln!(
        out,
        "  trial:        instantiated and initialised under the configured limits \
         (memory cap {} bytes, {} instances, {} tables, {} memories)",
        config.limits.guest_memory_bytes,
        config.limits.guest_max_instances,
        config.limits.guest_max_tables,
        config.limits.guest_max_memories
    );
    let _ = writeln!(
        out,
        "  instantiate:  {} us (with init, median)",
        trial.instantiate.as_micros()
    );
    let _ = writeln!(
        out,
        "  resident:     {} KiB per live instance",
        trial.resident_bytes_per_instance / 1024
    );
    let _ = writeln!(
        out,
        "  on-event:     {:.1} us per synthetic event (median of {EVENTS_TIMED})",
        synthetic.per_event.as_secs_f64() * 1e6
    );
    let _ = match synthetic.hibernation {
        Some((bytes, wake)) => write!(
            out,
            "  hibernation:  saved {bytes} bytes after those events (limit {}), woke in {} us \
             (instantiate and restore), then handled one more",
            config.limits.hibernate_state_bytes,
            wake.as_micros()
        ),
        None => write!(
            out,
            "  hibernation:  no ({} guests never hibernate)",
            crate::sandbox::WORLD_0_1
        ),
    };
    if let Some((bytes, _)) = synthetic.hibernation
        && bytes > config.limits.hibernate_state_bytes
    {
        let _ = write!(
            out,
            "\n  warning:      that state is over limits.hibernate_state_bytes: such connections \
             stay live"
        );
    }
    Ok(out)
}

/// Synthetic events `guest check` times.
const EVENTS_TIMED: usize = 200;

/// Turns a core module (with the component-type section wit-bindgen embeds) into a
/// component that imports exactly what the module's world imports; no WASI adapter.
pub fn wrap_module(module: &[u8]) -> anyhow::Result<Vec<u8>> {
    wit_component::ComponentEncoder::default()
        .module(module)?
        .validate(true)
        .encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dev_secret_is_created_private_and_then_reused() {
        let dir = std::env::temp_dir().join(format!("gateway-dev-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(DEV_SECRET_FILE);
        let _ = std::fs::remove_file(&path);
        let secret = dev_secret(&path).unwrap();
        assert!(secret.len() >= 32);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
        assert_eq!(dev_secret(&path).unwrap(), secret);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // Readable by others: whoever could read it knows every dev token.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = dev_secret(&path).unwrap_err().to_string();
            assert!(err.contains("chmod 600"), "{err}");
            // Another user's file, even a private one.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            if nix::unistd::geteuid().is_root() {
                std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
                let err = dev_secret(&path).unwrap_err().to_string();
                assert!(err.contains("not to this user"), "{err}");
            }
            // A link to a private file of ours is not the file.
            std::fs::remove_file(&path).unwrap();
            let target = dir.join("elsewhere");
            std::fs::write(&target, "planted-secret").unwrap();
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::os::unix::fs::symlink(&target, &path).unwrap();
            let err = dev_secret(&path).unwrap_err().to_string();
            assert!(err.contains("not a regular file"), "{err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn config_check_warns_when_a_maximal_message_cannot_be_echoed() {
        let mut config = Config::default();
        assert!(config_warnings(&config).is_empty());
        config.limits.max_message_bytes = config.limits.outbound_queue_bytes + 1;
        let warnings = config_warnings(&config);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("limits.outbound_queue_bytes"),
            "{warnings:?}"
        );
    }

    #[test]
    fn dev_mode_refuses_production_keys_and_remote_addresses() {
        let mut config = Config::default();
        assert!(refuse_production_keys(&config).is_ok());
        config.auth.issuer = Some("https://login.example".into());
        config.jwt_secret = Some("production-secret-0123456789abcdef".into());
        let err = refuse_production_keys(&config).unwrap_err().to_string();
        assert!(
            err.contains("jwt_secret") && err.contains("auth.issuer"),
            "{err}"
        );
        let mut jwks = Config::default();
        jwks.auth.jwks_file = Some("keys.json".into());
        let err = refuse_production_keys(&jwks).unwrap_err().to_string();
        assert!(err.contains("auth.jwks_file"), "{err}");

        assert!(refuse_remote_dev("127.0.0.1:8080".parse().unwrap(), false).is_ok());
        assert!(refuse_remote_dev("[::1]:8080".parse().unwrap(), false).is_ok());
        let err = refuse_remote_dev("0.0.0.0:8080".parse().unwrap(), false).unwrap_err();
        assert!(err.to_string().contains("--dev-allow-remote"), "{err}");
        assert!(refuse_remote_dev("0.0.0.0:8080".parse().unwrap(), true).is_ok());
    }

    #[test]
    fn new_projects_take_safe_names_and_never_overwrite() {
        let dir = std::env::temp_dir().join(format!("gateway-new-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for bad in ["", "Caps", "1abc", "a/b", "../x", "a b"] {
            assert!(new_project(&dir, bad, "rust").is_err(), "{bad:?} accepted");
        }
        assert!(new_project(&dir, "ok", "cobol").is_err());
        let made = new_project(&dir, "my-agent", "rust").unwrap();
        let makefile = std::fs::read_to_string(made.join("Makefile")).unwrap();
        assert!(makefile.contains("release/my_agent.wasm"), "{makefile}");
        assert!(!makefile.contains("{{"), "{makefile}");
        let me = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
        assert!(
            makefile.contains(&format!("GATEWAY ?= {}\n", me.display())),
            "{makefile}"
        );
        assert!(
            new_project(&dir, "my-agent", "rust").is_err(),
            "overwrote a project"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn config_check_prints_the_effective_configuration_without_the_secret() {
        let dir = std::env::temp_dir().join(format!("gateway-config-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("gateway.toml");
        std::fs::write(
            &file,
            "jwt_secret = \"a-secret-of-at-least-32-bytes-length!!\"\n[limits]\nevent_queue = 7\n",
        )
        .unwrap();
        let config = Config::load_from(Some(&file), Vec::new()).unwrap();
        let text = check_config(&config).unwrap();
        assert!(text.contains("event_queue = 7"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
        assert!(!text.contains("a-secret-of"), "{text}");

        // Whatever would stop start-up is named: a value, a missing certificate.
        let mut bad = config.clone();
        bad.limits.event_queue = 0;
        let err = check_config(&bad).unwrap_err().to_string();
        assert!(err.contains("limits.event_queue"), "{err}");
        let mut bad = config.clone();
        bad.tls.cert_file = Some(dir.join("missing-cert.pem"));
        bad.tls.key_file = Some(dir.join("missing-key.pem"));
        let err = check_config(&bad).unwrap_err().to_string();
        assert!(err.contains("missing-cert.pem"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
