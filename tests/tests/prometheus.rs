//! Issue 32, end to end: a real Prometheus server (Debian's `prometheus` package) scrapes a real
//! coordinator that runs jobs with hostile but accepted names (quotes, braces, backslashes, a
//! literal `\n`, non-ASCII), and the page it scrapes parses: the target is up with no error,
//! every metric name is bt's own (or one of Prometheus' synthetic `up` / `scrape_*`), no series
//! was forged through a name, and each name comes back exactly as the `name` label. Names that
//! could not stay inside a label (control characters, too long, empty) are refused at submission
//! with INVALID_ARGUMENT naming the `name` field, by the coordinator itself (btctl would refuse
//! them locally first, so this test talks gRPC directly).
//!
//! Needs the `prometheus` binary on PATH (`apt-get install -y prometheus` on Debian/Ubuntu, or
//! `BT_PROMETHEUS=/path/to/prometheus`); without it the test fails and says so.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bt_proto::job_service_client::JobServiceClient;
use bt_proto::SubmitJobRequest;
use bt_tests::{free_port, wait_for, Cluster, TINY};
use serde_json::Value;

const MINUTE: Duration = Duration::from_secs(60);

/// Printable, so accepted; each would break out of an unescaped label value.
const HOSTILE: [&str; 2] = [
    r#"evil"} bt_forged_series 1 # {job_id="forged",name="x"} bt_job_step{job_id="forged"} 99"#,
    r#"back\slash "quoted" \n literal, \\ double, ünïcødé 名前 ☃ }{"#,
];

/// Refused at submission: (name, why).
fn refused_names() -> Vec<(String, &'static str)> {
    vec![
        ("x} 1\nbt_forged_series 1".into(), "line feed"),
        ("cr\rbt_forged_series 1".into(), "carriage return"),
        ("tab\there".into(), "tab"),
        ("esc\u{1b}[31mred".into(), "escape"),
        ("nul\u{0}byte".into(), "NUL"),
        ("next\u{85}line".into(), "C1 control (NEL)"),
        ("a".repeat(201), "201 characters"),
        ("   ".into(), "blank"),
    ]
}

/// `s` as a TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// TINY as a long one-rank job named `name`, reporting every step.
fn spec(name: &str) -> String {
    let body = TINY
        .replace("name = \"e2e\"", &format!("name = {}", toml_str(name)))
        .replace("world_size = 2", "world_size = 1")
        .replace("epochs = 1\n", "epochs = 1000\n")
        .replace("max_steps = 6", "max_steps = 100000")
        .replace("log_every = 2", "log_every = 1")
        .replace("every_steps = 2", "every_steps = 100000")
        .replace("knn_at_end = true", "knn_at_end = false");
    assert!(body.contains("max_steps = 100000") && body.contains("world_size = 1"));
    body
}

type Client = JobServiceClient<bt_proto::client::AuthChannel>;

async fn client(c: &Cluster) -> Client {
    let opts = bt_proto::client::ClientOptions {
        addr: c.addr.clone(),
        token: Some(
            bt_proto::client::read_token_file(&c.path("secrets/admin.token")).expect("token"),
        ),
        ca_cert: Some(c.path("secrets/ca.pem")),
        connect_timeout: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    JobServiceClient::new(opts.connect().await.expect("connect to the coordinator"))
}

/// The prometheus binary, or a failure that says how to install it.
fn prometheus_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BT_PROMETHEUS") {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("prometheus"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the `prometheus` server binary is not installed: `apt-get update && apt-get install -y \
             prometheus` (Debian/Ubuntu), or set BT_PROMETHEUS to its path"
        )
    })
}

