//! `/metrics`: keyfold's metrics (KMS calls, key cache, sealed keyrings,
//! rewrap rows and batches, audit write failures; docs/OBSERVABILITY.md) in
//! the Prometheus text format, on the operator's own listener
//! (`metrics_listen`), never on the tenants' port.
//!
//! The recorder is process-wide (the `metrics` facade has one global
//! recorder): the first service started in a process installs it, and
//! every later one serves the same page.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The process's recorder, once installed (`None`: another recorder was
/// installed first, by the host).
static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder, once per process.
fn handle() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => {
                // Histograms are drained into the page by upkeep.
                let upkeep = handle.clone();
                std::thread::spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                });
                Some(handle)
            }
            Err(e) => {
                crate::error::operator_log(format_args!(
                    "cannot install the Prometheus recorder (another metrics recorder is installed?): {e}"
                ));
                None
            }
        })
        .clone()
}

/// Binds `addr` and serves `GET /metrics` until `stop` becomes `true`.
///
/// # Errors
/// Bind failures; no recorder could be installed.
pub(crate) async fn serve(
    addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    let handle = handle().ok_or_else(|| {
        std::io::Error::other("no Prometheus recorder: another metrics recorder is installed")
    })?;
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let page = handle.render();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    page,
                )
                    .into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    });
    Ok((bound, server))
}
