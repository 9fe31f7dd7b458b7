use clap::Parser;

fn main() -> std::process::ExitCode {
    lb_agent::cli::main(lb_agent::cli::Cli::parse())
}
