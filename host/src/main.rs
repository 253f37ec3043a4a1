//! The `gateway` binary. See `gateway --help`.

use clap::Parser;
use gateway::cli::{Cli, Command, print_out, run_config, run_guest, run_serve, run_token};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            init_tracing(args.log_json);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(run_serve(args)))
        }
        Command::Token(args) => run_token(args).and_then(|token| print_out(&format!("{token}\n"))),
        Command::Guest(command) => run_guest(command),
        Command::Config(command) => run_config(command).and_then(|text| print_out(&text)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("gateway: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing(json: bool) {
    let filter = EnvFilter::try_from_env("GATEWAY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
