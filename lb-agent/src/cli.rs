//! Command line: `run`, `check`, `stats`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

use crate::dataplane::AttachMode;

/// XDP layer-4 load balancer agent (LVS-DR style direct routing).
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax); overrides LB_LOG.
    #[arg(long, global = true)]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Load and attach the XDP balancer on an interface and keep its maps filled
    /// until SIGINT/SIGTERM, then detach and remove what it created.
    Run(RunArgs),
    /// Validate a configuration file without touching the kernel: exit 0, or 1 with
    /// every error as FILE:LINE:COLUMN.
    Check {
        /// The YAML configuration.
        file: PathBuf,
    },
    /// Print the counters of a running agent (read from its pinned maps).
    Stats {
        /// The configuration the agent runs with (labels ids with names).
        #[arg(long)]
        config: PathBuf,
        /// Where the agent pins its maps.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The YAML configuration.
    #[arg(long)]
    pub config: PathBuf,
    /// Interface to attach to (the one the VIP traffic arrives on).
    #[arg(long)]
    pub iface: String,
    /// native: in the driver; generic: in the stack (slower, works everywhere);
    /// auto: native, falling back to generic with a warning.
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    pub xdp_mode: ModeArg,
    /// Directory on a bpffs where the maps are pinned for bpftool and `stats`.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// On SIGTERM/SIGINT leave the balancer attached and its maps pinned, so it keeps
    /// forwarding and the next agent adopts it (as after a crash). Without it the
    /// agent detaches and removes what it created.
    #[arg(long)]
    pub keep_on_exit: bool,
    /// How long to wait for backends' MAC addresses (ARP/ND) at start.
    #[arg(long, default_value_t = 3.0)]
    pub resolve_timeout_secs: f64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Native,
    Generic,
    Auto,
}

impl ModeArg {
    pub fn mode(self) -> Option<AttachMode> {
        match self {
            ModeArg::Native => Some(AttachMode::Native),
            ModeArg::Generic => Some(AttachMode::Generic),
            ModeArg::Auto => None,
        }
    }
}

fn init_logging(filter: Option<&str>) {
    let mut filter = filter.map(str::to_string).or_else(|| std::env::var("LB_LOG").ok()).unwrap_or_else(|| "info".into());
    // netlink-packet-route warns about every attribute newer than itself.
    if !filter.contains("netlink_packet_route") {
        filter.push_str(",netlink_packet_route=error");
    }
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn main(cli: Cli) -> ExitCode {
    init_logging(cli.log.as_deref());
    match cli.command {
        Commands::Check { file } => match crate::config::load(&file) {
            Ok(cfg) => {
                println!("{}: ok ({} services)", file.display(), cfg.services.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Commands::Run(args) => match crate::run::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Commands::Stats { config, pin_dir } => match crate::report::print_stats(&config, &pin_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
