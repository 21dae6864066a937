//! Configuration loading for the binaries: an optional file (TOML or YAML), then `BT_<PREFIX>_…`
//! environment variables (`__` separates nesting), then command-line `key=value` overrides.
//! Unknown keys are rejected by the target struct (`#[serde(deny_unknown_fields)]`).
use std::path::Path;

use serde::de::DeserializeOwned;

/// Loads a `T` from defaults (its serde defaults), `file`, the environment and `overrides`.
///
/// `env_prefix` is for example `"BT_COORDINATOR"`: `BT_COORDINATOR_LISTEN=0.0.0.0:7070` sets
/// `listen`.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    env_prefix: &str,
    overrides: &[(String, String)],
) -> Result<T, String> {
    let mut b = config::Config::builder();
    if let Some(f) = file {
        if !f.exists() {
            return Err(format!("config file {} does not exist", f.display()));
        }
        b = b.add_source(config::File::from(f));
    }
    b = b.add_source(
        config::Environment::with_prefix(env_prefix)
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true),
    );
    for (k, v) in overrides {
        b = b
            .set_override(k.as_str(), v.as_str())
            .map_err(|e| format!("{k}: {e}"))?;
    }
    let cfg = b.build().map_err(|e| e.to_string())?;
    serde_path_to_error::deserialize::<_, T>(cfg).map_err(keyed)
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
}
