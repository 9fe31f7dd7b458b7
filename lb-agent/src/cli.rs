//! Command line: `run`, `check`, `stats`, `flows`, `decap`, ...

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
    /// Show the running agent's services and backends like `ipvsadm -Ln --rate`
    /// (over its control socket).
    Status {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
        /// Only this service (by name); may be given more than once.
        #[arg(long = "service", value_name = "NAME")]
        services: Vec<String>,
        /// Only the services of this VIP.
        #[arg(long)]
        vip: Option<std::net::IpAddr>,
        /// Service lines only, without their backends.
        #[arg(long)]
        no_backends: bool,
        #[arg(long, default_value = crate::control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Drain a backend at run time: weight 0, no new flows, established flows
    /// continue. The configuration file keeps its weight (a reload or restart
    /// restores it unless drained again).
    Drain {
        backend: std::net::IpAddr,
        /// Only in this service (default: every service that has the backend).
        #[arg(long)]
        service: Option<String>,
        #[arg(long, default_value = crate::control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Undo `drain`: the backend gets its configured weight again.
    Undrain {
        backend: std::net::IpAddr,
        #[arg(long)]
        service: Option<String>,
        #[arg(long, default_value = crate::control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Make the running agent re-read its configuration file now (as SIGHUP does)
    /// and print the outcome: what changed, or every error as FILE:LINE:COLUMN with
    /// exit status 1 (the running configuration then stays in force).
    Reload {
        #[arg(long, default_value = crate::control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Show, live, what the running agent's XDP program decides for chosen packets:
    /// one line per packet (flow, service, connection table, Maglev slot,
    /// persistence, backend and MAC, verdict and counter) until Ctrl-C or --count.
    /// With no filter every packet is traced (within --budget). One trace at a time.
    Trace {
        /// Client address or prefix (198.51.100.7, 198.51.100.0/24, 2001:db8::/64).
        #[arg(long)]
        client: Option<String>,
        /// VIP address, optionally with the port: 198.18.1.10, 198.18.1.10:80,
        /// [2001:db8::10]:80.
        #[arg(long)]
        vip: Option<String>,
        /// Only packets sent to this backend.
        #[arg(long)]
        backend: Option<std::net::IpAddr>,
        /// tcp or udp.
        #[arg(long)]
        proto: Option<String>,
        /// Stop after this many packets.
        #[arg(long)]
        count: Option<u64>,
        /// Records per second and CPU at most (the rest are counted and reported).
        #[arg(long, default_value_t = crate::trace::DEFAULT_BUDGET)]
        budget: u32,
        /// One JSON object per packet.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = crate::control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Print the counters of a running agent (read from its pinned maps, which also
    /// say which backend each counter belongs to).
    Stats {
        /// The configuration the agent runs with: names the services (matched by vip,
        /// port and protocol). Without it, services are shown by protocol and vip:port.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where the agent pins its maps.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Print the live connection table, like `ipvsadm -Lnc` (read from the pinned
    /// maps): protocol, expiry, state, client, VIP, backend (with the port a `nat`
    /// or `fullnat` flow goes to), forwarding mode, service, and a `fullnat` flow's
    /// SNAT address and port (what its backend sees of the client).
    Flows {
        /// The configuration the agent runs with: names the services and gives the
        /// timeouts the expiry is computed with (IPVS's defaults without it).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Only this service's flows: its name (needs --config) or VIP:PORT.
        #[arg(long)]
        service: Option<String>,
        /// One JSON array of flows.
        #[arg(long)]
        json: bool,
        /// Where the agent pins its maps.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// On a real server: take the balancer's tunnelled packets (IPIP, IP6IP6, their
    /// cross forms, GUE) apart with the lb_decap XDP program on an interface until
    /// SIGINT/SIGTERM; with --stats, print its counters.
    Decap(crate::decap::DecapArgs),
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
    /// Two-arm: the interface the backends are reached by, when it is not
    /// --iface. The balancer is attached to it too; a backend whose route (next
    /// hop) is on it gets its frames there (XDP_REDIRECT), the others out of
    /// --iface as one-arm (XDP_TX).
    #[arg(long)]
    pub backend_iface: Option<String>,
    /// native: in the driver; generic: in the stack (slower, works everywhere);
    /// auto: native, falling back to generic with a warning.
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    pub xdp_mode: ModeArg,
    /// Directory on a bpffs where the maps are pinned for bpftool and `stats`. One
    /// agent per directory: it is locked while the agent runs.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// On SIGTERM/SIGINT leave the balancer attached and its maps pinned, so it keeps
    /// forwarding and the next agent adopts it (as after a crash). Without it the
    /// agent detaches and removes what it created.
    #[arg(long)]
    pub keep_on_exit: bool,
    /// Prometheus endpoint (GET /metrics); "off" disables it.
    #[arg(long, default_value = "127.0.0.1:9642")]
    pub metrics_listen: String,
    /// Control socket for `lb-agent status`, `drain` and `undrain` (mode 0600).
    #[arg(long, default_value = crate::control::DEFAULT_SOCKET)]
    pub control_socket: PathBuf,
    /// How long to wait for backends' MAC addresses (ARP/ND) at start.
    #[arg(long, default_value_t = 3.0)]
    pub resolve_timeout_secs: f64,
    /// Announce each ready VIP as a /32 or /128 blackhole route (proto 190) in this
    /// routing table, for a local BGP speaker (BIRD) to learn and export: scale-out
    /// behind ECMP routers (docs/ha.md). Off when not given. Not 253-255 (default,
    /// main, local): the table must be the agent's own.
    #[arg(long, value_parser = parse_table)]
    pub announce_table: Option<u32>,
    /// With --announce-table, a clean stop (without --keep-on-exit) withdraws the
    /// VIPs, then waits this long for the routers to converge before detaching.
    #[arg(long, default_value_t = 2.0)]
    pub withdraw_wait_secs: f64,
}

fn parse_table(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a routing table number"))?;
    match n {
        0 => Err("table 0 is not a table (unspecified)".into()),
        253..=255 => Err(format!("table {n} is the kernel's (default, main, local): use a table of the agent's own")),
        _ => Ok(n),
    }
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
        Commands::Status { json, watch, socket, services, vip, no_backends } => {
            let filter = crate::status::StatusFilter { services, vip, no_backends };
            client_status(&socket, json, watch, &filter)
        }
        Commands::Drain { backend, service, socket } => {
            client_call(&socket, &crate::control::Request::Drain { backend, service }, crate::control::TIMEOUT)
        }
        Commands::Undrain { backend, service, socket } => {
            client_call(&socket, &crate::control::Request::Undrain { backend, service }, crate::control::TIMEOUT)
        }
        Commands::Reload { socket } => {
            client_call(&socket, &crate::control::Request::Reload, crate::control::RELOAD_TIMEOUT)
        }
        Commands::Trace { client, vip, backend, proto, count, budget, json, socket } => {
            let (vip, port) = match vip.as_deref().map(parse_vip).transpose() {
                Ok(v) => v.map_or((None, None), |(a, p)| (Some(a), p)),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let request = crate::trace::TraceRequest { client, vip, port, backend, proto, count, budget: Some(budget) };
            crate::trace::client::run(&socket, request, json)
        }
        Commands::Decap(args) => match crate::decap::main(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Commands::Flows { config, service, json, pin_dir } => {
            match crate::flows::print(&pin_dir, config.as_deref(), service.as_deref(), json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Commands::Stats { config, pin_dir } => match crate::report::print_stats(config.as_deref(), &pin_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn client_call(socket: &std::path::Path, request: &crate::control::Request, timeout: std::time::Duration) -> ExitCode {
    use crate::control::Response;
    match crate::control::call_with_timeout(socket, request, timeout) {
        Ok(Response::Done { message }) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Ok(Response::Error { message }) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
        Ok(Response::Status(_) | Response::TraceLine(_) | Response::TraceNote { .. } | Response::Text { .. } | Response::Encoded { .. }) => {
            eprintln!("error: unexpected answer from the agent");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn client_status(socket: &std::path::Path, json: bool, watch: bool, filter: &crate::status::StatusFilter) -> ExitCode {
    use crate::control::Request;
    // An agent from before `StatusOf` is still asked the plain way.
    let request = if *filter == crate::status::StatusFilter::default() { Request::Status } else { Request::StatusOf(filter.clone()) };
    loop {
        if watch {
            // Clear the screen and redraw, like watch(1).
            print!("\x1b[H\x1b[2J");
        }
        if let Err(message) = print_status(socket, &request, json, filter) {
            eprintln!("error: {message}");
            return ExitCode::FAILURE;
        }
        if !watch {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Prints one status (table or JSON), or returns the error to print.
fn print_status(
    socket: &std::path::Path,
    request: &crate::control::Request,
    json: bool,
    filter: &crate::status::StatusFilter,
) -> Result<(), String> {
    use crate::control::{Request, Response};
    // The agent renders it; one from before `StatusText` does not know the request.
    let text = Request::StatusText { filter: filter.clone(), json };
    match crate::control::call_text(socket, &text, &mut std::io::stdout().lock()).map_err(|e| e.to_string())? {
        None => return Ok(()),
        Some(Response::Error { message }) if !message.starts_with("invalid request") => return Err(message),
        Some(Response::Error { .. }) => {}
        Some(_) => return Err("unexpected answer from the agent".into()),
    }
    // Nothing to check by name: the JSON goes out as the agent sent it, re-indented.
    let answer = if json && filter.services.is_empty() {
        let mut out = std::io::stdout().lock();
        match crate::control::call_status_json(socket, request, &mut out).map_err(|e| e.to_string())? {
            None => return Ok(()),
            Some(other) => other,
        }
    } else {
        crate::control::call(socket, request).map_err(|e| e.to_string())?
    };
    match answer {
        Response::Status(status) => {
            if let Some(missing) = filter.services.iter().find(|n| !status.services.iter().any(|s| s.name == **n)) {
                return Err(format!("no service named {missing}"));
            }
            println!("{}", if json { crate::control::render_json(&status) } else { crate::control::render_table(&status) });
            Ok(())
        }
        Response::Error { message } => Err(message),
        _ => Err("unexpected answer from the agent".into()),
    }
}

/// `--vip`: an address, or an address and a port.
fn parse_vip(text: &str) -> Result<(std::net::IpAddr, Option<u16>), String> {
    if let Ok(a) = text.parse::<std::net::IpAddr>() {
        return Ok((a, None));
    }
    text.parse::<std::net::SocketAddr>()
        .map(|s| (s.ip(), Some(s.port())))
        .map_err(|_| format!("--vip {text}: expected ADDR or ADDR:PORT ([ADDR]:PORT for IPv6)"))
}
