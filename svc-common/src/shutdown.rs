//! The future both servers stop on: the first SIGTERM or SIGINT (Ctrl-C as a fallback when the
//! signal handlers cannot be installed).

use std::future::Future;

/// Installs the SIGTERM and SIGINT handlers NOW and returns a future that completes on the
/// first of them (and logs which). Installing eagerly matters: a signal that arrives before
/// the future is first polled must not fall back to the default action (killing the process
/// without a graceful shutdown). Call it inside the Tokio runtime, before announcing readiness.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
