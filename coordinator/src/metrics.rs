//! Prometheus metrics: `GET /metrics` in the Prometheus text format (encoded by the
//! `prometheus-client` crate) on a plain-HTTP listener of its own (`metrics_listen`), so a
//! scraper needs neither the coordinator's TLS nor a token, and the gRPC port stays gRPC.
//!
//! What is exported:
//! - `bt_rpc_requests_total{method, code}` and `bt_rpc_duration_seconds{method}` (time to the
//!   response headers), recorded by [`RpcMetricsLayer`] behind the authentication layer, so only
//!   authenticated calls are counted; `method` is one of the closed set of the services' methods
//!   ([`method_label`]: anything else is `unknown`) and `code` a gRPC status code, so no caller can
//!   grow the page with made-up paths; calls the authentication layer refused are counted by
//!   reason only, in `bt_rpc_refused_total{reason}`;
//! - at scrape time, from the coordinator's state: `bt_jobs{state}`, `bt_queue_length`,
//!   `bt_workers{state}`, `bt_devices`, `bt_devices_busy`, and per running job
//!   (`job_id`, `name` labels) the latest `bt_job_step`, `bt_job_loss`, `bt_job_on_diag`,
//!   `bt_job_off_diag_scaled`, `bt_job_mean_diag`, `bt_job_images_per_second`.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bt_proto::{Job, JobState, Worker, WorkerState};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A label value, escaped as the exposition format requires whatever it holds (the
/// `prometheus-client` crate writes label values verbatim): backslash, double quote and line feed
/// become `\\`, `\"` and `\n`. Every label of every bt metric is one of these, so a job name like
/// `evil"} forged 1` stays inside its quotes.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct LabelValue(pub String);

impl From<&str> for LabelValue {
    fn from(s: &str) -> Self {
        LabelValue(s.to_string())
    }
}

impl From<String> for LabelValue {
    fn from(s: String) -> Self {
        LabelValue(s)
    }
}

/// `s` escaped for a label value of the text exposition format.
pub fn escape_label_value(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['\\', '"', '\n']) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(&escape_label_value(&self.0))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: LabelValue,
    code: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: LabelValue,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    job_id: LabelValue,
    name: LabelValue,
}

/// The `method` label of a request path: the path itself when it is one of the closed set of
/// methods this coordinator serves (bt's own, in [`crate::auth::POLICY`], and the probes'), else
/// `unknown`.
pub fn method_label(path: &str) -> &str {
    if crate::auth::POLICY.iter().any(|(p, _)| *p == path) {
        return path;
    }
    const PROBES: &[&str] = &[
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ];
    PROBES
        .iter()
        .find(|p| **p == path)
        .copied()
        .unwrap_or("unknown")
}

