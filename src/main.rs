//! The `fieldgate` command line: parses arguments, sets up logging and
//! dispatches. Exit codes: 0 ok, 1 runtime failure, 2 bad config or usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use fieldgate::commands::{self, Usage};
use fieldgate::config::{self, ConfigError};
use fieldgate::daemon;

#[derive(Parser)]
#[command(version, about = "Modbus RTU to MQTT edge gateway")]
struct Cli {
    /// Config file
    #[arg(
        long,
        global = true,
        env = "FIELDGATE_CONFIG",
        default_value = "/etc/fieldgate/fieldgate.toml"
    )]
    config: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground (what systemd starts)
    Run,
    /// Validate the config and print the poll plan and its bus time
    Check,
    /// Read a device's points once and print them (no MQTT needed)
    Read {
        device: String,
        /// Points to read (default: all)
        points: Vec<String>,
    },
    /// Serve the configured devices as simulated RTU slaves on pseudo-terminals
    Simulate {
        /// Answer only after the time request and response take on a real
        /// line at the configured baud (a pty is instantaneous)
        #[arg(long)]
        wire_time: bool,
    },
    /// No-hardware quick start: simulated slaves + embedded broker + the daemon
    Demo,
    /// Show the outbox: messages held, bytes, oldest sample age, dropped count
    Buffer,
    /// Find which unit ids answer on a bus
    Scan {
        bus: String,
        /// Unit ids to probe, e.g. 1-247 or 5
        #[arg(long, default_value = "1-247", value_parser = commands::scan::parse_units)]
        units: std::ops::RangeInclusive<u8>,
    },
}

/// `RUST_LOG` wins. The default keeps the embedded broker quiet, and sled's
/// own I/O error lines (the outbox reports those once, in its own words).
fn init_logging(level: &str) {
    let default = format!("{level},rumqttd=off,tracing=off,sled=off");
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp_millis()
        .init();
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let load = || config::load(&cli.config);
    match cli.command {
        Command::Run => daemon::run(load()?, daemon::shutdown_on_signals()?).await,
        Command::Check => {
            let config = load()?;
            let (report, _warnings) =
                commands::check::report(&config, &cli.config.display().to_string());
            print!("{report}");
            Ok(())
        }
        Command::Read { device, points } => commands::read::run(&load()?, &device, &points).await,
        Command::Simulate { wire_time } => commands::simulate::run(&load()?, wire_time).await,
        Command::Demo => commands::demo::run().await,
        Command::Buffer => commands::buffer::run(&load()?),
        Command::Scan { bus, units } => commands::scan::run(&load()?, &bus, units).await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(match cli.command {
        Command::Run | Command::Demo => "info",
        _ => "warn",
    });
    match dispatch(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.is::<ConfigError>() || e.is::<Usage>() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
