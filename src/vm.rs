//! Every piece of mutable state one VM keeps outside a context or a plugin instance, in one
//! place, so that what lives as long as the VM, and who may touch it, is read here.
//!
//! The rule: Envoy runs each wasm VM on one worker thread (one VM per worker and per VM key,
//! `docs/how-it-works.md`, "One VM or two"), and calls into it from that thread only, so a
//! thread-local is exactly one VM's state: no locks, nothing shared between workers. What
//! every worker and both roles must see goes through the host's shared data instead (`pod.rs`,
//! keys in `keys.rs`). What belongs to one plugin instance's contexts (its configuration, its
//! metrics, its failure streak) is in [`crate::shared::Shared`], not here.
//!
//! Native tests (`src/fake_host.rs`) rely on the same rule: cargo runs each test on its own
//! thread, so each test starts on a fresh VM; a test that drives two VMs must run them on two
//! threads. The fault-injection build's `host::fault::FAILING` follows the rule too.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use crate::conn::ConnRef;
use crate::decision::UnframedLearner;
use crate::evidence::UpstreamUse;
use crate::prestop::Hold;

thread_local! {
    /// host.rs: milliseconds since the epoch as of the last tick, free to read on the data
    /// path (idle graces, drain holds).
    pub(crate) static COARSE_NOW: Cell<u64> = const { Cell::new(0) };

    /// metrics.rs: responses counted but not yet added to `close_relay_responses_total`.
    pub(crate) static RESPONSES_UNFLUSHED: Cell<u64> = const { Cell::new(0) };

    /// pod.rs: the shared drain state as of the last refresh, for the data path.
    pub(crate) static DRAINING: Cell<bool> = const { Cell::new(false) };
    pub(crate) static APP_GOING: Cell<bool> = const { Cell::new(false) };
    /// pod.rs: this VM's own wake queue, once its network root registered one.
    pub(crate) static OWN_WAKE: Cell<Option<u32>> = const { Cell::new(None) };

    /// conn.rs: connections of this VM by address (`link::Address::text`). A connection stays
    /// on its worker, so an HTTP role that finds its address here shares the VM.
    pub(crate) static CONNS: RefCell<BTreeMap<String, ConnRef>> = const { RefCell::new(BTreeMap::new()) };
    /// network.rs: request heads a probe of Envoy's drain may still read this tick (the network
    /// root refills it each tick; arming a probe empties it).
    pub(crate) static PROBE_READS: Cell<u32> = const { Cell::new(0) };
    /// root.rs: this VM's name in the census of client connections (`census::Record::vm`).
    pub(crate) static CENSUS_ID: Cell<u64> = const { Cell::new(0) };

    /// conn.rs: this VM's network root sweeps idle connections (set once it is configured).
    pub(crate) static SWEEPING: Cell<bool> = const { Cell::new(false) };

    /// http.rs: which upstream connections answered close-delimited responses, to tell an
    /// HTTP/2 app from one that ends its connections.
    pub(crate) static LEARNER: RefCell<UnframedLearner> = RefCell::default();
    /// http.rs: this VM's upstream connections' last answers (the app's pool is per worker too).
    pub(crate) static UPSTREAM_USE: RefCell<UpstreamUse> = RefCell::default();
    /// pod.rs: the app's answers this VM saw since its last tick published them.
    pub(crate) static ANSWERS_UNPUBLISHED: Cell<u64> = const { Cell::new(0) };
    /// http.rs: requests begun in this VM, numbering them (which began after a reset).
    pub(crate) static REQUESTS_BEGUN: Cell<u64> = const { Cell::new(0) };
    /// http.rs: the missing network role was logged once.
    pub(crate) static WARNED_NO_NETWORK_ROLE: Cell<bool> = const { Cell::new(false) };
    /// network.rs: the host's missing random value was logged once.
    pub(crate) static WARNED_NO_NONCE: Cell<bool> = const { Cell::new(false) };

    /// prestop.rs: when a refused hook was last logged.
    pub(crate) static PRESTOP_WARNED_MS: Cell<Option<u64>> = const { Cell::new(None) };
    /// prestop.rs: this VM's held preStop hooks (a pod normally has one).
    pub(crate) static HOLDS: RefCell<Vec<Hold>> = const { RefCell::new(Vec::new()) };
}
