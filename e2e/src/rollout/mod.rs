//! The rolling restart that gives an ALB 503s behind an Istio sidecar, rebuilt with real
//! processes on 127.0.0.1:
//! load client -> nginx (the ALB: keep-alive pool, `Connection` cleared, no retries) ->
//! kube-proxy (a TCP forwarder choosing a pod per NEW connection, established ones pinned) ->
//! pod = Envoy sidecar (inbound listener like Istio's, with or without close-relay) -> app.
//! A Deployment-style restart (maxSurge 1) replaces pod A by pod B under steady load.
//!
//! In pieces, by what each does, each depending only on those above it:
//! [`spec`] (what a run is), [`infra`] (the processes: kube-proxy, istiod, the kubelet, pods;
//! nginx as the ALB is [`crate::nginx`]), [`load`] (the clients), [`run`] (one restart),
//! [`report`] (why each loss, the table, the chart).

pub mod infra;
pub mod load;
pub mod report;
pub mod run;
pub mod spec;

pub use report::{chart, describe, explain, table, Cause, Explanation};
pub use run::{run, RunResult};
pub use spec::{recommended, AppMode, Column, Row, RunSpec, Setting, SidecarMode, KUBELET_HOOK_TOKEN};
