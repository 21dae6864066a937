//! Configuration loading for the binaries: an optional file (TOML or YAML), then `BT_<PREFIX>_…`
//! environment variables (`__` separates nesting), then command-line `key=value` overrides.
//! Unknown keys are rejected by the target struct (`#[serde(deny_unknown_fields)]`): a typo in a
//! file, a flag or a variable (`BT_COORDINATOR_LISTN`) is an error that names it.
//!
//! # The platform's variables
//!
//! The environment is shared with the platform. A kubelet gives every container service-link
//! variables for every Service of its namespace (unless the pod sets `enableServiceLinks: false`),
//! named after the Service: upper-cased, `-` as `_`. The Services `bt-coordinator`,
//! `bt-coordinator-metrics` and `bt-coordinator-workers` thus give the coordinator
//! `BT_COORDINATOR_SERVICE_HOST`, `BT_COORDINATOR_METRICS_PORT_9090_TCP_PROTO` and more, which
//! carry its prefix but are not its configuration. So a variable is ignored (with a `debug` line
//! naming it) when its name **and** its value have the shape the kubelet gives them, for a
//! Service `<SVC>` with a port `<P>` of protocol `<PROTO>` (TCP, UDP or SCTP) at the address `<IP>`:
//!
//! | name                               | value               |
//! |------------------------------------|---------------------|
//! | `<SVC>_SERVICE_HOST`               | `<IP>`              |
//! | `<SVC>_SERVICE_PORT`               | `<P>`               |
//! | `<SVC>_SERVICE_PORT_<PORT NAME>`   | `<P>`               |
//! | `<SVC>_PORT`                       | `<proto>://<IP>:<P>` |
//! | `<SVC>_PORT_<P>_<PROTO>`           | `<proto>://<IP>:<P>` |
//! | `<SVC>_PORT_<P>_<PROTO>_PROTO`     | `<proto>`           |
//! | `<SVC>_PORT_<P>_<PROTO>_PORT`      | `<P>`               |
//! | `<SVC>_PORT_<P>_<PROTO>_ADDR`      | `<IP>`              |
//!
//! (`<SVC>` non-empty, names upper-case as the kubelet writes them, `<IP>` an IPv4 or IPv6
//! address, in brackets inside a URL.) Every other variable with the prefix is configuration,
//! so a misspelt one is still an error, and so is a value of the wrong shape for a key that
//! exists. Such names cannot collide with bt's keys: none ends in `service_host`,
//! `service_port` or `port`.
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::de::DeserializeOwned;

/// Loads a `T` from defaults (its serde defaults), `file`, the process environment and
/// `overrides`.
///
/// `env_prefix` is for example `"BT_COORDINATOR"`: `BT_COORDINATOR_LISTEN=0.0.0.0:7070` sets
/// `listen`. Kubernetes service-link variables are ignored (module docs).
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    env_prefix: &str,
    overrides: &[(String, String)],
) -> Result<T, String> {
    load_with_env(file, env_prefix, std::env::vars_os(), overrides)
}

/// [`load`] with the environment given as `(name, value)` pairs instead of read from the process
/// (for tests, which must not change the environment of threads running beside them).
pub fn load_with_env<T: DeserializeOwned>(
    file: Option<&Path>,
    env_prefix: &str,
    env: impl IntoIterator<Item = (OsString, OsString)>,
    overrides: &[(String, String)],
) -> Result<T, String> {
    let mut b = config::Config::builder();
    if let Some(f) = file {
        if !f.exists() {
            return Err(format!("config file {} does not exist", f.display()));
        }
        b = b.add_source(config::File::from(f));
    }
    let vars = prefixed_env(env_prefix, env)?;
    // Each variable's key (`BT_COORDINATOR_LIMITS__MAX_JOBS` → `limits.max_jobs`), to name the
    // variable in an error about its key.
    let cut = env_prefix.len() + 1;
    let origin: BTreeMap<String, String> = vars
        .keys()
        .filter_map(|name| {
            Some((
                name.get(cut..)?.to_lowercase().replace("__", "."),
                name.clone(),
            ))
        })
        .collect();
    b = b.add_source(
        config::Environment::with_prefix(env_prefix)
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .source(Some(vars)),
    );
    for (k, v) in overrides {
        b = b
            .set_override(k.as_str(), v.as_str())
            .map_err(|e| format!("{k}: {e}"))?;
    }
    let cfg = b.build().map_err(|e| e.to_string())?;
    serde_path_to_error::deserialize::<_, T>(cfg)
        .map_err(keyed)
        .map_err(
            |e| match unknown_keys(&e).iter().find_map(|k| origin.get(k)) {
                Some(var) => format!("{e} (from the environment variable {var})"),
                None => e,
            },
        )
}

