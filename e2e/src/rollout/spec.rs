//! What one run of the rig is: the app and how it stops, the sidecar and how it stops, the
//! row (filter and setting), the load; the report's rows and columns.

use serde_json::json;

use crate::servers::Server;

/// How the app shuts down on SIGTERM (see `app --shutdown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppMode {
    CloseHeader,
    CloseIdle,
    /// Serves on for `late_close_ms` after its signal, then `CloseHeader` (not the preStop hook).
    LateClose,
    /// A real app server (`crate::servers`), stopped with its container's signal.
    Real(Server),
}

impl AppMode {
    /// The rig's own app in its three shutdown modes.
    pub const ALL: [AppMode; 3] = [AppMode::CloseHeader, AppMode::CloseIdle, AppMode::LateClose];
    pub const REAL: [AppMode; 5] = [
        AppMode::Real(Server::Nginx),
        AppMode::Real(Server::Go),
        AppMode::Real(Server::Node),
        AppMode::Real(Server::Uvicorn),
        AppMode::Real(Server::Tomcat),
    ];
    /// The gRPC rows: a gRPC service behind an ALB speaking HTTP/2 to the pods.
    pub const GRPC: [AppMode; 1] = [AppMode::Real(Server::Grpc)];

    /// Whether the pod speaks gRPC (HTTP/2): the ALB is then HAProxy with `proto h2`
    /// ([`crate::haproxy`]), the load gRPC calls, and the sidecar talks h2c to the app.
    pub fn grpc(self) -> bool {
        self == AppMode::Real(Server::Grpc)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AppMode::CloseHeader => "close-header",
            AppMode::CloseIdle => "close-idle",
            AppMode::LateClose => "late-close",
            AppMode::Real(server) => server.as_str(),
        }
    }
}

/// What the sidecar does when the pod terminates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarMode {
    /// istio-agent: `drain_listeners?inboundonly&graceful`, wait terminationDrainDuration, stop.
    IstioAgent,
    /// Held until the app exits (EXIT_ON_ZERO_ACTIVE_CONNECTIONS, native sidecars), then stop.
    Held,
}

impl SidecarMode {
    pub const ALL: [SidecarMode; 2] = [SidecarMode::Held, SidecarMode::IstioAgent];

    pub fn as_str(self) -> &'static str {
        match self {
            SidecarMode::IstioAgent => "istio-agent drain",
            SidecarMode::Held => "held until app exit",
        }
    }
}

/// A row of the report: what the pod runs besides the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    /// A plain sidecar.
    NoFilter,
    /// close-relay with its default configuration.
    CloseRelay,
    /// close-relay with the settings docs/rollout.md recommends for this app ([`recommended`]).
    Recommended,
    /// close-relay with its defaults, and rescue (`crate::rescue`): a request the app refuses is
    /// handed to pod B.
    Rescue,
    /// The lean configuration (the network role alone, `envoyfilter/lean`) with rescue.
    Lean,
}

impl Row {
    pub const ALL: [Row; 5] = [Row::NoFilter, Row::CloseRelay, Row::Recommended, Row::Rescue, Row::Lean];

    pub fn as_str(self) -> &'static str {
        match self {
            Row::NoFilter => "no filter",
            Row::CloseRelay => "close-relay",
            Row::Recommended => "close-relay, recommended",
            Row::Rescue => "close-relay + rescue",
            Row::Lean => "lean + rescue",
        }
    }
}

/// What docs/rollout.md recommends beside close-relay's defaults, for one app and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Setting {
    /// `drain.app_closes.threshold: 1`: the app's first `Connection: close` counts as the pod
    /// going away.
    pub first_close_drains: bool,
    /// The preStop hook first tells the sidecar (`POST /healthcheck/fail` on its admin API),
    /// then sleeps: a held sidecar hears nothing else before the app stops accepting.
    pub prestop_fails_sidecar: bool,
}

