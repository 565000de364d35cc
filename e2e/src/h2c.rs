//! An h2c client (the `h2` crate) meeting a drain: the scenario the drain and lean suites share.

use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::task::JoinHandle;

use crate::{Client, Envoy};

/// An h2c connection to `port` on 127.0.0.1 (prior knowledge, no delay): the sender, and the
/// connection's driver spawned on the current runtime, which ends when the connection does.
pub async fn open(port: u16) -> std::io::Result<(SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let _ = tcp.set_nodelay(true);
    let (send, conn) = h2::client::handshake(tcp).await.map_err(std::io::Error::other)?;
    Ok((send, tokio::spawn(conn)))
}

/// What an h2c client saw of a drain that began while two of its streams were in flight.
#[derive(Debug)]
pub struct Drained {
    /// `/slow?chunks=6&pause_ms=300`'s body: streaming when the drain began.
    pub slow: Vec<u8>,
    /// `/delay?ms=1500`: its HEADERS are encoded after the drain began.
    pub late: (u16, Vec<u8>),
    /// The client library refuses a new stream: a GOAWAY reached it.
    pub told: bool,
    /// How the connection's driver ended (`Ok(Ok(()))`: no protocol error).
    pub driver_end: String,
    /// From `healthcheck/fail` until both streams were whole.
    pub took: Duration,
    /// From `healthcheck/fail` until Envoy had written close-relay's GOAWAY
    /// (`close_relay_h2_goaway_total`, polled), if it did within 3 s.
    pub goaway_after: Option<Duration>,
}

/// Opens an h2c connection to `envoy`, starts a slow stream and a late one, POSTs
/// `healthcheck/fail` once the slow one has answered its headers, and reads both to the end.
pub fn streams_through_a_drain(envoy: &Envoy) -> Drained {
    let (drained, goaway_after) = std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel::<Instant>();
        let poll = s.spawn(move || {
            let trigger = rx.recv().ok()?;
            let counted = envoy.counter_reaching("wasmcustom.close_relay_h2_goaway_total", 1, Duration::from_secs(3)) >= 1;
            counted.then(|| trigger.elapsed())
        });
        let drained = client_side(envoy.port, envoy.admin, tx);
        (drained, poll.join().ok().flatten())
    });
    Drained { goaway_after, ..drained }
}

fn client_side(port: u16, admin: u16, triggered: std::sync::mpsc::Sender<Instant>) -> Drained {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let (client, mut driver) = open(port).await.expect("h2c connection");
        let mut client = client.ready().await.expect("ready");
        let get = |path: &str| http::Request::get(format!("http://app{path}")).body(()).expect("request");
        let (slow, _) = client.send_request(get("/slow?chunks=6&pause_ms=300"), true).expect("slow stream");
        let mut client = client.ready().await.expect("ready");
        let (late, _) = client.send_request(get("/delay?ms=1500"), true).expect("late stream");
        let slow = slow.await.expect("slow headers");
        let trigger = Instant::now();
        std::thread::spawn(move || {
            let mut c = Client::open(admin);
            c.send("POST /healthcheck/fail HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\n\r\n").expect("admin post");
            c.response("POST");
            let _ = triggered.send(trigger);
        });
        let read = |mut body: h2::RecvStream| async move {
            let mut got = Vec::new();
            while let Some(chunk) = body.data().await {
                let Ok(chunk) = chunk else { break };
                let _ = body.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            got
        };
        let slow = read(slow.into_body()).await;
        let late = match late.await {
            Ok(late) => (late.status().as_u16(), read(late.into_body()).await),
            Err(_) => (0, Vec::new()),
        };
        let took = trigger.elapsed();
        // A new stream after the server's GOAWAY is refused by the client library itself.
        let told = match client.ready().await {
            Err(e) => e.is_go_away(),
            Ok(mut c) => c.send_request(get("/keep"), true).is_err(),
        };
        let driver_end = tokio::time::timeout(Duration::from_secs(3), &mut driver).await;
        Drained { slow, late, told, driver_end: format!("{driver_end:?}"), took, goaway_after: None }
    })
}

/// The slow stream's whole body.
pub fn slow_body() -> String {
    (0..6).map(|i| format!("chunk-{i}\n")).collect()
}
