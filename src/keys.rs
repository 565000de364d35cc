//! Every name the module shares beyond one context, in one place: the shared-data keys (one
//! record each, all VMs of the plugin read and compare-and-swap it; the codec beside each), the
//! queue names, and the connection's filter-state property.

/// The pod's drain state: per source, until when it is on ([`crate::drain::DrainState`]).
pub const DRAIN_STATE: &str = "close_relay.drain";
/// The app's recent `Connection: close` answers, for `app_closes` ([`crate::drain::Window`]).
pub const APP_CLOSES: &str = "close_relay.app_closes";
/// preStop hooks held pod-wide, by the HTTP VMs (one u64 word, [`crate::prestop`]).
pub const PRESTOP_HOOKS: &str = "close_relay.prestop.hooks";
/// Wake-queue tokens of every network root, woken when a drain begins (u64 words,
/// [`crate::drain::encode_u64s`]).
pub const WAKE_TOKENS: &str = "close_relay.wake";
/// When the next sidecar poll is due; the worker whose CAS moves it polls (one u64 word).
pub const SIDECAR_POLL: &str = "close_relay.poll.sidecar";
/// The last sidecar `/stats` read and when it was taken
/// ([`crate::drain::DrainStats::encode_read`]).
pub const SIDECAR_STATS: &str = "close_relay.sidecar.stats";
/// When the next app readiness probe is due (one u64 word).
pub const READINESS_POLL: &str = "close_relay.poll.readiness";
/// Readiness probes failed in a row (one u64 word).
pub const READINESS_FAILURES: &str = "close_relay.readiness.failures";

/// Set once a lean network role has seen rescue's attempt count on a response: the pod's
/// inbound route is rescue's (one u64 word, 1).
pub const RESCUE_SEEN: &str = "close_relay.rescue_seen";

/// Each network root's wake queue is this prefix and a nonce ([`crate::link::Note`] items).
pub const WAKE_QUEUE_PREFIX: &str = "close_relay.wake.";

/// The connection filter-state key through which the network role announces itself and its
/// connection's address ([`crate::link::Address`]: its VM's queue and a nonce) to the HTTP
/// role, across VMs too.
pub const ADDRESS_PROPERTY: &str = "close_relay_address";

/// The request header that carries the kubelet's preStop hook and its token (`drain.prestop`).
pub const PRESTOP_HEADER: &str = "x-close-relay-prestop";