/// The `code` label: a gRPC status code is a number from 0 to 16; anything else a peer could put
/// in a header is `other`.
fn code_label(code: &str) -> &str {
    match code.parse::<u8>() {
        Ok(0..=16) => code,
        _ if code == "transport" => code,
        _ => "other",
    }
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric, registered once.
pub struct Metrics {
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: Family<MethodLabels, Histogram>,
    rpc_refused: Family<ReasonLabels, Counter>,
    jobs: Family<StateLabels, Gauge>,
    queue_length: Gauge,
    workers: Family<StateLabels, Gauge>,
    devices: Gauge,
    devices_busy: Gauge,
    job_step: Family<JobLabels, Gauge>,
    job_loss: Family<JobLabels, FloatGauge>,
    job_on_diag: Family<JobLabels, FloatGauge>,
    job_off_diag_scaled: Family<JobLabels, FloatGauge>,
    job_mean_diag: Family<JobLabels, FloatGauge>,
    job_images_per_second: Family<JobLabels, FloatGauge>,
    /// Serializes refresh + encode, so one scrape never mixes two refreshes.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The job states counted by `bt_jobs`, with their label values.
const JOB_STATES: [(JobState, &str); 7] = [
    (JobState::Queued, "queued"),
    (JobState::Scheduled, "scheduled"),
    (JobState::Running, "running"),
    (JobState::Restarting, "restarting"),
    (JobState::Succeeded, "succeeded"),
    (JobState::Failed, "failed"),
    (JobState::Cancelled, "cancelled"),
];

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "bt_rpc_requests",
            "gRPC requests by method and status code",
            rpc_requests.clone(),
        );
        let rpc_duration = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "bt_rpc_duration_seconds",
            "gRPC time to the response headers, by method",
            rpc_duration.clone(),
        );
        let rpc_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "bt_rpc_refused",
            "gRPC calls refused by authentication, by reason (unauthenticated, permission_denied)",
            rpc_refused.clone(),
        );
        let jobs = Family::<StateLabels, Gauge>::default();
        registry.register("bt_jobs", "Jobs by state", jobs.clone());
        let queue_length = Gauge::default();
        registry.register(
            "bt_queue_length",
            "Jobs waiting for devices (queued or restarting)",
            queue_length.clone(),
        );
        let workers = Family::<StateLabels, Gauge>::default();
        registry.register("bt_workers", "Worker daemons by state", workers.clone());
        let devices = Gauge::default();
        registry.register(
            "bt_devices",
            "Devices offered by online workers",
            devices.clone(),
        );
        let devices_busy = Gauge::default();
        registry.register(
            "bt_devices_busy",
            "Devices of online workers running a trainer",
            devices_busy.clone(),
        );
        let mut job_gauge = |name: &str, help: &str| {
            let f = Family::<JobLabels, FloatGauge>::default();
            registry.register(name, help, f.clone());
            f
        };
        let job_loss = job_gauge("bt_job_loss", "Latest Barlow Twins loss of a running job");
        let job_on_diag = job_gauge(
            "bt_job_on_diag",
            "Latest on-diagonal term, sum of (1 - C_ii)^2",
        );
        let job_off_diag_scaled = job_gauge(
            "bt_job_off_diag_scaled",
            "Latest off-diagonal term times lambda",
        );
        let job_mean_diag = job_gauge("bt_job_mean_diag", "Latest mean C_ii");
        let job_images_per_second = job_gauge(
            "bt_job_images_per_second",
            "Latest training throughput of a running job",
        );
        let job_step = Family::<JobLabels, Gauge>::default();
        registry.register(
            "bt_job_step",
            "Latest step of a running job",
            job_step.clone(),
        );
        Metrics {
            registry,
            rpc_requests,
            rpc_duration,
            rpc_refused,
            jobs,
            queue_length,
            workers,
            devices,
            devices_busy,
            job_step,
            job_loss,
            job_on_diag,
            job_off_diag_scaled,
            job_mean_diag,
            job_images_per_second,
            scrape: Mutex::new(()),
        }
    }

    /// Counts one RPC to `path` (labelled by [`method_label`]) that ended with `code`.
    pub fn record_rpc(&self, path: &str, code: &str, seconds: f64) {
        let method = LabelValue::from(method_label(path));
        self.rpc_requests
            .get_or_create(&RpcLabels {
                method: method.clone(),
                code: code_label(code).into(),
            })
            .inc();
        self.rpc_duration
            .get_or_create(&MethodLabels { method })
            .observe(seconds);
    }

    /// Counts one call the authentication layer refused (`code`: the gRPC status it got).
    pub fn record_refused(&self, code: tonic::Code) {
        let reason = match code {
            tonic::Code::Unauthenticated => "unauthenticated",
            tonic::Code::PermissionDenied => "permission_denied",
            _ => "other",
        };
        self.rpc_refused
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Sets the state gauges from the jobs and workers as the service shows them, then encodes.
    pub fn render(&self, jobs: &[Job], workers: &[Worker]) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        for (state, label) in JOB_STATES {
            let n = jobs.iter().filter(|j| j.state() == state).count();
            self.jobs
                .get_or_create(&StateLabels {
                    state: label.into(),
                })
                .set(n as i64);
        }
        let queued = jobs
            .iter()
            .filter(|j| matches!(j.state(), JobState::Queued | JobState::Restarting))
            .count();
        self.queue_length.set(queued as i64);
        for (state, label) in [(WorkerState::Online, "online"), (WorkerState::Lost, "lost")] {
            let n = workers.iter().filter(|w| w.state() == state).count();
            self.workers
                .get_or_create(&StateLabels {
                    state: label.into(),
                })
                .set(n as i64);
        }
        let online: Vec<&Worker> = workers
            .iter()
            .filter(|w| w.state() == WorkerState::Online)
            .collect();
        self.devices
            .set(online.iter().map(|w| w.devices.len()).sum::<usize>() as i64);
        self.devices_busy.set(
            online
                .iter()
                .map(|w| i64::from(w.busy_devices))
                .sum::<i64>(),
        );

        // Per-job series exist only for running jobs: cleared, then set again.
        self.job_step.clear();
        for f in [
            &self.job_loss,
            &self.job_on_diag,
            &self.job_off_diag_scaled,
            &self.job_mean_diag,
            &self.job_images_per_second,
        ] {
            f.clear();
        }
        for j in jobs.iter().filter(|j| j.state() == JobState::Running) {
            let Some(m) = &j.last_metrics else { continue };
            let l = JobLabels {
                job_id: j.id.as_str().into(),
                name: j.name.as_str().into(),
            };
            self.job_step.get_or_create(&l).set(m.step as i64);
            self.job_loss.get_or_create(&l).set(m.loss);
            self.job_on_diag.get_or_create(&l).set(m.on_diag);
            self.job_off_diag_scaled
                .get_or_create(&l)
                .set(m.off_diag_scaled);
            self.job_mean_diag.get_or_create(&l).set(m.mean_diag);
            self.job_images_per_second
                .get_or_create(&l)
                .set(m.images_per_sec);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Tower layer that records every RPC's method, gRPC status and time to headers.
#[derive(Clone)]
pub struct RpcMetricsLayer(pub Arc<Metrics>);

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_string();
        let metrics = self.metrics.clone();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            // A failed call's status is in the headers (trailers-only response); a success's
            // comes in the trailers, after the headers this layer sees: "0" (OK).
            let code = match &res {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0")
                    .to_string(),
                Err(_) => "transport".to_string(),
            };
            metrics.record_rpc(&method, &code, start.elapsed().as_secs_f64());
            res
        })
    }
}

