//! Never less than a plain Envoy. When close-relay ends a connection, a client that is still
//! sending (a pipelined request, its next request racing the close, the rest of an upload behind
//! an early answer) must get every byte a plain Envoy would have given it: a close must never
//! turn into a reset that cuts a response short, and what the client already sent is answered.
//! Each story runs the same client against a plain Envoy and against close-relay, in the
//! layout under test, and compares what both delivered (`e2e::compare`).

use std::time::Duration;

use e2e::compare::{compare, describe, End, Pair, Plan};
use e2e::origin::Reply;
use e2e::{EnvoySpec, Filter};

const MIB: usize = 1 << 20;
const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: app\r\n\r\n";

fn say(what: &str) {
    eprintln!("[envoy {}] {}: {what}", e2e::envoy_version(), e2e::layout().as_str());
}

fn pair(name: &str, reply: Reply) -> Pair {
    Pair::start(name, EnvoySpec::new(Filter::CloseRelay, 0), reply)
}

/// Runs `plan` on both and asserts close-relay delivered what the plain Envoy did.
fn same_as_plain(pair: &Pair, plan: &Plan, what: &str) -> (e2e::compare::Outcome, e2e::compare::Outcome) {
    let (plain, relay) = pair.run(plan);
    if let Err(diff) = compare(&plain, &relay, false) {
        panic!("{what}: {diff}\n{}\nwasm log:\n{}", describe(&plain, &relay), pair.relay.wasm_log());
    }
    (plain, relay)
}

#[test]
fn a_large_response_with_close_and_a_request_pipelined_behind_it_both_arrive_whole() {
    // The app answers 1 MiB with `Connection: close`; the client sends its next request 50 ms
    // later, before it has read the first answer. Envoy does not read that request until the
    // first response is written, so it waits in the kernel: closing the socket then would make
    // the kernel reset the connection and drop what it had not sent yet.
    let pair = pair("pipelined-1mib", Reply::BigClose(MIB));
    let mut plan = Plan::new(vec![GET.to_vec(), GET.to_vec()], Duration::from_millis(1500));
    plan.gap = Duration::from_millis(50);
    let (plain, relay) = same_as_plain(&pair, &plan, "1 MiB with close, then a pipelined request");
    assert_eq!(plain.origin.len(), 2, "plain Envoy forwards both requests");
    assert!(plain.client.bytes.len() > 2 * MIB, "plain Envoy delivers both responses");
    assert_eq!(relay.client.end, End::Closed, "close-relay ends the connection after the second response");
    say(&format!("1 MiB + pipelined request: {} bytes, as plain Envoy, then a close", relay.client.bytes.len()));
}

#[test]
fn a_slow_reader_that_reads_after_the_close_gets_every_byte() {
    // The client sends two requests and reads nothing for 1.5 s: by then close-relay has
    // decided to close and Envoy's buffers are full.
    let pair = pair("slow-reader", Reply::BigClose(MIB));
    let mut plan = Plan::new(vec![GET.to_vec(), GET.to_vec()], Duration::from_millis(1500));
    plan.gap = Duration::from_millis(50);
    plan.read_after = Duration::from_millis(1500);
    let (_, relay) = same_as_plain(&pair, &plan, "a slow reader of 1 MiB with close");
    say(&format!("slow reader: {} bytes, as plain Envoy", relay.client.bytes.len()));
}

#[test]
fn an_early_413_during_an_upload_reaches_the_client() {
    // The app refuses a 4 MiB upload as soon as it has the head, with `Connection: close`,
    // while the client is still sending the body.
    let pair = pair("early-413", Reply::EarlyReject);
    let head = format!("POST /upload HTTP/1.1\r\nhost: app\r\ncontent-length: {}\r\n\r\n", 4 * MIB);
    let mut writes = vec![head.into_bytes()];
    writes.extend((0..64).map(|_| vec![b'x'; 64 * 1024]));
    let mut plan = Plan::new(writes, Duration::from_millis(1500));
    plan.gap = Duration::from_millis(2);
    let (plain, relay) = same_as_plain(&pair, &plan, "an early 413 during an upload");
    assert!(String::from_utf8_lossy(&plain.client.bytes).starts_with("HTTP/1.1 413"), "{}", describe(&plain, &relay));
    say(&format!("early 413: plain Envoy ended {:?}, close-relay {:?}", plain.client.end, relay.client.end));
}