/// The keys an unknown-field error from [`keyed`] may be about, most specific first: the error
/// names the table and the field ("limits: unknown field \`max_job\`" is `limits.max_job`), or
/// the field twice at the top level ("listn: unknown field \`listn\`").
fn unknown_keys(e: &str) -> Vec<String> {
    let Some((table, rest)) = e.split_once(": unknown field `") else {
        return Vec::new();
    };
    let Some((field, _)) = rest.split_once('`') else {
        return Vec::new();
    };
    vec![
        format!("{table}.{field}"),
        table.to_string(),
        field.to_string(),
    ]
}

/// The variables that start with `<prefix>_` (in any case, as the `config` crate matches them),
/// less the kubelet's service links. A name that is not Unicode is skipped (it cannot be a key);
/// a value that is not is an error naming its variable.
fn prefixed_env(
    prefix: &str,
    env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<config::Map<String, String>, String> {
    let want = format!("{prefix}_").to_lowercase();
    // Sorted, so the debug lines come in a stable order.
    let mut kept = BTreeMap::new();
    for (name, value) in env {
        let Ok(name) = name.into_string() else {
            continue;
        };
        if !name.to_lowercase().starts_with(&want) {
            continue;
        }
        let value = value
            .into_string()
            .map_err(|_| format!("{name}: the value is not valid UTF-8"))?;
        if is_service_link(&name, &value) {
            tracing::debug!(
                variable = %name,
                "ignoring a Kubernetes service-link variable (not bt configuration)"
            );
            continue;
        }
        kept.insert(name, value);
    }
    Ok(kept.into_iter().collect())
}

/// Whether `name=value` has the shape of a variable a kubelet injects for a Service (module docs).
pub fn is_service_link(name: &str, value: &str) -> bool {
    let upper = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    };
    if !upper(name) {
        return false;
    }
    let ip = |v: &str| v.parse::<IpAddr>().is_ok();
    let port = |v: &str| v.parse::<u16>().is_ok_and(|p| p > 0) && !v.starts_with('0');
    // `<proto>://<ip>:<port>`: the protocol (lower case) and the port.
    let url = |v: &str| -> Option<(String, u16)> {
        let (proto, addr) = v.split_once("://")?;
        if !matches!(proto, "tcp" | "udp" | "sctp") {
            return None;
        }
        let addr: SocketAddr = addr.parse().ok()?;
        Some((proto.to_string(), addr.port()))
    };
    if let Some(svc) = name.strip_suffix("_SERVICE_HOST") {
        if !svc.is_empty() && ip(value) {
            return true;
        }
    }
    if let Some((svc, rest)) = name.rsplit_once("_SERVICE_PORT") {
        let named = rest.is_empty() || rest.strip_prefix('_').is_some_and(upper);
        if !svc.is_empty() && named && port(value) {
            return true;
        }
    }
    if let Some(svc) = name.strip_suffix("_PORT") {
        if !svc.is_empty() && url(value).is_some() {
            return true;
        }
    }
    // `<SVC>_PORT_<P>_<PROTO>` and its `_PROTO`, `_PORT`, `_ADDR`.
    let parts: Vec<&str> = name.split('_').collect();
    let proto_of = |p: &str| match p {
        "TCP" | "UDP" | "SCTP" => Some(p.to_lowercase()),
        _ => None,
    };
    let link = |i: usize| -> Option<(u16, String)> {
        // parts[i - 2] == "PORT", parts[i - 1] the port, parts[i] the protocol; a service before.
        if i < 3 || parts[i - 2] != "PORT" || parts[..i - 2].iter().all(|p| p.is_empty()) {
            return None;
        }
        let p = parts[i - 1];
        if !port(p) {
            return None;
        }
        Some((p.parse().ok()?, proto_of(parts[i])?))
    };
    let n = parts.len();
    if let Some((p, proto)) = link(n - 1) {
        if url(value) == Some((proto, p)) {
            return true;
        }
    }
    if n >= 2 {
        if let Some((p, proto)) = link(n - 2) {
            return match parts[n - 1] {
                "PROTO" => value == proto,
                "PORT" => value == p.to_string(),
                "ADDR" => ip(value),
                _ => false,
            };
        }
    }
    false
}