impl Setting {
    pub fn describe(self) -> String {
        let mut parts = Vec::new();
        if self.first_close_drains {
            parts.push("drain.app_closes.threshold 1");
        }
        if self.prestop_fails_sidecar {
            parts.push("preStop POSTs the sidecar's healthcheck/fail before its sleep");
        }
        if parts.is_empty() {
            "the defaults".into()
        } else {
            parts.join("; ")
        }
    }
}

/// The recommended setting, from `make rollout`'s measurements (docs/rollout.md, "Your app server").
/// The rig's app answers every request in flight at SIGTERM with `Connection: close`, so its first
/// close is the earliest signal. The real servers stop within milliseconds of their signal, too
/// soon for a first close to come before the first 503, and Tomcat closes every 100th keep-alive
/// request routinely, which a threshold of 1 would take for a shutdown: they keep the defaults,
/// and a held sidecar needs its preStop to tell it.
pub fn recommended(app: AppMode, sidecar: SidecarMode, prestop: bool) -> Setting {
    match app {
        AppMode::Real(_) => Setting { first_close_drains: false, prestop_fails_sidecar: prestop && sidecar == SidecarMode::Held },
        _ => Setting { first_close_drains: true, prestop_fails_sidecar: false },
    }
}

#[derive(Debug, Clone)]
pub struct RunSpec {
    pub row: Row,
    pub close_relay: bool,
    pub setting: Setting,
    /// Overrides `drain.app_idle_grace_ms` (the idle-close race measurement).
    pub app_idle_grace_ms: Option<u64>,
    pub app: AppMode,
    pub sidecar: SidecarMode,
    /// Endpoint removal lags the SIGTERM by this much.
    pub endpoint_lag_ms: u64,
    pub rate_per_s: u64,
    pub concurrency: usize,
    /// The longest the load runs; it ends sooner, `tail_ms` after pod A's sidecar stops.
    pub duration_ms: u64,
    pub tail_ms: u64,
    /// When the rolling restart begins, from the start of the load.
    pub restart_at_ms: u64,
    /// istio-agent's terminationDrainDuration.
    pub termination_drain_ms: u64,
    pub late_close_ms: u64,
    /// A real server's preStop hook: its stop signal comes this long after the pod's SIGTERM
    /// (the rig's own app has its `late-close` mode instead).
    pub prestop_hook_ms: u64,
    /// The preStop hook is the kubelet's `httpGet` with close-relay's header and token
    /// (`drain.prestop`): the app is signalled once the sidecar answers it.
    pub kubelet_hook: bool,
    pub app_shutdown_timeout_ms: u64,
    /// Held sidecar: how long after the app exits the kubelet stops it (it notices container
    /// exits on its ~1 s PLEG relist).
    pub sidecar_stop_after_app_ms: u64,
    /// How long after an endpoint change the sidecars' service cluster has it (istiod's debounce
    /// and push): until then pod A still lists itself among the pods a rescue may go to.
    pub eds_push_lag_ms: u64,
}

impl RunSpec {
    /// One cell: `row` for `app` under `sidecar`, with a preStop hook of `prestop_hook_ms`.
    pub fn cell(row: Row, app: AppMode, sidecar: SidecarMode, prestop_hook_ms: u64) -> RunSpec {
        let setting = match row {
            Row::Recommended => recommended(app, sidecar, prestop_hook_ms > 0),
            Row::NoFilter | Row::CloseRelay | Row::Rescue | Row::Lean => Setting::default(),
        };
        RunSpec {
            row,
            close_relay: row != Row::NoFilter,
            setting,
            app_idle_grace_ms: None,
            app,
            sidecar,
            endpoint_lag_ms: 0,
            rate_per_s: 200,
            concurrency: 8,
            duration_ms: 12_000,
            tail_ms: 500,
            restart_at_ms: 2_000,
            termination_drain_ms: 5_000,
            late_close_ms: 3_000,
            prestop_hook_ms,
            kubelet_hook: false,
            app_shutdown_timeout_ms: 5_000,
            sidecar_stop_after_app_ms: 1_000,
            eds_push_lag_ms: 1_000,
        }
    }