/// Serves `GET /metrics` over plain HTTP/1.1 (hyper) on `listener` until the task is dropped;
/// `snapshot` returns the jobs and workers as the service shows them.
pub async fn serve<F, Fut>(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    snapshot: F,
) -> std::io::Result<()>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(Vec<Job>, Vec<Worker>), String>> + Send + 'static,
{
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let (sock, _) = listener.accept().await?;
        let metrics = metrics.clone();
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    let snapshot = snapshot.clone();
                    async move {
                        let text = |status: u16, body: String| {
                            http::Response::builder()
                                .status(status)
                                .header("content-type", "text/plain; charset=utf-8")
                                .body(Full::new(Bytes::from(body)))
                        };
                        let resp = match (req.method().as_str(), req.uri().path()) {
                            ("GET", "/metrics") => match snapshot().await {
                                Ok((jobs, workers)) => http::Response::builder()
                                    .header(
                                        "content-type",
                                        "text/plain; version=0.0.4; charset=utf-8",
                                    )
                                    .body(Full::new(Bytes::from(metrics.render(&jobs, &workers)))),
                                Err(e) => text(503, format!("state unavailable: {e}\n")),
                            },
                            ("GET", "/") => {
                                text(200, "bt coordinator metrics: GET /metrics\n".into())
                            }
                            ("GET", _) => text(404, "not found\n".into()),
                            _ => text(405, "only GET\n".into()),
                        };
                        Ok::<_, Infallible>(resp.unwrap_or_else(|_| {
                            http::Response::new(Full::new(Bytes::from_static(b"internal error\n")))
                        }))
                    }
                });
            let io = hyper_util::rt::TokioIo::new(sock);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(io, svc);
            let _ = conn.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bt_proto::{Device, TrainMetrics};

    fn job(id: &str, state: JobState, step: u64) -> Job {
        let mut j = Job {
            id: id.into(),
            name: format!("job-{id}"),
            last_metrics: Some(TrainMetrics {
                step,
                loss: 12.5,
                on_diag: 2.0,
                off_diag_scaled: 10.5,
                mean_diag: 0.9,
                images_per_sec: 321.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        j.set_state(state);
        j
    }

    #[test]
    fn the_text_format_parses_and_carries_the_state() {
        let m = Metrics::new();
        m.record_rpc("/bt.v1.JobService/ListJobs", "0", 0.002);
        m.record_rpc("/bt.v1.JobService/ListJobs", "0", 0.004);
        m.record_rpc("/bt.v1.JobService/SubmitJob", "3", 0.001);
        let mut w = Worker {
            id: "w1".into(),
            devices: vec![Device::default(), Device::default()],
            busy_devices: 1,
            ..Default::default()
        };
        w.set_state(WorkerState::Online);
        let jobs = vec![
            job("a", JobState::Running, 40),
            job("b", JobState::Queued, 0),
            job("c", JobState::Succeeded, 100),
        ];
        let text = m.render(&jobs, &[w]);
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
            let s = scrape
                .samples
                .iter()
                .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .unwrap_or_else(|| panic!("no sample {name} {label:?} in\n{text}"));
            match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{name}: {other:?}"),
            }
        };
        assert_eq!(value("bt_jobs", Some(("state", "running"))), 1.0);
        assert_eq!(value("bt_jobs", Some(("state", "queued"))), 1.0);
        assert_eq!(value("bt_jobs", Some(("state", "failed"))), 0.0);
        assert_eq!(value("bt_queue_length", None), 1.0);
        assert_eq!(value("bt_workers", Some(("state", "online"))), 1.0);
        assert_eq!(value("bt_devices", None), 2.0);
        assert_eq!(value("bt_devices_busy", None), 1.0);
        assert_eq!(value("bt_job_step", Some(("job_id", "a"))), 40.0);
        assert_eq!(value("bt_job_loss", Some(("job_id", "a"))), 12.5);
        assert_eq!(
            value("bt_job_images_per_second", Some(("job_id", "a"))),
            321.0
        );
        assert!(
            !scrape
                .samples
                .iter()
                .any(|s| s.metric == "bt_job_loss" && s.labels.get("job_id") == Some("c")),
            "a finished job has no per-job series"
        );
        assert_eq!(
            value(
                "bt_rpc_requests_total",
                Some(("method", "/bt.v1.JobService/ListJobs"))
            ),
            2.0
        );
        assert_eq!(value("bt_rpc_requests_total", Some(("code", "3"))), 1.0);
    }

    /// The listener answers a real HTTP GET with the text format, and other paths with 404.
    #[tokio::test]
    async fn the_listener_serves_metrics_over_http() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let m = Arc::new(Metrics::new());
        let task = tokio::spawn(serve(l, m, || async {
            Ok((vec![job("a", JobState::Running, 3)], Vec::new()))
        }));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.contains("bt_job_step{job_id=\"a\",name=\"job-a\"} 3"),
            "{ok}"
        );
        let missing = get("/nope").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        task.abort();
    }

    /// Every metric the Grafana dashboard in deploy/ queries is one the coordinator exports.
    #[test]
    fn the_grafana_dashboard_queries_exported_metrics() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/bt.json");
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let m = Metrics::new();
        m.record_rpc("/bt.v1.JobService/ListJobs", "0", 0.001);
        let text = m.render(&[job("a", JobState::Running, 1)], &[]);
        let exported: std::collections::BTreeSet<String> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_string)
            .collect();
        let mut queried = 0;
        for p in dash["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("bt_") {
                        queried += 1;
                        assert!(
                            exported.contains(word),
                            "{word} (panel {}) is not exported",
                            p["title"]
                        );
                    }
                }
            }
        }
        assert!(queried >= 10, "only {queried} metric references found");
    }
}
