//! Never less than a plain Envoy, on a corpus nobody here wrote. Every llhttp fixture
//! (`e2e::corpus`: 166 requests, 85 responses) goes the same way into a plain Envoy and into
//! Envoy with close-relay, in every write pattern (one write, byte by byte, split at CRLF,
//! pipelined twice) and in the states where close-relay acts:
//! - normal: the origin echoes each request, keep-alive (requests), or answers with the
//!   fixture (responses);
//! - after a relayed close: the origin echoes with `Connection: close`, so close-relay relays it
//!   and must still answer what the client pipelined behind it;
//! - draining: `healthcheck/fail` on both Envoys;
//! - without a queue: close-relay in split VMs whose network VM has no queue (the fallback that
//!   closes on the client's next request), the origin closing as after a relayed close.
//!
//! What the origin received and what the client received must be the same, but for the
//! differences `e2e::compare::compare` allows: an added `connection: close`, and a close after
//! the last response the client asked for. Anything else fails with the case, its bytes and
//! both outcomes.

use std::sync::Mutex;
use std::time::Duration;

use close_relay::host::Call;
use e2e::compare::{compare, describe, Allowed, Lane, Pair, Plan};
use e2e::corpus::{self, Case, Kind};
use e2e::origin::{Pattern, Reply};
use e2e::{EnvoySpec, Filter};

/// Exchanges run at once, each on its own listener and origins.
const LANES: usize = 12;
/// The client stops waiting after this long without a byte; a difference is looked at again
/// with the slow wait before it counts, so a loaded machine cannot fake one.
const QUIET: Duration = Duration::from_millis(30);
const SLOW_QUIET: Duration = Duration::from_millis(1500);
/// How often: Envoy itself, plain or not, resets or closes a connection it ends with input
/// unread by timing (its delayed close), so one look may differ where the next ones agree; a
/// difference close-relay makes is there every time.
const LOOKS_AGAIN: usize = 2;
/// What the client sends to get a response fixture.
const GET: &[u8] = b"GET /corpus HTTP/1.1\r\nhost: corpus\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Normal,
    RelayedClose,
    Draining,
    NoQueue,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Normal => "normal",
            State::RelayedClose => "after a relayed close",
            State::Draining => "draining",
            State::NoQueue => "without a queue",
        }
    }

    /// How the origin answers a request fixture.
    fn echo(self) -> Reply {
        match self {
            State::Normal | State::Draining => Reply::Echo,
            State::RelayedClose | State::NoQueue => Reply::EchoClose,
        }
    }

    /// Response fixtures are the origin's answer, so they run where the origin's own choice
    /// of answer is not the state.
    fn takes(self, kind: Kind) -> bool {
        kind == Kind::Request || matches!(self, State::Normal | State::Draining)
    }
}

#[derive(Debug, Default)]
struct Tally {
    compared: usize,
    added_close: usize,
    closed_after_last: usize,
    looked_again: usize,
    failures: Vec<String>,
}

/// One case, one pattern, on one lane: the client's plan and the origin's answer.
fn exchange_for(case: &Case, pattern: Pattern, state: State) -> (Plan, Reply) {
    match case.kind {
        Kind::Request => (Plan::new(pattern.writes(&case.bytes), QUIET), state.echo()),
        Kind::Response => {
            let (client, origin) = match pattern {
                Pattern::Twice => (Pattern::Twice.writes(GET), Pattern::Whole),
                other => (vec![GET.to_vec()], other),
            };
            (Plan::new(client, QUIET), Reply::Raw(case.bytes.clone(), origin))
        }
    }
}

