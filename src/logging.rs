//! Structured logs with `tracing` on stderr (the journal under systemd), with a level that a
//! reload can change.

use std::sync::OnceLock;

use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

static HANDLE: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the subscriber once. `RUST_LOG`, when set, wins over `level`.
pub fn init(level: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")));
    let (layer, handle) = reload::Layer::new(filter);
    // Under systemd the journal adds its own timestamps.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let ok = if journal {
        tracing_subscriber::registry()
            .with(layer)
            .with(fmt.without_time())
            .try_init()
            .is_ok()
    } else {
        tracing_subscriber::registry()
            .with(layer)
            .with(fmt)
            .try_init()
            .is_ok()
    };
    if ok {
        let _ = HANDLE.set(handle);
    }
}

/// Changes the level of a running process (SIGHUP).
pub fn set_level(level: &str) {
    if let (Some(h), Ok(f)) = (HANDLE.get(), EnvFilter::try_new(level)) {
        let _ = h.reload(f);
    }
}
