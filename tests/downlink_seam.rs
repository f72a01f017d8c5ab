//! The seam the downlink uses: a typed job sent to a bus owner runs before
//! the owner's next poll transaction, not after the whole poll; the poll it
//! interrupted does not report the point written (it read it before the
//! write), so nothing stale follows the read-back.

use std::time::Duration;

use fieldgate::bus::Bus;
use fieldgate::config;
use fieldgate::modbus::Request;
use fieldgate::outbox::Outbox;
use fieldgate::poll::job::Job;
use fieldgate::poll::BusTask;
use fieldgate::record::Body;
use fieldgate::router::downlink::Target;
use fieldgate::router::write;
use fieldgate::sim::Slaves;
use tokio::sync::watch;

const CONFIG: &str = r#"
[gateway]
id = "gw"

[[bus]]
name = "line"
port = "(pty)"
baud = 9600

[[device]]
name = "d"
bus = "line"
unit = 1
poll = "10s"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_goes_between_two_poll_transactions_and_nothing_stale_follows_it() {
    // Three blocks far apart, at 9600 baud with wire time: ~45 ms each.
    let mut text = CONFIG.to_string();
    for address in [0, 100, 200] {
        text += &format!("\n[[device.point]]\nname = \"p{address}\"\narea = \"holding\"\naddress = {address}\ntype = \"u16\"\nwritable = true\n");
    }
    let mut config = config::parse(std::path::Path::new("seam.toml"), &text).unwrap();
    let slaves = Slaves::new().with_wire_time(&config.buses[0]);
    slaves.unit(1, |_| ());
    let pty = slaves.serve().unwrap();
    config.buses[0].port = pty.path.display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::start(dir.path(), 1 << 20).unwrap();

    let (task, handle) = BusTask::new(
        Bus::new(config.buses[0].clone()),
        config.devices.clone(),
        outbox.clone(),
        &Default::default(),
    );
    let (stop_tx, stop) = watch::channel(None);
    let running = tokio::spawn(task.run(stop));

    // Wait until the first transaction of the poll is on the wire, then queue a write.
    while slaves.received().is_empty() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let values = serde_json::json!({ "p0": 42 })
        .as_object()
        .cloned()
        .unwrap();
    let mut plans = write::plan(&config, &[(Target::Device("d".into()), values)]).unwrap();
    let (reply, outcome) = tokio::sync::oneshot::channel();
    let job = Job::Write {
        plan: plans.remove(0),
        reply: Some(reply),
    };
    assert!(handle.jobs.send(job).await.is_ok());
    let read_back = outcome.await.unwrap().unwrap().expect("a read-back");
    assert_eq!(
        read_back.values.get("p0"),
        Some(&serde_json::json!(42)),
        "{read_back:?}"
    );

    // The read-back, then the poll's reading without the point it had read
    // before the write.
    let mut records = Vec::new();
    while records.len() < 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        records = outbox.read(None, 10).await;
    }
    let names: Vec<Vec<String>> = records
        .iter()
        .map(|(_, r)| match &r.body {
            Body::Attributes { values, .. } => values.keys().cloned().collect(),
            other => panic!("a reading, got {other:?}"),
        })
        .collect();
    assert_eq!(names, [vec!["p0"], vec!["p100", "p200"]], "{records:?}");
    stop_tx.send_replace(Some("the test is over"));
    running.await.unwrap();
    outbox.close().await.unwrap();

    let order: Vec<_> = slaves
        .received()
        .iter()
        .map(|r| r.request.clone())
        .collect();
    assert_eq!(
        order,
        [
            Request::ReadHolding(0, 1),
            Request::WriteRegister(0, 42),
            Request::ReadHolding(0, 1),
            Request::ReadHolding(100, 1),
            Request::ReadHolding(200, 1),
        ],
        "the write (and its read-back) runs after the transaction in progress, before the next one"
    );
}
