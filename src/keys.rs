//! Every name the module shares beyond one context, in one place: the shared-data keys (one
//! record each, all VMs of the plugin read and compare-and-swap it; the codec beside each), the
//! queue names, and the connection's filter-state property.

/// The pod's drain state: per source, until when it is on ([`crate::drain::DrainState`]).
pub const DRAIN_STATE: &str = "close_relay.drain";
/// The app's recent `Connection: close` answers, for `app_closes` ([`crate::drain::Window`]).
pub const APP_CLOSES: &str = "close_relay.app_closes";
/// Each network VM's count of its client connections ([`crate::census`]).
pub const CENSUS: &str = "close_relay.census";
/// Envoy's own `connection: close` seen in a row by the network role's probes (one u64 word,
/// [`crate::sidecar::next_in_a_row`]).
pub const ENVOY_CLOSES: &str = "close_relay.envoy_closes";
/// Wake-queue tokens of every network root, woken when a drain begins (u64 words,
/// [`crate::codec::encode_u64s`]).
pub const WAKE_TOKENS: &str = "close_relay.wake";
/// When the next sidecar poll is due; the worker whose CAS moves it polls (one u64 word).
pub const SIDECAR_POLL: &str = "close_relay.poll.sidecar";
/// The last sidecar `/stats` read and when it was taken
/// ([`crate::sidecar::DrainStats::encode_read`]). `close_relay.sidecar.stats` held an earlier
/// version's record, with stats a default sidecar does not keep.
pub const SIDECAR_READ: &str = "close_relay.sidecar.read";
/// When the next app readiness probe is due (one u64 word).
pub const READINESS_POLL: &str = "close_relay.poll.readiness";
/// Readiness probes failed in a row (one u64 word).
pub const READINESS_FAILURES: &str = "close_relay.readiness.failures";

/// Set once a lean network role has seen rescue's attempt count on a response: the pod's
/// inbound route is rescue's (one u64 word, 1).
/// When the next single reset may drain the pod at once (ms since the epoch, little-endian u64):
/// one such drain a minute, pod-wide ([`crate::podwide::single_reset_allowed`]).
pub const SINGLE_RESET_AFTER: &str = "close_relay.single_reset_after";
/// The app's answers, pod-wide, as each VM adds its own every tick (little-endian u64): a streak
/// of failures in one VM ends when the app answered anyone ([`crate::evidence::Streak`]).
pub const ANSWERS: &str = "close_relay.answers";
pub const RESCUE_SEEN: &str = "close_relay.rescue_seen";

/// Each network root's wake queue is this prefix and a nonce ([`crate::link::Note`] items).
pub const WAKE_QUEUE_PREFIX: &str = "close_relay.wake.";

/// The connection filter-state key through which the network role announces itself and its
/// connection's address ([`crate::link::Handle`]: its VM's queue and a nonce) to the HTTP
/// role, across VMs too.
pub const ADDRESS_PROPERTY: &str = "close_relay_address";

/// The connection filter-state key on the preStop hook's connection: the pod's other client
/// connections as the network role last counted them after the hook came ([`crate::census`]),
/// read by the HTTP role that holds the hook, in whichever VM.
pub const PRESTOP_PROPERTY: &str = "close_relay_prestop_left";

/// The request header that carries the kubelet's preStop hook and its token (`drain.prestop`).
pub const PRESTOP_HEADER: &str = "x-close-relay-prestop";
