//! `fieldgate check`: the config is valid; this is the poll plan and what it
//! costs on the wire.

use std::time::Duration;

use crate::commands::human;
use crate::config::{Bus, BusMode, Config, Parity, Transport};
use crate::platform::budget::Budget;
use crate::poll::plan::{self, TURNAROUND};
use crate::text::count;

fn line_settings(bus: &Bus) -> String {
    let parity = match bus.parity {
        Parity::None => 'N',
        Parity::Even => 'E',
        Parity::Odd => 'O',
    };
    format!("{} {}{}{}", bus.baud, bus.data_bits, parity, bus.stop_bits)
}

/// The report `check` prints; returns it with the number of warnings.
pub fn report(config: &Config, source: &str) -> (String, usize) {
    let mut out = String::new();
    let mut warnings = 0;
    let points: usize = config.devices.iter().map(|d| d.points.len()).sum();
    out += &format!(
        "{source}: OK ({}, {}, {}, {}, {})\n",
        count(config.buses.len(), "bus"),
        count(config.devices.len(), "device"),
        count(points, "point"),
        count(config.commands.len(), "command"),
        count(config.streams.len(), "stream")
    );
    if config.platform.is_none() {
        out += "note: no [platform] section: `read`, `scan` and `simulate` work, `run` does not\n";
    }
    out += &match (config.api.listen, &config.api.token) {
        (None, _) => "local API: off\n".to_string(),
        (Some(listen), None) => format!(
            "local API and console: http://{listen}/ (no token: open to local users, writes included)\n"
        ),
        (Some(listen), Some(_)) if listen.ip().is_loopback() => format!(
            "local API and console: http://{listen}/ (writes need the token)\n"
        ),
        (Some(listen), Some(_)) => format!(
            "local API and console: http://{listen}/ (every request needs the token)\n"
        ),
    };
    for bus in &config.buses {
        let place = match &bus.transport {
            Transport::Serial => format!("on {} at {}", bus.port, line_settings(bus)),
            Transport::Tcp { address } => format!("Modbus TCP to {address}"),
            Transport::RtuOverTcp { address, .. } => format!(
                "RTU over TCP to {address}, serial side at {}",
                line_settings(bus)
            ),
            Transport::DialIn { .. } => format!(
                "RTU over TCP from a DTU ({}), serial side at {}",
                bus.port,
                line_settings(bus)
            ),
        };
        out += &format!(
            "\nbus {} {place}, timeout {}, retries {}{}\n",
            bus.name,
            human(bus.timeout),
            bus.retries,
            if bus.mode == BusMode::Transparent {
                ", transparent"
            } else {
                ""
            }
        );
        let timed = bus.transport.has_wire_time();
        let mut cycle_all = Duration::ZERO;
        // Bus time needed per second of wall time (1.0 = the bus is full).
        let mut load = 0.0;
        for device in config.devices_on(&bus.name) {
            let schedule = plan::schedule(device, bus);
            let requests: usize = schedule.iter().map(|i| i.blocks.len()).sum();
            let single = schedule.len() == 1;
            let unit = match &device.profile {
                Some(profile) => format!("{}, profile {}", device.unit, profile.name),
                None => device.unit.to_string(),
            };
            if !single {
                out += &format!(
                    "  device {} (unit {unit}): {} in {} at {} intervals\n",
                    device.name,
                    count(device.points.len(), "point"),
                    count(requests, "request"),
                    schedule.len()
                );
            }
            for interval in &schedule {
                let every = interval.every;
                let cycle = plan::cycle_time(bus, &interval.blocks);
                let cost = if timed {
                    cycle_all += cycle;
                    load += cycle.as_secs_f64() / every.as_secs_f64();
                    format!(
                        ", {} per cycle = {:.1}% of its interval",
                        human(cycle),
                        100.0 * cycle.as_secs_f64() / every.as_secs_f64()
                    )
                } else {
                    String::new()
                };
                let points: usize = interval.blocks.iter().map(|b| b.points.len()).sum();
                out += &if single {
                    format!(
                        "  device {} (unit {unit}, every {}): {} in {}{cost}\n",
                        device.name,
                        human(every),
                        count(points, "point"),
                        count(interval.blocks.len(), "request"),
                    )
                } else {
                    format!(
                        "   every {}: {} in {}{cost}\n",
                        human(every),
                        count(points, "point"),
                        count(interval.blocks.len(), "request"),
                    )
                };
                for block in &interval.blocks {
                    let names: Vec<&str> = block
                        .points
                        .iter()
                        .map(|&i| device.points[i].name.as_str())
                        .collect();
                    let fc = block.request().function_code().value();
                    let unit = if block.area.is_bits() {
                        "bits"
                    } else {
                        "registers"
                    };
                    out += &format!(
                        "    FC{fc:02X} {:<8} {:>5} +{:<4} {:<9} {}\n",
                        block.area.as_str(),
                        block.start,
                        block.count,
                        unit,
                        names.join(", ")
                    );
                }
                if timed && cycle > every {
                    warnings += 1;
                    out += &format!(
                        "  warning: one poll of {} takes {}, longer than its interval {}\n",
                        device.name,
                        human(cycle),
                        human(every)
                    );
                }
            }
        }
        if !timed {
            out += "  no fixed wire time on Modbus TCP: the network and the device set the pace (each transaction waits for its reply, up to the timeout)\n";
        }
        if cycle_all > Duration::ZERO {
            out += &format!(
                "  bus time: {} per round of all devices; {:.1}% of the bus in use (estimate: wire time + 2 x 3.5-char gaps + {} turnaround per request)\n",
                human(cycle_all),
                100.0 * load,
                human(TURNAROUND)
            );
        }
        if load > 1.0 {
            warnings += 1;
            out += &format!(
                "  warning: bus {} is over budget: its devices need {:.0}% of the bus time; polls will run late. Raise baud, lengthen poll intervals or move devices to another bus.\n",
                bus.name,
                100.0 * load
            );
        }
    }
    if let Some(budget) = Budget::of(config) {
        out += &format!("\n{}", budget.summary());
        if budget.over() {
            warnings += 1;
            out += &format!("  warning: {}\n", budget.advice());
        }
    }
    (out, warnings)
}
