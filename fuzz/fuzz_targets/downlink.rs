//! A downlink message (topic chosen by the first byte, payload the rest)
//! through parsing and the write plan, against a register map with every
//! kind of writable point. Never panics; every planned write encodes.
#![no_main]

use std::sync::OnceLock;

use fieldgate::config::{self, Config};
use fieldgate::codec;
use fieldgate::router::downlink::{self, Downlink};
use fieldgate::router::write;
use libfuzzer_sys::fuzz_target;

const MAP: &str = include_str!("../map.toml");
const TOPICS: &[&str] = &[
    "attributes/push",
    "gateway/attributes/push",
    "command/send/1",
    "gateway/command/send",
    "data/s/set",
    "fg/plc/set",
    "fg/command/2",
    "fg/stream/s/set",
];

fn configs() -> &'static [Config; 2] {
    static CONFIGS: OnceLock<[Config; 2]> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let generic = MAP.replace("access_token = \"t\"\nproject_key = \"k\"", "profile = \"generic\"\ntopic_prefix = \"fg\"");
        let parse = |text: &str| config::parse(std::path::Path::new("map.toml"), text).expect("fuzz map");
        [parse(MAP), parse(&generic)]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, payload)) = data.split_first() else {
        return;
    };
    let topic = TOPICS[usize::from(which) % TOPICS.len()];
    for config in configs() {
        let Some(platform) = &config.platform else {
            continue;
        };
        let Ok(Downlink::Push(pushes)) = downlink::parse(&platform.profile, topic, payload) else {
            continue;
        };
        let Ok(plans) = write::plan(config, &pushes) else {
            continue;
        };
        for plan in plans {
            for (point, value) in &plan.writes {
                assert!(point.writable);
                if point.area == config::Area::Holding {
                    codec::encode_registers(point, value, 0).expect("a planned write encodes");
                }
            }
        }
    }
});