fn check(lane: &Lane, case: &Case, pattern: Pattern, state: State, tally: &Mutex<Tally>) {
    let (mut plan, reply) = exchange_for(case, pattern, state);
    lane.set_reply(reply);
    let (plain, relay) = lane.run(&plan);
    let mut outcome = compare(&plain, &relay, case.is_head());
    let mut shown = (plain, relay);
    let looked_again = outcome.is_err();
    for _ in 0..LOOKS_AGAIN {
        if outcome.is_ok() {
            break;
        }
        plan.quiet = SLOW_QUIET;
        let (plain, relay) = lane.run(&plan);
        outcome = compare(&plain, &relay, case.is_head());
        shown = (plain, relay);
    }
    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
    t.compared += 1;
    t.looked_again += usize::from(looked_again);
    match outcome {
        Ok(Allowed { added_close, closed_after_last }) => {
            t.added_close += added_close;
            t.closed_after_last += usize::from(closed_after_last);
        }
        Err(diff) => t.failures.push(format!(
            "{} [{}, {}]: {diff}\n  sent: {:?}\n{}",
            case.name,
            state.as_str(),
            pattern.as_str(),
            String::from_utf8_lossy(&case.bytes),
            describe(&shown.0, &shown.1)
        )),
    }
}

/// Every case that runs in `state`, in every pattern, spread over the lanes.
fn run(pair: &Pair, state: State, cases: &[Case]) -> Tally {
    let jobs: Vec<(&Case, Pattern)> =
        cases.iter().filter(|c| state.takes(c.kind)).flat_map(|c| Pattern::ALL.map(|p| (c, p))).collect();
    let tally = Mutex::new(Tally::default());
    let lanes = pair.lanes();
    e2e::on_workers(&jobs, lanes.len(), |lane, (case, pattern)| check(&lanes[lane], case, *pattern, state, &tally));
    let t = tally.into_inner().unwrap_or_else(|p| p.into_inner());
    eprintln!(
        "[envoy {}] {}: corpus {}: {} comparisons ({} looked at again), added `connection: close` {}, closed after the last response {}, other differences {}",
        e2e::envoy_version(),
        e2e::layout().as_str(),
        state.as_str(),
        t.compared,
        t.looked_again,
        t.added_close,
        t.closed_after_last,
        t.failures.len()
    );
    t
}

fn assert_same(pair: &Pair, tallies: &[Tally]) {
    let failures: Vec<&String> = tallies.iter().flat_map(|t| &t.failures).collect();
    let trap = pair.relay.wasm_trap();
    assert!(
        failures.is_empty() && trap.is_none(),
        "{} difference(s) from plain Envoy (first 5 below); wasm trap: {trap:?}\n\n{}",
        failures.len(),
        failures.iter().take(5).map(|f| f.as_str()).collect::<Vec<_>>().join("\n\n")
    );
    assert!(tallies.iter().all(|t| t.compared > 0), "every state ran");
}

#[test]
fn the_corpus_normal_after_a_relayed_close_and_draining() {
    let cases = corpus::load(&corpus::dir());
    let pair = Pair::with_lanes("corpus", EnvoySpec::new(Filter::CloseRelay, 0), Reply::Echo, LANES);
    let normal = run(&pair, State::Normal, &cases);
    let relayed = run(&pair, State::RelayedClose, &cases);
    for envoy in [&pair.plain, &pair.relay] {
        envoy.admin_post("/healthcheck/fail");
    }
    pair.relay.counter_reaching("wasmcustom.close_relay_drain_entered_sidecar_health_total", 1, Duration::from_secs(10));
    let draining = run(&pair, State::Draining, &cases);
    let took_effect = relayed.added_close > 0 && draining.added_close == 0;
    assert_same(&pair, &[normal, relayed, draining]);
    assert!(took_effect, "the states took effect: close relayed after the origin's close, Envoy's own close while draining");
}

#[test]
fn the_corpus_without_a_queue() {
    let cases = corpus::load(&corpus::dir());
    let mut spec = EnvoySpec::new(Filter::SeparateVms, 0);
    spec.wasm = e2e::fault_wasm_path();
    spec.vm_env = vec![("CLOSE_RELAY_HOST_FAULT".into(), Call::RegisterSharedQueue.abi_name().into())];
    let pair = Pair::with_lanes("corpus-noqueue", spec, Reply::EchoClose, LANES / 2);
    let tally = run(&pair, State::NoQueue, &cases);
    assert_same(&pair, &[tally]);
}