    /// The load where the last requests on their way to a stopping app show (`make rollout`):
    /// 24 ALB connections, 1200 requests/s, all to pod A until its removal.
    pub fn heavy(self) -> RunSpec {
        RunSpec { rate_per_s: 1_200, concurrency: 24, ..self }
    }

    pub fn rescue(&self) -> bool {
        matches!(self.row, Row::Rescue | Row::Lean)
    }

    /// The recommended row is run only where it differs from the default one.
    pub fn is_redundant(&self) -> bool {
        self.row == Row::Recommended && self.setting == Setting::default()
    }

    /// The close-relay plugin configuration (HTTP role; the network role adds its role).
    pub fn relay_config(&self) -> String {
        let mut drain = serde_json::Map::new();
        if self.setting.first_close_drains {
            drain.insert("app_closes".into(), json!({"enabled": true, "threshold": 1}));
        }
        if let Some(ms) = self.app_idle_grace_ms {
            drain.insert("app_idle_grace_ms".into(), json!(ms));
        }
        // Lean has no HTTP role to answer the hook: the kubelet's request reaches the app.
        if self.kubelet_hook && self.row != Row::Lean {
            drain.insert("prestop".into(), json!({"token": KUBELET_HOOK_TOKEN}));
        }
        if drain.is_empty() {
            String::new()
        } else {
            json!({ "drain": drain }).to_string()
        }
    }

    pub fn filter_label(&self) -> String {
        match self.app_idle_grace_ms {
            Some(ms) => format!("{}, app_idle_grace_ms {ms}", self.row.as_str()),
            None => self.row.as_str().into(),
        }
    }

    pub fn column(&self) -> Column {
        Column { sidecar: self.sidecar, prestop: self.prestop_hook_ms > 0, kubelet_hook: self.kubelet_hook }
    }

    pub fn label(&self) -> String {
        let prestop = if self.kubelet_hook {
            " + kubelet preStop".to_string()
        } else if self.prestop_hook_ms > 0 {
            format!(" + preStop {} s", self.prestop_hook_ms / 1000)
        } else {
            String::new()
        };
        format!("{} | app {}{prestop} | sidecar {}", self.filter_label(), self.app.as_str(), self.sidecar.as_str())
    }
}

/// The token the kubelet-hook column's pods are configured with and its hook sends.
pub const KUBELET_HOOK_TOKEN: &str = "rollout-kubelet-prestop-token";

/// A column of the report: the sidecar mode, and whether the app has a preStop hook: a sleep
/// (`prestop`), or the kubelet's `httpGet` that close-relay answers (`kubelet_hook`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub sidecar: SidecarMode,
    pub prestop: bool,
    pub kubelet_hook: bool,
}

impl Column {
    pub const ALL: [Column; 6] = [
        Column { sidecar: SidecarMode::Held, prestop: false, kubelet_hook: false },
        Column { sidecar: SidecarMode::IstioAgent, prestop: false, kubelet_hook: false },
        Column { sidecar: SidecarMode::Held, prestop: true, kubelet_hook: false },
        Column { sidecar: SidecarMode::IstioAgent, prestop: true, kubelet_hook: false },
        Column { sidecar: SidecarMode::Held, prestop: false, kubelet_hook: true },
        Column { sidecar: SidecarMode::IstioAgent, prestop: false, kubelet_hook: true },
    ];

    pub fn as_str(self) -> &'static str {
        match (self.sidecar, self.prestop, self.kubelet_hook) {
            (SidecarMode::Held, _, true) => "held + kubelet preStop",
            (SidecarMode::IstioAgent, _, true) => "istio drain + kubelet preStop",
            (SidecarMode::Held, false, false) => "held",
            (SidecarMode::IstioAgent, false, false) => "istio drain",
            (SidecarMode::Held, true, false) => "held + preStop",
            (SidecarMode::IstioAgent, true, false) => "istio drain + preStop",
        }
    }

    /// Whether the app's stop waits for a preStop hook of either kind (the real servers only:
    /// the rig's app has its own `prestop` mode).
    pub fn has_hook(self) -> bool {
        self.prestop || self.kubelet_hook
    }
}
