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
    cfg.try_deserialize::<T>().map_err(|e| e.to_string())
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
}
