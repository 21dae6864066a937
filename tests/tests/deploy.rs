//! The Kubernetes manifests, kept honest: every overlay renders, validates against the Kubernetes
//! schemas offline, passes checkov and the lint (`deploy/check.py`), and the CPU overlay's
//! containers, run exactly as rendered (command, arguments, environment; volumes, downward-API
//! fields, Services and Secrets substituted with local stand-ins), form a working cluster that
//! runs a job to success. A flag renamed in the code but not in the manifests fails here.
//!
//! Each container gets the whole environment a kubelet would give it, not only the manifest's
//! `env`: `HOSTNAME`, the `kubernetes` Service's variables, and the service-link variables of
//! every Service of the rendered namespace (`BT_COORDINATOR_SERVICE_HOST`,
//! `BT_COORDINATOR_METRICS_PORT_9090_TCP_PROTO`, ...), although the pods set
//! `enableServiceLinks: false`: a kubelet older than that field, or someone turning it back on,
//! must not stop the coordinator from starting.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bt_tests::{bin, free_port, wait_for};
use serde::Deserialize;
use serde_yaml::Value;

const MINUTE: Duration = Duration::from_secs(60);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("BT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME");
            PathBuf::from(home).join(".cache/bt/torch-2.13.0")
        });
    venv.join("bin/python")
}