/// A deserialization error as `<key>: <message>` (like the job spec's errors): the key is the
/// dotted path of the value that is wrong, the message says what is wrong with it and where the
/// value came from (the file or the environment).
fn keyed(e: serde_path_to_error::Error<config::ConfigError>) -> String {
    use config::ConfigError;
    let path = e.path().to_string();
    let in_origin = |origin: Option<String>| origin.map(|o| format!(" in {o}")).unwrap_or_default();
    let (key, message) = match e.into_inner() {
        ConfigError::Type {
            origin,
            unexpected,
            expected,
            key,
        } => (
            key,
            format!(
                "invalid type: {unexpected}, expected {expected}{}",
                in_origin(origin)
            ),
        ),
        ConfigError::At { error, origin, key } => (key, format!("{error}{}", in_origin(origin))),
        // Every other error carries no key of its own: the path says where it is.
        other => (None, other.to_string()),
    };
    let key = key
        .filter(|k| !k.is_empty())
        .or_else(|| Some(path).filter(|p| !p.is_empty() && p != "."))
        .unwrap_or_else(|| "config".to_string());
    format!("{key}: {}", message.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Demo {
        #[serde(default)]
        listen: String,
        #[serde(default)]
        slots: u32,
    }

    #[test]
    fn file_env_and_overrides_layer() {
        let dir = std::env::temp_dir().join(format!("btcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "listen = \"a\"\nslots = 2\n").unwrap();
        let d: Demo = load(Some(&f), "BT_CFGTEST", &[("slots".into(), "5".into())]).unwrap();
        assert_eq!(d.listen, "a");
        assert_eq!(d.slots, 5);
        std::fs::write(&f, "lisen = \"a\"\n").unwrap();
        let e = load::<Demo>(Some(&f), "BT_CFGTEST", &[]).unwrap_err();
        assert!(e.contains("lisen"), "{e}");
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Nested {
        #[serde(default)]
        heartbeat_ms: u64,
        #[serde(default)]
        limits: Limits,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Limits {
        #[serde(default)]
        max_jobs: u32,
    }

    /// An invalid value is an error that starts with its key, like `heartbeat_ms: invalid type`,
    /// from a file, from an override and from the environment, nested keys included.
    #[test]
    fn errors_name_their_key() {
        let dir = std::env::temp_dir().join(format!("btcfg-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "heartbeat_ms = \"soon\"\n").unwrap();
        let e = load::<Nested>(Some(&f), "BT_CFGKEYTEST", &[]).unwrap_err();
        assert!(e.starts_with("heartbeat_ms: invalid type"), "{e}");
        assert!(e.contains("soon"), "{e}");

        std::fs::write(&f, "[limits]\nmax_jobs = -3\n").unwrap();
        let e = load::<Nested>(Some(&f), "BT_CFGKEYTEST", &[]).unwrap_err();
        assert!(e.starts_with("limits.max_jobs: "), "{e}");

        let o = [("heartbeat_ms".to_string(), "often".to_string())];
        let e = load::<Nested>(None, "BT_CFGKEYTEST", &o).unwrap_err();
        assert!(e.starts_with("heartbeat_ms: "), "{e}");
        assert!(e.contains("often"), "{e}");

        std::fs::write(&f, "[limits]\nmax_job = 3\n").unwrap();
        let e = load::<Nested>(Some(&f), "BT_CFGKEYTEST", &[]).unwrap_err();
        // An unknown key is named by its table and the message.
        assert!(e.starts_with("limits: unknown field `max_job`"), "{e}");

        let d: Nested = load(
            None,
            "BT_CFGKEYTEST",
            &[("limits.max_jobs".into(), "7".into())],
        )
        .unwrap();
        assert_eq!((d.heartbeat_ms, d.limits.max_jobs), (0, 7));
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    /// What a kubelet gives a container in a namespace with the Services `bt-coordinator`
    /// (`grpc` 7070), `bt-coordinator-metrics` (`metrics` 9090, IPv6) and
    /// `bt-coordinator-workers` (`grpc` 7070, an unnamed second port over UDP).
    const LINKS: &[(&str, &str)] = &[
        ("BT_COORDINATOR_SERVICE_HOST", "10.0.0.1"),
        ("BT_COORDINATOR_SERVICE_PORT", "7070"),
        ("BT_COORDINATOR_SERVICE_PORT_GRPC", "7070"),
        ("BT_COORDINATOR_PORT", "tcp://10.0.0.1:7070"),
        ("BT_COORDINATOR_PORT_7070_TCP", "tcp://10.0.0.1:7070"),
        ("BT_COORDINATOR_PORT_7070_TCP_PROTO", "tcp"),
        ("BT_COORDINATOR_PORT_7070_TCP_PORT", "7070"),
        ("BT_COORDINATOR_PORT_7070_TCP_ADDR", "10.0.0.1"),
        ("BT_COORDINATOR_METRICS_SERVICE_HOST", "fd00::9"),
        ("BT_COORDINATOR_METRICS_SERVICE_PORT", "9090"),
        ("BT_COORDINATOR_METRICS_SERVICE_PORT_METRICS", "9090"),
        ("BT_COORDINATOR_METRICS_PORT", "tcp://[fd00::9]:9090"),
        (
            "BT_COORDINATOR_METRICS_PORT_9090_TCP",
            "tcp://[fd00::9]:9090",
        ),
        ("BT_COORDINATOR_METRICS_PORT_9090_TCP_PROTO", "tcp"),
        ("BT_COORDINATOR_METRICS_PORT_9090_TCP_PORT", "9090"),
        ("BT_COORDINATOR_METRICS_PORT_9090_TCP_ADDR", "fd00::9"),
        ("BT_COORDINATOR_WORKERS_SERVICE_HOST", "10.0.0.3"),
        ("BT_COORDINATOR_WORKERS_SERVICE_PORT", "7070"),
        ("BT_COORDINATOR_WORKERS_SERVICE_PORT_GRPC", "7070"),
        ("BT_COORDINATOR_WORKERS_SERVICE_PORT_GRPC_ALT", "7071"),
        ("BT_COORDINATOR_WORKERS_PORT", "tcp://10.0.0.3:7070"),
        (
            "BT_COORDINATOR_WORKERS_PORT_7070_TCP",
            "tcp://10.0.0.3:7070",
        ),
        ("BT_COORDINATOR_WORKERS_PORT_7070_TCP_PROTO", "tcp"),
        ("BT_COORDINATOR_WORKERS_PORT_7070_TCP_PORT", "7070"),
        ("BT_COORDINATOR_WORKERS_PORT_7070_TCP_ADDR", "10.0.0.3"),
        (
            "BT_COORDINATOR_WORKERS_PORT_7071_UDP",
            "udp://10.0.0.3:7071",
        ),
        ("BT_COORDINATOR_WORKERS_PORT_7071_UDP_PROTO", "udp"),
        ("BT_COORDINATOR_WORKERS_PORT_7071_UDP_PORT", "7071"),
        ("BT_COORDINATOR_WORKERS_PORT_7071_UDP_ADDR", "10.0.0.3"),
        ("BT_COORDINATOR_X_PORT_38412_SCTP", "sctp://10.0.0.4:38412"),
    ];

    #[test]
    fn service_link_shapes() {
        for (k, v) in LINKS {
            assert!(is_service_link(k, v), "{k}={v} is a service link");
        }
        // Names of the shape with values a kubelet would not write, and names it would not
        // write: configuration (and errors where the key does not exist).
        for (k, v) in [
            ("BT_COORDINATOR_LISTEN", "0.0.0.0:7070"),
            ("BT_COORDINATOR_LISTN", "0.0.0.0:7070"),
            ("BT_COORDINATOR_SERVICE_HOST", "coordinator.example"),
            ("BT_COORDINATOR_SERVICE_PORT", "http"),
            ("BT_COORDINATOR_SERVICE_PORT", "70000"),
            ("BT_COORDINATOR_SERVICE_PORT_", "7070"),
            ("BT_COORDINATOR_PORT", "7070"),
            ("BT_COORDINATOR_PORT", "http://10.0.0.1:7070"),
            ("BT_COORDINATOR_PORT_7070_TCP", "tcp://10.0.0.1:7071"),
            ("BT_COORDINATOR_PORT_7070_TCP", "udp://10.0.0.1:7070"),
            ("BT_COORDINATOR_PORT_7070_TCP_PROTO", "udp"),
            ("BT_COORDINATOR_PORT_7070_TCP_PORT", "7071"),
            ("BT_COORDINATOR_PORT_7070_TCP_ADDR", "somewhere"),
            ("BT_COORDINATOR_PORT_7070_TCP_HOST", "10.0.0.1"),
            ("BT_COORDINATOR_PORT_7070_HTTP", "tcp://10.0.0.1:7070"),
            ("BT_COORDINATOR_PORT_07070_TCP_PORT", "07070"),
            ("bt_coordinator_service_host", "10.0.0.1"),
            ("_SERVICE_HOST", "10.0.0.1"),
            ("_PORT", "tcp://10.0.0.1:7070"),
            ("PORT_7070_TCP", "tcp://10.0.0.1:7070"),
            ("BT_WORKER_PORT_RANGE_START", "29500"),
            ("BT_WORKER_HOST", "10.1.2.3"),
        ] {
            assert!(!is_service_link(k, v), "{k}={v} is not a service link");
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Coord {
        #[serde(default)]
        listen: String,
        #[serde(default)]
        metrics_listen: String,
        #[serde(default)]
        limits: Limits,
    }

    /// The whole of a kubelet's service links next to real settings: the links are ignored, the
    /// settings (nested ones included) apply, other prefixes are not read.
    #[test]
    fn a_kubelets_environment_loads() {
        let mut pairs = LINKS.to_vec();
        pairs.extend([
            ("BT_COORDINATOR_LISTEN", "0.0.0.0:7070"),
            ("bt_coordinator_metrics_listen", "0.0.0.0:9090"),
            ("BT_COORDINATOR_LIMITS__MAX_JOBS", "4"),
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_PORT_443_TCP", "tcp://10.96.0.1:443"),
            ("HOSTNAME", "bt-coordinator-0"),
            ("BT_WORKER_NAME", "node-1"),
        ]);
        let c: Coord = load_with_env(None, "BT_COORDINATOR", env(&pairs), &[]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:7070");
        assert_eq!(c.metrics_listen, "0.0.0.0:9090");
        assert_eq!(c.limits.max_jobs, 4);
        // The flags still win over the environment.
        let o = [("listen".to_string(), "127.0.0.1:1".to_string())];
        let c: Coord = load_with_env(None, "BT_COORDINATOR", env(&pairs), &o).unwrap();
        assert_eq!(c.listen, "127.0.0.1:1");
    }

    /// A misspelt variable is an error that names it, links around it or not; so is a variable
    /// of a link's name whose value no kubelet writes, and a value that is not UTF-8.
    #[test]
    fn typos_are_still_errors() {
        let mut pairs = LINKS.to_vec();
        pairs.push(("BT_COORDINATOR_LISTN", "0.0.0.0:7070"));
        let e = load_with_env::<Coord>(None, "BT_COORDINATOR", env(&pairs), &[]).unwrap_err();
        assert!(e.contains("unknown field `listn`"), "{e}");
        assert!(
            e.ends_with("(from the environment variable BT_COORDINATOR_LISTN)"),
            "{e}"
        );

        let pairs = [("BT_COORDINATOR_SERVICE_HOST", "coordinator.example")];
        let e = load_with_env::<Coord>(None, "BT_COORDINATOR", env(&pairs), &[]).unwrap_err();
        assert!(e.contains("unknown field `service_host`"), "{e}");

        let pairs = [("BT_COORDINATOR_LIMITS__MAX_JOB", "3")];
        let e = load_with_env::<Coord>(None, "BT_COORDINATOR", env(&pairs), &[]).unwrap_err();
        assert!(e.starts_with("limits: unknown field `max_job`"), "{e}");
        assert!(
            e.ends_with("(from the environment variable BT_COORDINATOR_LIMITS__MAX_JOB)"),
            "{e}"
        );

        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let bad = vec![(
                OsString::from("BT_COORDINATOR_LISTEN"),
                OsString::from_vec(vec![0xff, 0xfe]),
            )];
            let e = load_with_env::<Coord>(None, "BT_COORDINATOR", bad, &[]).unwrap_err();
            assert_eq!(e, "BT_COORDINATOR_LISTEN: the value is not valid UTF-8");
        }
    }
}
