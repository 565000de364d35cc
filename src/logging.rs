//! The `log` crate routed to the host's log, filtered at the host's level before any message is
//! formatted, and a panic's message logged before the trap it becomes.

use proxy_wasm::types::LogLevel;

use crate::host;

/// Logs through the host. Installed once per VM by [`init`].
struct HostLogger;

impl log::Log for HostLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Trace => LogLevel::Trace,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Info => LogLevel::Info,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Error => LogLevel::Error,
        };
        host::log(level, &record.args().to_string());
    }

    fn flush(&self) {}
}

static LOGGER: HostLogger = HostLogger;

/// Routes `log` to the host and a panic's message to its log (the SDK's own logger unwraps the
/// log call's status). Once per VM, at start.
pub fn init() {
    if log::set_logger(&LOGGER).is_ok() {
        std::panic::set_hook(Box::new(|info| host::log(LogLevel::Critical, &info.to_string())));
    }
    log::set_max_level(log::LevelFilter::Info);
}

/// Makes `log` calls below the host's level free: they are filtered before formatting.
pub fn follow_host_level() {
    let Some(raw) = host::log_level() else { return };
    let filter = match raw {
        0 => log::LevelFilter::Trace,
        1 => log::LevelFilter::Debug,
        2 => log::LevelFilter::Info,
        3 => log::LevelFilter::Warn,
        4 => log::LevelFilter::Error,
        _ => log::LevelFilter::Off,
    };
    log::set_max_level(filter);
}
