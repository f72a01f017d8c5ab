//! The seam the downlink uses: a job sent to a bus's poller runs before the
//! poller's next transaction, not after the whole poll cycle.

use std::time::Duration;

use fieldgate::bus::{Bus, Request};
use fieldgate::config::{self, UnitId};
use fieldgate::outbox::Body;
use fieldgate::poll::{Job, Poller};
use fieldgate::sim::Slaves;
use tokio::sync::{mpsc, watch};

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
async fn a_job_goes_between_two_poll_transactions() {
    // Three blocks far apart, at 9600 baud with wire time: ~45 ms each.
    let mut text = CONFIG.to_string();
    for address in [0, 100, 200] {
        text += &format!("\n[[device.point]]\nname = \"p{address}\"\narea = \"holding\"\naddress = {address}\ntype = \"u16\"\n");
    }
    let mut config = config::parse(std::path::Path::new("seam.toml"), &text).unwrap();
    let slaves = Slaves::new().with_wire_time(&config.buses[0]);
    slaves.unit(1, |_| ());
    let pty = slaves.serve().unwrap();
    config.buses[0].port = pty.path.display().to_string();

    let (uplink_tx, mut uplink) = mpsc::channel(8);
    let (poller, jobs) = Poller::new(
        Bus::new(config.buses[0].clone()),
        config.devices.clone(),
        uplink_tx,
    );
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(poller.run(stop));

    // Wait until the first transaction of the poll is on the wire, then queue a write.
    while slaves.received().is_empty() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move |bus: &mut Bus| {
        Box::pin(async move {
            let unit = UnitId::new(1).unwrap();
            let result = bus
                .transact(unit, &Request::WriteRegister(7, 42), None)
                .await;
            let _ = done_tx.send(result);
        })
    });
    assert!(jobs.send(job).await.is_ok());
    assert!(done.await.unwrap().is_ok());
    let record = uplink.recv().await.unwrap();
    let Body::Attributes { values, .. } = record.body else {
        panic!("a reading, got {record:?}");
    };
    assert_eq!(values.len(), 3);
    stop_tx.send_replace(true);
    task.await.unwrap();

    let order: Vec<_> = slaves
        .received()
        .iter()
        .map(|r| r.request.clone())
        .collect();
    assert_eq!(
        order,
        [
            Request::ReadHolding(0, 1),
            Request::WriteRegister(7, 42),
            Request::ReadHolding(100, 1),
            Request::ReadHolding(200, 1),
        ],
        "the write runs after the transaction in progress, before the next one"
    );
    assert_eq!(slaves.unit(1, |u| u.holding.get(&7).copied()), Some(42));
}
