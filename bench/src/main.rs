//! `ringway-bench`: the load generator for ringway (and for any gateway speaking
//! protocol v1, e.g. a uWebSockets baseline) on one host over loopback.
//!
//! Scenarios (`bench/README.md` says what every figure means):
//! | subcommand | measures |
//! |---|---|
//! | `idle` | gateway and generator memory per idle connection, connect rate |
//! | `fanout` | publish → deliver latency, loss, deliveries per gateway CPU-second |
//! | `churn` | upgrades per second and per gateway CPU-second |
//!
//! Rooms: `cli` (flags), `scenario` (orchestration and figures), `client` (the mio
//! client threads), `parts` (client processes for `--procs`), `publisher`, `ws` (the
//! client side of the protocol, pure), `stats` (reports and histograms), `report`
//! (table, JSON, SVG), `procfs` (RSS, CPU, sockstat), `sys` (the only `unsafe`).

#![deny(unsafe_code)]

mod cli;
mod client;
mod parts;
mod procfs;
mod publisher;
mod redisinfo;
mod report;
mod scenario;
mod stats;
mod sys;
mod window;
mod ws;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let nofile = match sys::raise_nofile_limit() {
        Ok(n) => Some(n),
        Err(e) => {
            eprintln!("ringway-bench: cannot raise the file limit: {e}");
            None
        }
    };
    if let Ok(part) = std::env::var(parts::PART_ENV) {
        return match scenario::child_cfg(&cli, &part) {
            Ok(cfg) => parts::child_main(cfg),
            Err(e) => {
                eprintln!("ringway-bench child: {e}");
                ExitCode::from(64)
            }
        };
    }
    match scenario::run(&cli, nofile) {
        Ok(()) => ExitCode::SUCCESS,
        Err(scenario::Error::Usage(e)) => {
            eprintln!("ringway-bench: {e}");
            ExitCode::from(64)
        }
        Err(scenario::Error::Run(e)) => {
            eprintln!("ringway-bench: {e}");
            ExitCode::from(1)
        }
    }
}