/// A running Prometheus, killed on drop (its log printed when the test failed).
struct Prometheus {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Prometheus {
    fn start(dir: &std::path::Path, target: &str) -> Prometheus {
        let bin = prometheus_bin();
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        eprintln!(
            "{}",
            String::from_utf8_lossy(&version.stdout)
                .lines()
                .next()
                .unwrap_or("")
        );
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: bt-coordinator\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let port = free_port();
        let log = dir.join("prometheus.log");
        let f = std::fs::File::create(&log).expect("prometheus log");
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone().expect("dup")))
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Prometheus { child, log, port }
    }

    /// GET `path_and_query` of the HTTP API; the JSON `data` of a `success` answer, else None.
    fn api(&self, path_and_query: &str) -> Option<Value> {
        let body = http_get(self.port, path_and_query)?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (v["status"] == "success").then(|| v["data"].clone())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            if let Ok(text) = std::fs::read_to_string(&self.log) {
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("===== {} =====", self.log.display());
                for l in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// A plain HTTP/1.0 GET on loopback (no chunked encoding, the server closes); the body of a 200.
fn http_get(port: u16, path_and_query: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.")
        .then_some(())
        .filter(|_| head.split_whitespace().nth(1) == Some("200"))?;
    Some(body.to_string())
}

/// Percent-encodes a query parameter's value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_hostile_job_names_intact() {
    // fail early, before the cluster, when the server is missing
    prometheus_bin();
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let c = Cluster::start_configured(
        1,
        2,
        3000,
        &[("BT_COORDINATOR_METRICS_LISTEN", metrics_addr.as_str())],
    );
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let mut grpc = rt.block_on(client(&c));

    // Names that cannot stay inside a label: refused by the coordinator, naming the field.
    for (name, why) in refused_names() {
        let err = rt
            .block_on(grpc.submit_job(SubmitJobRequest {
                spec_toml: spec(&name),
            }))
            .expect_err(&format!("a name with a {why} must be refused"));
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{why}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with("name"),
            "{why}: the message should name the field: {}",
            err.message()
        );
        eprintln!("refused ({why}): {}", err.message());
    }

    // Hostile but printable names: accepted, and both run.
    let jobs: Vec<(String, &str)> = HOSTILE
        .iter()
        .map(|name| {
            let job = rt
                .block_on(grpc.submit_job(SubmitJobRequest {
                    spec_toml: spec(name),
                }))
                .unwrap_or_else(|e| panic!("{name:?} must be accepted: {e}"))
                .into_inner();
            assert_eq!(job.name, *name, "the name is stored as given");
            (job.id, *name)
        })
        .collect();
    for (id, _) in &jobs {
        wait_for(
            &format!("job {id} running with metrics"),
            3 * MINUTE,
            || {
                let j = c.btctl_json(&["get", id])?;
                (j["state"] == "running" && j["last_metrics"]["step"].as_u64()? >= 1).then_some(())
            },
        );
    }
    let page = http_get(metrics_port, "/metrics").expect("the coordinator's /metrics");
    assert!(
        !page.lines().any(|l| l.starts_with("bt_forged_series")),
        "a forged series on the page:\n{page}"
    );
    for (id, name) in &jobs {
        let escaped = name
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let labels = format!("{{job_id=\"{id}\",name=\"{escaped}\"}}");
        assert!(
            page.lines()
                .any(|l| l.starts_with("bt_job_step") && l.contains(&labels)),
            "no bt_job_step{labels} on the page:\n{page}"
        );
    }

    let prom = Prometheus::start(c.dir.path(), &metrics_addr);
    let started = Instant::now();
    // A few scrapes (1 s apart) of a page where both jobs have series.
    let scrapes = wait_for("3 scrapes with both jobs' series", MINUTE, || {
        let q = prom.api(&format!(
            "/api/v1/query?query={}",
            enc("count_over_time(up[5m])")
        ))?;
        let n: u64 = q["result"][0]["value"][1].as_str()?.parse().ok()?;
        let series = prom.api(&format!(
            "/api/v1/series?{}={}",
            enc("match[]"),
            enc(r#"bt_job_step{job_id!=""}"#)
        ))?;
        let ids: Vec<&str> = series
            .as_array()?
            .iter()
            .filter_map(|s| s["job_id"].as_str())
            .collect();
        (n >= 3 && jobs.iter().all(|(id, _)| ids.contains(&id.as_str()))).then_some(n)
    });
    eprintln!(
        "{scrapes} scrapes within {:?} of Prometheus starting",
        started.elapsed()
    );

    // The target is up, its last scrape parsed.
    let targets = prom.api("/api/v1/targets").expect("targets");
    let active = targets["activeTargets"].as_array().expect("activeTargets");
    assert_eq!(active.len(), 1, "{targets}");
    let t = &active[0];
    assert_eq!(t["scrapeUrl"], format!("http://{metrics_addr}/metrics"));
    assert_eq!(t["health"], "up", "{t}");
    assert_eq!(t["lastError"], "", "{t}");

    // Every metric name is bt's own or one of Prometheus' synthetic series of a scrape.
    let names = prom
        .api("/api/v1/label/__name__/values")
        .expect("metric names");
    let names: Vec<&str> = names
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_str().expect("string"))
        .collect();
    let foreign: Vec<&&str> = names
        .iter()
        .filter(|n| !(n.starts_with("bt_") || **n == "up" || n.starts_with("scrape_")))
        .collect();
    assert!(foreign.is_empty(), "foreign metric names: {foreign:?}");
    assert!(!names.contains(&"bt_forged_series"), "{names:?}");
    for want in [
        "bt_job_step",
        "bt_job_loss",
        "bt_jobs",
        "bt_rpc_requests_total",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }

    // Every per-job series carries a real job's id and its exact name.
    let series = prom
        .api(&format!(
            "/api/v1/series?{}={}",
            enc("match[]"),
            enc(r#"{job_id!=""}"#)
        ))
        .expect("series");
    let series = series.as_array().expect("array");
    for s in series {
        let id = s["job_id"].as_str().expect("job_id");
        let (_, name) = jobs
            .iter()
            .find(|(j, _)| j == id)
            .unwrap_or_else(|| panic!("a series of no job of ours: {s}"));
        assert_eq!(s["name"].as_str(), Some(*name), "{s}");
        assert_eq!(s["job"], "bt-coordinator", "{s}");
        let mut labels: Vec<&str> = s
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        labels.sort_unstable();
        assert_eq!(
            labels,
            ["__name__", "instance", "job", "job_id", "name"],
            "{s}"
        );
    }
    for (id, name) in &jobs {
        let per_job: Vec<&str> = series
            .iter()
            .filter(|s| s["job_id"] == *id)
            .filter_map(|s| s["__name__"].as_str())
            .collect();
        for m in ["bt_job_step", "bt_job_loss", "bt_job_images_per_second"] {
            assert!(per_job.contains(&m), "{m} of {name:?} missing: {per_job:?}");
        }
    }
    // The latest value Prometheus holds for each job's name is a real step.
    let q = prom
        .api(&format!("/api/v1/query?query={}", enc("bt_job_step")))
        .expect("query bt_job_step");
    let result = q["result"].as_array().expect("result");
    assert_eq!(result.len(), jobs.len(), "{q}");
    for r in result {
        let step: f64 = r["value"][1].as_str().unwrap().parse().unwrap();
        assert!(step >= 1.0, "{r}");
    }
    let samples = prom
        .api(&format!(
            "/api/v1/query?query={}",
            enc(r#"scrape_samples_scraped{job="bt-coordinator"}"#)
        ))
        .and_then(|q| q["result"][0]["value"][1].as_str().map(str::to_string))
        .unwrap_or_default();
    eprintln!(
        "{} metric names, {} per-job series, {samples} samples per scrape",
        names.len(),
        series.len()
    );
    for (id, _) in &jobs {
        let out = c.btctl(&["cancel", id]);
        assert!(out.status.success(), "{}", bt_tests::stderr(&out));
    }
}
