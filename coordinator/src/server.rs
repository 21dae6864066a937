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
use crate::config::{CoordinatorConfig, DashboardMode, TlsConfig};
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

/// The gRPC listener's connections with TCP keepalive (a daemon whose node vanished without a
/// FIN or RST is dropped even when HTTP/2 pings cannot be written) and no Nagle delay. The
/// builder's `tcp_keepalive` applies only to listeners tonic binds itself.
fn keepalive_incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(bt_proto::client::TCP_KEEPALIVE))
        .with_keepalive_interval(Some(bt_proto::client::TCP_KEEPALIVE_INTERVAL))
        .with_keepalive_retries(Some(bt_proto::client::TCP_KEEPALIVE_RETRIES))
}

/// The main loop (liveness ticks and scheduling passes, under the core's lock) must come round at
/// least this often; past it the health service's overall status (`""`, what a kubelet's gRPC
/// liveness probe asks without a service name) turns NOT_SERVING, so a coordinator stuck on its
/// lock or its database is restarted instead of sitting there answering probes.
pub const LOOP_STALL_MS: i64 = 60_000;

/// Watches `beat` (when the main loop last came round) and sets the overall health status.
pub(crate) async fn liveness(
    health: tonic_health::server::HealthReporter,
    beat: Arc<std::sync::atomic::AtomicI64>,
    stall_ms: i64,
) {
    use tonic_health::ServingStatus;
    let mut stuck = false;
    let mut every =
        tokio::time::interval(Duration::from_millis((stall_ms / 10).clamp(10, 2000) as u64));
    loop {
        every.tick().await;
        let silent = bt_common::now_ms() - beat.load(std::sync::atomic::Ordering::Relaxed);
        let now_stuck = silent > stall_ms;
        if now_stuck != stuck {
            stuck = now_stuck;
            if stuck {
                error!(
                    silent_ms = silent,
                    "the main loop is stuck; liveness reports NOT_SERVING"
                );
                health
                    .set_service_status("", ServingStatus::NotServing)
                    .await;
            } else {
                warn!("the main loop came round again; liveness reports SERVING");
                health.set_service_status("", ServingStatus::Serving).await;
            }
        }
    }
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
    // When the main loop last came round (ms): the liveness check below reads it.
    let loop_beat = Arc::new(std::sync::atomic::AtomicI64::new(bt_common::now_ms()));
    background.spawn(liveness(health.clone(), loop_beat.clone(), LOOP_STALL_MS));
    {
        // The scheduling loop: woken on every relevant event, and by a periodic tick.
        let core = core.clone();
        let period = Duration::from_millis(config.heartbeat_interval_ms.clamp(50, 1000));
        let beat = loop_beat;
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
                beat.store(bt_common::now_ms(), std::sync::atomic::Ordering::Relaxed);
            }
        });
    }

    if config.retention.finished_history_days > 0 {
        // History housekeeping: at start, then hourly.
        let core = core.clone();
        background.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tick.tick().await;
                match core.call(|c| c.prune_history()).await {
                    Ok(_) => {}
                    Err(crate::Error::ShuttingDown) => return,
                    Err(e) => error!(error = %e, "pruning finished jobs' history failed"),
                }
            }
        });
    }

    if !config.backup.dir.as_os_str().is_empty() {
        // Scheduled online backups of the state database (backup.dir).
        background.spawn(crate::backup::scheduled(
            config.db_path.clone(),
            config.backup.clone(),
        ));
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
    let metrics = Arc::new(crate::metrics::Metrics::new());
    if !config.metrics_listen.is_empty() {
        let l = TcpListener::bind(&config.metrics_listen)
            .await
            .with_context(|| format!("metrics_listen: binding {}", config.metrics_listen))?;
        info!(addr = ?l.local_addr().ok(), "Prometheus metrics at /metrics (plain HTTP)");
        let core = core.clone();
        let snapshot = move || {
            let core = core.clone();
            async move {
                let jobs = core.call(|c| c.list_jobs(&[], 0)).await;
                let workers = core.call(|c| c.list_workers()).await;
                match (jobs, workers) {
                    (Ok(j), Ok(w)) => Ok((
                        j.into_iter().map(Into::into).collect(),
                        w.into_iter().map(Into::into).collect(),
                    )),
                    (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
                }
            }
        };
        let metrics = metrics.clone();
        background.spawn(async move {
            if let Err(e) = crate::metrics::serve(l, metrics, snapshot).await {
                error!(error = %e, "metrics listener failed");
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
    let front = web::FrontLayer::new(
        config.dashboard.mode == DashboardMode::On,
        &config.dashboard.cors_origins,
    )?;
    info!(dashboard = config.dashboard.mode == DashboardMode::On,
          cors_origins = ?config.dashboard.cors_origins, "gRPC-web and the dashboard on the same port");
    // Outermost first: the dashboard's files and CORS (no token), then gRPC-web → gRPC, then the
    // token check every RPC passes, native or from a browser (refusals counted by reason only),
    // then the RPC metrics of authenticated calls, labelled from the closed set of methods.
    let server = builder
        .accept_http1(true)
        .layer(front)
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(AuthLayer {
            auth,
            metrics: Some(metrics.clone()),
        })
        .layer(crate::metrics::RpcMetricsLayer(metrics))
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
        .serve_with_incoming_shutdown(keepalive_incoming(listener), async {
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

/// The web dashboard on the gRPC port: requests whose content-type is `application/grpc*` (native
/// gRPC and gRPC-web) go on to tonic; everything else is a static file of the dashboard, embedded in
/// the binary from `dashboard/dist/` (built by `npm run build` there, committed). CORS for the
/// configured origins only: without any, browsers allow only pages this coordinator served.
mod web {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http::header::{self, HeaderValue};
    use http::{Method, Request, Response, StatusCode};
    use tonic::body::Body;

    /// Path, content type, bytes.
    const ASSETS: &[(&str, &str, &[u8])] = &[
        (
            "/",
            "text/html; charset=utf-8",
            include_bytes!("../../dashboard/dist/index.html"),
        ),
        (
            "/index.html",
            "text/html; charset=utf-8",
            include_bytes!("../../dashboard/dist/index.html"),
        ),
        (
            "/app.js",
            "text/javascript; charset=utf-8",
            include_bytes!("../../dashboard/dist/app.js"),
        ),
        (
            "/app.css",
            "text/css; charset=utf-8",
            include_bytes!("../../dashboard/dist/app.css"),
        ),
    ];

    /// Request headers a gRPC-web client sends (allowed in preflights).
    const ALLOW_HEADERS: &str = "authorization, content-type, x-grpc-web, x-user-agent, grpc-timeout, connect-protocol-version, connect-timeout-ms";
    /// Response headers a gRPC-web client must read (trailers-only responses carry the status here).
    const EXPOSE_HEADERS: &str = "grpc-status, grpc-message, grpc-status-details-bin";

    #[derive(Clone)]
    pub struct FrontLayer {
        dashboard: bool,
        origins: Arc<Vec<HeaderValue>>,
    }

    impl FrontLayer {
        pub fn new(dashboard: bool, origins: &[String]) -> anyhow::Result<Self> {
            let origins = origins
                .iter()
                .map(|o| {
                    HeaderValue::from_str(o).map_err(|_| {
                        anyhow::anyhow!("dashboard.cors_origins: {o:?} is not a valid header value")
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(FrontLayer {
                dashboard,
                origins: Arc::new(origins),
            })
        }
    }

    impl<S> tower_layer::Layer<S> for FrontLayer {
        type Service = Front<S>;
        fn layer(&self, inner: S) -> Front<S> {
            Front {
                inner,
                cfg: self.clone(),
            }
        }
    }

    #[derive(Clone)]
    pub struct Front<S> {
        inner: S,
        cfg: FrontLayer,
    }

    type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

    fn respond(
        status: StatusCode,
        headers: &[(header::HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Response<Body> {
        let mut r = Response::new(Body::new(http_body_util::Full::new(body)));
        *r.status_mut() = status;
        for (k, v) in headers {
            r.headers_mut().insert(k.clone(), v.clone());
        }
        r
    }

    /// The static file for `req`, 404 for an unknown path, 405 for anything but GET and HEAD.
    pub fn static_file<B>(req: &Request<B>, dashboard: bool) -> Response<Body> {
        let text = HeaderValue::from_static("text/plain; charset=utf-8");
        if !dashboard {
            return respond(
                StatusCode::NOT_FOUND,
                &[(header::CONTENT_TYPE, text)],
                Bytes::from_static(b"the dashboard is off (dashboard.mode = off)\n"),
            );
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return respond(
                StatusCode::METHOD_NOT_ALLOWED,
                &[
                    (header::CONTENT_TYPE, text),
                    (header::ALLOW, HeaderValue::from_static("GET, HEAD")),
                ],
                Bytes::new(),
            );
        }
        let Some((_, ctype, bytes)) = ASSETS.iter().find(|(p, _, _)| *p == req.uri().path()) else {
            return respond(
                StatusCode::NOT_FOUND,
                &[(header::CONTENT_TYPE, text)],
                Bytes::from_static(b"not found\n"),
            );
        };
        let body = if req.method() == Method::HEAD {
            Bytes::new()
        } else {
            Bytes::from_static(bytes)
        };
        respond(
            StatusCode::OK,
            &[
                (header::CONTENT_TYPE, HeaderValue::from_static(ctype)),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
                (
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static("default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"),
                ),
            ],
            body,
        )
    }

    fn is_grpc<B>(req: &Request<B>) -> bool {
        req.headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"))
    }

    impl<S, B> tower_service::Service<Request<B>> for Front<S>
    where
        S: tower_service::Service<Request<B>, Response = Response<Body>>,
        S::Future: Send + 'static,
    {
        type Response = Response<Body>;
        type Error = S::Error;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, req: Request<B>) -> Self::Future {
            // The request's origin when it is one of the configured CORS origins.
            let allowed = req
                .headers()
                .get(header::ORIGIN)
                .filter(|o| self.cfg.origins.iter().any(|a| a == *o))
                .cloned();
            if req.method() == Method::OPTIONS {
                // A CORS preflight: allowed origins get the grants, others nothing (the browser
                // then refuses the call).
                let mut h = vec![(header::VARY, HeaderValue::from_static("origin"))];
                if let Some(o) = allowed {
                    h.extend([
                        (header::ACCESS_CONTROL_ALLOW_ORIGIN, o),
                        (
                            header::ACCESS_CONTROL_ALLOW_METHODS,
                            HeaderValue::from_static("POST, GET, OPTIONS"),
                        ),
                        (
                            header::ACCESS_CONTROL_ALLOW_HEADERS,
                            HeaderValue::from_static(ALLOW_HEADERS),
                        ),
                        (
                            header::ACCESS_CONTROL_EXPOSE_HEADERS,
                            HeaderValue::from_static(EXPOSE_HEADERS),
                        ),
                        (
                            header::ACCESS_CONTROL_MAX_AGE,
                            HeaderValue::from_static("600"),
                        ),
                    ]);
                }
                let r = respond(StatusCode::NO_CONTENT, &h, Bytes::new());
                return Box::pin(async move { Ok(r) });
            }
            if !is_grpc(&req) {
                let r = static_file(&req, self.cfg.dashboard);
                return Box::pin(async move { Ok(r) });
            }
            let fut = self.inner.call(req);
            Box::pin(async move {
                let mut r = fut.await?;
                if let Some(o) = allowed {
                    let h = r.headers_mut();
                    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
                    h.insert(
                        header::ACCESS_CONTROL_EXPOSE_HEADERS,
                        HeaderValue::from_static(EXPOSE_HEADERS),
                    );
                    h.append(header::VARY, HeaderValue::from_static("origin"));
                }
                Ok(r)
            })
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn get(path: &str) -> Request<()> {
            Request::builder().uri(path).body(()).unwrap()
        }

        #[test]
        fn serves_the_embedded_files_only() {
            let r = static_file(&get("/"), true);
            assert_eq!(r.status(), StatusCode::OK);
            assert!(r.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html"));
            assert_eq!(static_file(&get("/app.js"), true).status(), StatusCode::OK);
            assert_eq!(
                static_file(&get("/../Cargo.toml"), true).status(),
                StatusCode::NOT_FOUND
            );
            assert_eq!(
                static_file(&get("/"), false).status(),
                StatusCode::NOT_FOUND
            );
            let post = Request::builder().method("POST").uri("/").body(()).unwrap();
            assert_eq!(
                static_file(&post, true).status(),
                StatusCode::METHOD_NOT_ALLOWED
            );
        }

        #[test]
        fn grpc_is_told_by_content_type() {
            let mut r = get("/bt.v1.JobService/ListJobs");
            assert!(!is_grpc(&r));
            for ct in [
                "application/grpc",
                "application/grpc+proto",
                "application/grpc-web+proto",
                "application/grpc-web-text",
            ] {
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
                assert!(is_grpc(&r), "{ct}");
            }
        }
    }
}

#[cfg(test)]
mod liveness_tests {
    use super::*;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    /// The overall health status a kubelet's liveness probe reads turns NOT_SERVING when the main
    /// loop stops coming round, and SERVING again when it does.
    #[tokio::test]
    async fn liveness_fails_while_the_main_loop_is_stuck() {
        let (health, svc) = tonic_health::server::health_reporter();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(l)),
        );
        let beat = Arc::new(std::sync::atomic::AtomicI64::new(bt_common::now_ms()));
        let watcher = tokio::spawn(liveness(health, beat.clone(), 300));
        let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let client = HealthClient::new(ch);
        let status = |mut c: HealthClient<tonic::transport::Channel>| async move {
            c.check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status()
        };
        assert_eq!(status(client.clone()).await, ServingStatus::Serving);
        // The loop stops: within the stall and a check interval, liveness fails.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(status(client.clone()).await, ServingStatus::NotServing);
        // It comes round again.
        for _ in 0..10 {
            beat.store(bt_common::now_ms(), std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert_eq!(status(client).await, ServingStatus::Serving);
        watcher.abort();
        server.abort();
    }
}