/// Renders, validates and lints every overlay; returns the rendered CPU overlay.
fn checked_render(dir: &Path) -> Vec<Value> {
    let out = Command::new(venv_python())
        .arg(workspace().join("deploy/check.py"))
        .arg("--render-dir")
        .arg(dir)
        .output()
        .expect("run deploy/check.py (make test installs its dependencies)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "deploy/check.py failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for overlay in ["cpu", "gpu", "gpu-pod-network"] {
        assert!(text.contains(&format!("overlay {overlay}:")), "{text}");
    }
    let yaml = std::fs::read_to_string(dir.join("cpu.yaml")).expect("rendered cpu overlay");
    serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| Value::deserialize(d).expect("rendered YAML"))
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in the rendered overlay"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A kubelet's name for a Service or port in variable names: upper case, `-` as `_`.
fn env_name(s: &str) -> String {
    s.to_uppercase().replace('-', "_")
}

/// The variables a kubelet injects for a Service at `ip` (as `makeLinkVariables` and
/// `FromServices` in the kubelet's envvars package do): `<SVC>_SERVICE_HOST`,
/// `<SVC>_SERVICE_PORT` (the first port), `<SVC>_SERVICE_PORT_<NAME>` for each named port,
/// `<SVC>_PORT` (the first port as a URL) and, per port, `<SVC>_PORT_<P>_<PROTO>` with its
/// `_PROTO`, `_PORT` and `_ADDR`.
fn service_links(service: &Value, ip: &str) -> Vec<(String, String)> {
    let svc = env_name(service["metadata"]["name"].as_str().expect("service name"));
    let ports = service["spec"]["ports"]
        .as_sequence()
        .expect("service ports");
    let port_of = |p: &Value| p["port"].as_u64().expect("port");
    let mut out = vec![
        (format!("{svc}_SERVICE_HOST"), ip.to_string()),
        (
            format!("{svc}_SERVICE_PORT"),
            port_of(&ports[0]).to_string(),
        ),
    ];
    for p in ports {
        if let Some(name) = p["name"].as_str() {
            out.push((
                format!("{svc}_SERVICE_PORT_{}", env_name(name)),
                port_of(p).to_string(),
            ));
        }
    }
    for (i, p) in ports.iter().enumerate() {
        let proto = p["protocol"].as_str().unwrap_or("TCP");
        let lower = proto.to_lowercase();
        let port = port_of(p);
        let url = format!("{lower}://{ip}:{port}");
        if i == 0 {
            out.push((format!("{svc}_PORT"), url.clone()));
        }
        let pre = format!("{svc}_PORT_{port}_{proto}");
        out.push((format!("{pre}_PROTO"), lower));
        out.push((format!("{pre}_PORT"), port.to_string()));
        out.push((format!("{pre}_ADDR"), ip.to_string()));
        out.push((pre, url));
    }
    out
}

/// The environment a kubelet gives every container of a pod named `hostname` in the rendered
/// namespace before the container's own `env`: the service links of every Service of the
/// namespace with a cluster IP and of the `kubernetes` Service, and `HOSTNAME`.
fn kubelet_env(docs: &[Value], hostname: &str) -> Vec<(String, String)> {
    let api: Value = serde_yaml::from_str(
        "metadata: { name: kubernetes }\nspec: { ports: [{ name: https, port: 443 }] }",
    )
    .unwrap();
    let mut env = service_links(&api, "10.96.0.1");
    let services = docs.iter().filter(|d| d["kind"] == "Service");
    for (i, s) in services.enumerate() {
        if s["spec"]["clusterIP"] == "None" {
            continue; // headless: no variables
        }
        env.extend(service_links(s, &format!("10.96.0.{}", 10 + i)));
    }
    env.push(("HOSTNAME".into(), hostname.into()));
    env
}

/// One container of a rendered workload, made runnable on this machine.
struct Runnable {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// The container's command, arguments and environment with every path under a volume mount moved
/// to a local directory (`dirs`: volume name → directory), and each `(from, to)` of `subst`
/// applied to the arguments.
fn runnable(
    workload: &Value,
    dirs: &BTreeMap<String, PathBuf>,
    subst: &[(String, String)],
    fields: &BTreeMap<&str, String>,
    kubelet: Vec<(String, String)>,
) -> Runnable {
    let pod = &workload["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let command = strs(&c["command"]);
    let exe = Path::new(&command[0])
        .file_name()
        .expect("command")
        .to_string_lossy()
        .into_owned();
    // Longest mount path first, so nested mounts win.
    let mut mounts: Vec<(String, PathBuf)> = c["volumeMounts"]
        .as_sequence()
        .expect("volumeMounts")
        .iter()
        .map(|m| {
            let name = m["name"].as_str().expect("mount name").to_string();
            let to = dirs
                .get(&name)
                .unwrap_or_else(|| panic!("no local stand-in for volume {name}"))
                .clone();
            (m["mountPath"].as_str().expect("mountPath").to_string(), to)
        })
        .collect();
    mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    // A flag's value (`--db=/state/x`) or a whole value (`/tmp`) under a mount moves with it.
    let localize = |s: &str| -> String {
        let mut out = s.to_string();
        for (from, to) in subst {
            out = out.replace(from, to);
        }
        let (flag, value) = match out.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (format!("{f}="), v.to_string()),
            _ => (String::new(), out.clone()),
        };
        for (mount, dir) in &mounts {
            if let Some(rest) = value.strip_prefix(mount.as_str()) {
                if rest.is_empty() || rest.starts_with('/') {
                    return format!("{flag}{}{rest}", dir.display());
                }
            }
        }
        out
    };
    let args = command[1..]
        .iter()
        .chain(strs(&c["args"]).iter())
        .map(|a| localize(a))
        .collect();
    // The kubelet's variables first; the container's own override them.
    let mut env = kubelet;
    for e in c["env"].as_sequence().into_iter().flatten() {
        let name = e["name"].as_str().expect("env name").to_string();
        let value = if let Some(v) = e["value"].as_str() {
            localize(v)
        } else {
            let path = e["valueFrom"]["fieldRef"]["fieldPath"]
                .as_str()
                .unwrap_or_else(|| panic!("env {name}: only values and fieldRefs are supported"));
            fields
                .get(path)
                .unwrap_or_else(|| panic!("env {name}: no test value for {path}"))
                .clone()
        };
        env.retain(|(k, _)| *k != name);
        env.push((name, value));
    }
    Runnable {
        program: bin(&exe),
        args,
        env,
    }
}

/// Local directories for a pod's volumes: shared ones (PVCs) from `shared`, host paths as they
/// are, Secrets filled from `secrets` by their items, everything else (emptyDir) fresh in `dir`.
fn volumes(
    workload: &Value,
    dir: &Path,
    shared: &BTreeMap<String, PathBuf>,
    secrets: &Path,
) -> BTreeMap<String, PathBuf> {
    let pod = &workload["spec"]["template"]["spec"];
    let mut out = BTreeMap::new();
    for v in pod["volumes"].as_sequence().expect("volumes") {
        let name = v["name"].as_str().expect("volume name").to_string();
        let local = if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
            shared
                .get(claim)
                .unwrap_or_else(|| panic!("no stand-in for claim {claim}"))
                .clone()
        } else if let Some(p) = v["hostPath"]["path"].as_str() {
            PathBuf::from(p)
        } else if v["secret"].is_mapping() {
            let d = dir.join(format!("secret-{name}"));
            std::fs::create_dir_all(&d).unwrap();
            for item in v["secret"]["items"].as_sequence().expect("secret items") {
                let key = item["key"].as_str().expect("key");
                let path = item["path"].as_str().expect("path");
                std::fs::copy(secrets.join(key), d.join(path))
                    .unwrap_or_else(|e| panic!("secret key {key}: {e}"));
            }
            d
        } else {
            let d = dir.join(format!("empty-{name}"));
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        out.insert(name, local);
    }
    // The StatefulSet's claim templates.
    for t in workload["spec"]["volumeClaimTemplates"]
        .as_sequence()
        .into_iter()
        .flatten()
    {
        let name = t["metadata"]["name"]
            .as_str()
            .expect("claim name")
            .to_string();
        let d = dir.join(format!("claim-{name}"));
        std::fs::create_dir_all(&d).unwrap();
        out.insert(name, d);
    }
    out
}

struct Procs(Vec<(String, Child, PathBuf)>);

impl Procs {
    fn start(&mut self, name: &str, r: &Runnable, log: PathBuf) {
        let f = std::fs::File::create(&log).expect("log");
        let child = Command::new(&r.program)
            .args(&r.args)
            .envs(r.env.iter().map(|(k, v)| (k, v)))
            .env_remove("BT_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::from(f.try_clone().unwrap()))
            .stderr(Stdio::from(f))
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({}): {e}", r.program.display()));
        self.0.push((name.into(), child, log));
    }
}

impl Procs {
    /// Panics (with the logs, through Drop) when a process already exited: a flag the binary
    /// does not know ends it at once.
    fn assert_alive(&mut self) {
        for (name, c, _) in &mut self.0 {
            if let Ok(Some(status)) = c.try_wait() {
                panic!("{name} exited ({status}) while the cluster should be running");
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c, _) in &mut self.0 {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for (name, c, log) in &mut self.0 {
            for _ in 0..200 {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                let text = std::fs::read_to_string(&*log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("===== {name} ({}) =====", log.display());
                for l in &lines[lines.len().saturating_sub(60)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

#[test]
fn manifests_validate_and_run_a_job_as_rendered() {
    let tmp = tempfile::Builder::new()
        .prefix("bt-deploy-")
        .tempdir()
        .unwrap();
    let d = tmp.path();
    let docs = checked_render(&d.join("rendered"));
    let coord = find(&docs, "StatefulSet", "bt-coordinator");
    let worker = find(&docs, "DaemonSet", "bt-worker");
    // The daemons reach the coordinator through their Service; the Service's port is the
    // container's.
    let svc = find(&docs, "Service", "bt-coordinator-workers");
    let svc_port = svc["spec"]["ports"][0]["port"].as_u64().expect("port");

    let secrets = d.join("secrets");
    let out = Command::new(bin("bt-coordinator"))
        .args(["init-secrets", "--dir"])
        .arg(&secrets)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Claims: one bound to a rendered PersistentVolume with a host path (the CPU overlay's data
    // sets) is that path; any other is a fresh directory shared by every pod.
    let mut shared = BTreeMap::new();
    for claim in docs.iter().filter(|d| d["kind"] == "PersistentVolumeClaim") {
        let name = claim["metadata"]["name"].as_str().expect("claim name");
        let host = claim["spec"]["volumeName"]
            .as_str()
            .map(|pv| find(&docs, "PersistentVolume", pv))
            .and_then(|pv| pv["spec"]["hostPath"]["path"].as_str())
            .map(PathBuf::from);
        let p = host.unwrap_or_else(|| {
            let p = d.join(name);
            std::fs::create_dir_all(&p).unwrap();
            p
        });
        shared.insert(name.to_string(), p);
    }

    let (api, health, metrics) = (free_port(), free_port(), free_port());
    let subst = vec![
        ("0.0.0.0:7070".to_string(), format!("127.0.0.1:{api}")),
        ("0.0.0.0:7071".to_string(), format!("127.0.0.1:{health}")),
        ("0.0.0.0:9090".to_string(), format!("127.0.0.1:{metrics}")),
        (
            format!("bt-coordinator-workers:{svc_port}"),
            format!("127.0.0.1:{api}"),
        ),
    ];
    let mut procs = Procs(Vec::new());
    let cdir = d.join("coordinator");
    let cvol = volumes(coord, &cdir, &shared, &secrets);
    let namespace = coord["metadata"]["namespace"]
        .as_str()
        .expect("namespace")
        .to_string();
    let pod_fields = |pod: &str, node: &str| {
        BTreeMap::from([
            ("metadata.name", pod.to_string()),
            ("metadata.namespace", namespace.clone()),
            ("spec.nodeName", node.to_string()),
            ("status.hostIP", "127.0.0.1".to_string()),
            ("status.podIP", "127.0.0.1".to_string()),
        ])
    };
    let c = runnable(
        coord,
        &cvol,
        &subst,
        &pod_fields("bt-coordinator-0", "node-0"),
        kubelet_env(&docs, "bt-coordinator-0"),
    );
    // The worst case is what runs: every service link of the namespace, whatever the manifest's
    // enableServiceLinks says.
    for v in [
        "BT_COORDINATOR_SERVICE_HOST",
        "BT_COORDINATOR_PORT",
        "BT_COORDINATOR_METRICS_PORT_9090_TCP_PROTO",
        "BT_COORDINATOR_WORKERS_SERVICE_PORT_GRPC",
        "KUBERNETES_PORT_443_TCP_ADDR",
        "HOSTNAME",
    ] {
        assert!(c.env.iter().any(|(k, _)| k == v), "no {v} in {:?}", c.env);
    }
    procs.start("coordinator", &c, d.join("coordinator.log"));

    // Two "nodes": each daemon on loopback with a port range of its own (one host here).
    // Above the kernel's ephemeral range and apart from the e2e clusters' ranges (20000-59999).
    let base = 61000 + (std::process::id() % 40) * 100;
    for i in 0..2u32 {
        let ndir = d.join(format!("node-{i}"));
        let vol = volumes(worker, &ndir, &shared, &secrets);
        let mut s = subst.clone();
        let start = base + i * 20;
        s.push((
            "--port-range=29500-29600".into(),
            format!("--port-range={start}-{}", start + 20),
        ));
        let pod = format!("bt-worker-{i}x7k2");
        let fields = pod_fields(&pod, &format!("node-{i}"));
        let w = runnable(worker, &vol, &s, &fields, kubelet_env(&docs, &pod));
        let range = format!("--port-range={start}-{}", start + 20);
        assert!(
            w.args.contains(&range),
            "the manifest's --port-range=29500-29600 changed; update this test: {:?}",
            w.args
        );
        procs.start(&format!("node-{i}"), &w, d.join(format!("node-{i}.log")));
    }

    let btctl = |args: &[&str]| {
        Command::new(bin("btctl"))
            .args(args)
            .env("BT_COORDINATOR", format!("127.0.0.1:{api}"))
            .env("BT_TOKEN_FILE", secrets.join("admin.token"))
            .env("BT_CA_CERT", secrets.join("ca.pem"))
            .env_remove("BT_TOKEN")
            .output()
            .expect("btctl")
    };
    // The plain-text health port the kubelet probes answers, and the metrics port serves the
    // Prometheus text format.
    wait_for("the health port", MINUTE, || {
        procs.assert_alive();
        std::net::TcpStream::connect(("127.0.0.1", health)).ok()
    });
    wait_for("the metrics port", MINUTE, || {
        use std::io::{Read, Write};
        procs.assert_alive();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics)).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.contains("# TYPE bt_jobs gauge").then_some(())
    });
    wait_for("two daemons online", MINUTE, || {
        procs.assert_alive();
        let out = btctl(&["workers", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let n = v
            .as_array()?
            .iter()
            .filter(|w| w["state"] == "online")
            .count();
        (n == 2).then_some(())
    });
    let spec = d.join("job.toml");
    std::fs::write(
        &spec,
        "name = \"deploy\"\nworld_size = 2\n[data]\nsource = \"fashion-mnist\"\n\
         path = \"/usr/share/datasets/fashion-mnist\"\nlimit = 128\nimage_size = 16\nthreads = 1\n\
         [model]\nprojector = [32, 32]\n[train]\nbatch_size = 16\nmax_steps = 3\n\
         warmup_epochs = 0\nlog_every = 1\n[checkpoint]\nevery_steps = 2\n\
         [eval]\nknn_at_end = false\n[dist]\ntimeout_secs = 20\n",
    )
    .unwrap();
    let out = btctl(&["submit", spec.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let job = wait_for("the job to end", 3 * MINUTE, || {
        let out = btctl(&["get", &id, "-o", "json"]);
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        matches!(
            j["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        )
        .then_some(j)
    });
    assert_eq!(job["state"], "succeeded", "{job}");
    // Rank 0 wrote its checkpoints to the shared checkpoint volume, under the job.
    let ckpts = shared["bt-checkpoints"].join(&id);
    assert!(
        std::fs::read_dir(&ckpts).map(|r| r.count()).unwrap_or(0) > 0,
        "no checkpoint in {}",
        ckpts.display()
    );
}
