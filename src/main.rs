//! The `fieldgate` command line: parses arguments, sets up logging and
//! dispatches. Exit codes: 0 ok, 1 runtime failure, 2 bad config or usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use fieldgate::config::{self, ConfigError};
use fieldgate::daemon;
use fieldgate::{commands, Usage};

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
    /// Read a device's points once and print them (through the daemon when it runs)
    Read {
        device: String,
        /// Points to read (default: all)
        points: Vec<String>,
    },
    /// Write one writable point once, validated like a platform push, then read it back
    Write {
        device: String,
        point: String,
        value: String,
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
        #[arg(long, default_value = "1-247", value_parser = fieldgate::poll::scan::parse_units)]
        units: std::ops::RangeInclusive<u8>,
        /// Also name the device profiles each answering unit matches
        #[arg(long)]
        identify: bool,
    },
    /// Live view of every Modbus transaction the running daemon makes
    Trace {
        /// Only this bus (default: all)
        bus: Option<String>,
    },
    /// List the device profiles found, or show one point by point
    Profiles {
        /// The profile to show (default: list them all)
        name: Option<String>,
    },
}

/// To the journal when systemd connected stderr to it (JOURNAL_STREAM), with
/// key-value fields such as DEVICE= and BUS=; to stderr otherwise.
/// `RUST_LOG` wins. The default keeps the embedded broker quiet, and sled's
/// own I/O error lines (the outbox reports those once, in its own words).
fn init_logging(level: &str) {
    let spec = std::env::var("RUST_LOG")
        .unwrap_or_else(|_| format!("{level},rumqttd=off,tracing=off,sled=off"));
    let journald = std::path::Path::new("/run/systemd/journal/socket").exists();
    if journald && systemd_journal_logger::connected_to_journal() {
        if let Ok(journal) = systemd_journal_logger::JournalLog::new() {
            let filter = env_filter::Builder::new().parse(&spec).build();
            log::set_max_level(filter.filter());
            let journal = journal.with_syslog_identifier("fieldgate".into());
            if log::set_boxed_logger(Box::new(Filtered { filter, journal })).is_ok() {
                return;
            }
        }
    }
    env_logger::Builder::new()
        .parse_filters(&spec)
        .format_timestamp_millis()
        .init();
}

/// The journal logger behind `RUST_LOG`'s filter.
struct Filtered {
    filter: env_filter::Filter,
    journal: systemd_journal_logger::JournalLog,
}

impl log::Log for Filtered {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if self.filter.matches(record) {
            log::Log::log(&self.journal, record);
        }
    }

    fn flush(&self) {}
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let load = || config::load(&cli.config);
    match cli.command {
        Command::Run => {
            daemon::run(Some(&cli.config), load()?, daemon::shutdown_on_signals()?).await
        }
        Command::Check => {
            let config = load()?;
            let (report, _warnings) =
                commands::check::report(&config, &cli.config.display().to_string());
            print!("{report}");
            Ok(())
        }
        Command::Read { device, points } => commands::read::run(&load()?, &device, &points).await,
        Command::Write {
            device,
            point,
            value,
        } => commands::write::run(&load()?, &device, &point, &value).await,
        #[cfg(feature = "sim")]
        Command::Simulate { wire_time } => commands::simulate::run(&load()?, wire_time).await,
        #[cfg(feature = "sim")]
        Command::Demo => commands::demo::run().await,
        #[cfg(not(feature = "sim"))]
        Command::Simulate { .. } | Command::Demo => Err(Usage(
            "this build leaves out the simulator and the demo (cargo feature \"sim\"); build from source with the default features to use them".into(),
        )
        .into()),
        Command::Buffer => commands::buffer::run(&load()?),
        Command::Scan {
            bus,
            units,
            identify,
        } => commands::scan::run(&load()?, &bus, units, identify).await,
        Command::Trace { bus } => commands::trace::run(&load()?, bus.as_deref()).await,
        Command::Profiles { name } => commands::profiles::run(&cli.config, name.as_deref()),
    }
}

#[tokio::main(flavor = "current_thread")]
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
