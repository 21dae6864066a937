//! `run`: the whole coordinator on a bound listener, with health, reflection and one shutdown path.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bt_proto::job_service_server::JobServiceServer;
use bt_proto::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{error, info, warn};

use crate::auth::{AuthLayer, Authenticator};
use crate::config::{CoordinatorConfig, TlsConfig};
use crate::core::Core;
use crate::service::{JobSvc, WorkerSvc};
use crate::store::SqliteStore;

/// How long in-flight RPCs get to finish after shutdown began.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// The listener's TLS settings (None: plain TCP). Files that cannot be read are errors naming them.
fn tls_config(c: &TlsConfig) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    use anyhow::Context;
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let (Some(cert), Some(key)) = (&c.cert, &c.key) else {
        return Ok(None);
    };
    let read = |what: &str, p: &std::path::Path| {
        std::fs::read(p).with_context(|| format!("tls.{what}: cannot read {}", p.display()))
    };
    let mut tls =
        ServerTlsConfig::new().identity(Identity::from_pem(read("cert", cert)?, read("key", key)?));
    if let Some(ca) = &c.client_ca {
        // Client certificates are verified when presented; the worker service requires one.
        tls = tls
            .client_ca_root(Certificate::from_pem(read("client_ca", ca)?))
            .client_auth_optional(true);
    }
    Ok(Some(tls))
}

/// Runs the coordinator on `listener` until `shutdown` resolves, then drains with a deadline.
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    config
        .validate()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    let db_path = config.db_path.clone();
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(&db_path))
        .await?
        .with_context(|| format!("opening the state database {}", config.db_path.display()))?;
    let auth = Arc::new(
        Authenticator::new(&config.auth, config.tls.client_ca.is_some())
            .map_err(anyhow::Error::msg)?,
    );
    let tls = tls_config(&config.tls)?;
    let core = Core::new(config.clone(), Box::new(store)).context("recovering state")?;
    let addr = listener.local_addr().ok();
    info!(addr = ?addr, db = %config.db_path.display(), checkpoint_root = %config.checkpoint_root.display(),
          tls = tls.is_some(), mutual_tls = config.tls.client_ca.is_some(), "coordinator listening");

    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<JobServiceServer<JobSvc>>().await;
    health.set_serving::<WorkerServiceServer<WorkerSvc>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(bt_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(bt_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the reflection service")?;

    let mut background = tokio::task::JoinSet::new();
    {
        // The scheduling loop: woken on every relevant event, and by a periodic tick.
        let core = core.clone();
        let period = Duration::from_millis(config.heartbeat_interval_ms.clamp(50, 1000));
        background.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = core.schedule_notify.notified() => {}
                    _ = tick.tick() => {
                        match core.call(|c| c.tick()).await {
                            Ok(()) | Err(crate::Error::ShuttingDown) => {}
                            Err(e) => error!(error = %e, "liveness check failed"),
                        }
                    }
                }
                match core.call(|c| c.schedule()).await {
                    Ok(n) if n > 0 => info!(placed = n, "scheduling pass"),
                    Ok(_) => {}
                    Err(crate::Error::ShuttingDown) => return,
                    Err(e) => error!(error = %e, "scheduling pass failed"),
                }
            }
        });
    }

    if !config.health_listen.is_empty() {
        // Health only, no TLS, no token: what a kubelet's gRPC probe can reach.
        let l = TcpListener::bind(&config.health_listen)
            .await
            .with_context(|| format!("health_listen: binding {}", config.health_listen))?;
        info!(addr = ?l.local_addr().ok(), "health service listening (plain text)");
        let health_only = tonic::transport::Server::builder()
            .add_service(health_svc.clone())
            .serve_with_incoming(TcpListenerStream::new(l));
        background.spawn(async move {
            if let Err(e) = health_only.await {
                error!(error = %e, "health listener failed");
            }
        });
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("configuring TLS")?;
    }
    let max_msg = config.limits.max_message_bytes;
    let server = builder
        .layer(AuthLayer(auth))
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            JobServiceServer::new(JobSvc { core: core.clone() }).max_decoding_message_size(max_msg),
        )
        .add_service(
            WorkerServiceServer::new(WorkerSvc { core: core.clone() })
                .max_decoding_message_size(max_msg),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    let mut server = tokio::spawn(server);

    tokio::select! {
        r = &mut server => {
            core.begin_shutdown();
            background.abort_all();
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("gRPC server failed")),
                Err(e) => Err(anyhow::Error::new(e).context("gRPC server task failed")),
            };
        }
        _ = shutdown => {}
    }
    info!("shutting down: closing sessions and watchers, draining requests");
    health.set_not_serving::<JobServiceServer<JobSvc>>().await;
    health
        .set_not_serving::<WorkerServiceServer<WorkerSvc>>()
        .await;
    core.begin_shutdown();
    background.abort_all();
    let _ = stop_tx.send(());
    match tokio::time::timeout(DRAIN_DEADLINE, &mut server).await {
        Ok(Ok(Ok(()))) => info!("coordinator stopped"),
        Ok(Ok(Err(e))) => warn!(error = %e, "gRPC server ended with an error"),
        Ok(Err(e)) => warn!(error = %e, "gRPC server task failed"),
        Err(_) => {
            warn!("drain deadline passed; stopping with requests still open");
            server.abort();
        }
    }
    drop(core);
    Ok(())
}
