//! Training checkpoints: one directory per checkpoint,
//!
//! ```text
//! <dir>/model.safetensors   every model parameter and buffer (`backbone.*`, `projector.*`)
//! <dir>/optim.safetensors   LARS momentum buffers, named like their parameters
//! <dir>/meta.json           step, epoch, trainer state, job config text, file sizes + sha256,
//!                           and the checkpoint's content hash
//! ```
//!
//! Writes are atomic per file (temp file in the same directory, fsync, rename, fsync of the
//! directory) and `meta.json` is written last and removed first when a directory is rewritten, so
//! a directory without `meta.json` is an incomplete checkpoint. Loading verifies every file's
//! size and sha256 against `meta.json` and the content hash, and refuses a mismatch with an error
//! naming the file.
//!
//! Data order: the loader's order is a pure function of (seed, epoch, step), so `step` (with the
//! seed in the config text) is enough to resume; anything else the trainer wants back goes in
//! `trainer_state` (free-form JSON).
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{self, BarlowTwinsModel, ModelConfig};
use crate::optim::Lars;
use crate::{Error, Result};

pub const FORMAT_VERSION: u32 = 1;
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIM_FILE: &str = "optim.safetensors";
pub const META_FILE: &str = "meta.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

/// What the trainer hands over besides model and optimizer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Global steps completed (the next step to run).
    pub step: u64,
    pub epoch: u32,
    /// The job config as submitted (TOML), kept verbatim.
    pub config_text: String,
    /// Free-form resume state (RNG/data-order details beyond seed + step).
    #[serde(default)]
    pub trainer_state: serde_json::Value,
}

/// Contents of `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    pub step: u64,
    pub epoch: u32,
    pub config_text: String,
    #[serde(default)]
    pub trainer_state: serde_json::Value,
    pub model_config: ModelConfig,
    pub created_unix_ms: u64,
    /// model.safetensors and optim.safetensors.
    pub files: BTreeMap<String, FileEntry>,
    /// Bytes of the data files.
    pub size_bytes: u64,
    /// Content hash: sha256 over `name sha256\n` of every file (name order), then
    /// `step {step}\nepoch {epoch}\n` and the config text.
    pub sha256: String,
}

fn ck_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn content_hash(
    files: &BTreeMap<String, FileEntry>,
    step: u64,
    epoch: u32,
    config: &str,
) -> String {
    let mut h = Sha256::new();
    for (name, f) in files {
        h.update(format!("{name} {}\n", f.sha256));
    }
    h.update(format!("step {step}\nepoch {epoch}\n"));
    h.update(config.as_bytes());
    hex::encode(h.finalize())
}

/// sha256 and length of a file's contents.
pub fn hash_file(path: &Path) -> Result<FileEntry> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileEntry {
        sha256: hex::encode(h.finalize()),
        bytes,
    })
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Writes `dir/name` atomically: `write` fills a temp file in `dir`, which is fsynced, hashed
/// and renamed into place.
fn write_atomic(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<FileEntry> {
    let final_path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        write(&tmp)?;
        File::options()
            .read(true)
            .write(true)
            .open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))?;
        let entry = hash_file(&tmp)?;
        fs::rename(&tmp, &final_path).map_err(|e| Error::io(&final_path, e))?;
        Ok(entry)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The trainer's entry point: [`save_with_state`] with an empty `trainer_state`.
pub fn save(
    dir: &Path,
    model: &BarlowTwinsModel,
    opt: &Lars,
    step: u64,
    epoch: u32,
    config_text: &str,
) -> Result<CheckpointMeta> {
    save_with_state(
        dir,
        model,
        opt,
        &TrainState {
            step,
            epoch,
            config_text: config_text.to_string(),
            trainer_state: serde_json::Value::Null,
        },
    )
}

/// Writes a checkpoint into `dir` (created if needed; an existing checkpoint there is replaced).
pub fn save_with_state(
    dir: &Path,
    model: &BarlowTwinsModel,
    opt: &Lars,
    state: &TrainState,
) -> Result<CheckpointMeta> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let meta_path = dir.join(META_FILE);
    if meta_path.exists() {
        // Mark the directory incomplete while its files are replaced.
        fs::remove_file(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
        sync_dir(dir)?;
    }
    let mut files = BTreeMap::new();
    let state_tensors = model.state();
    files.insert(
        MODEL_FILE.to_string(),
        write_atomic(dir, MODEL_FILE, |p| {
            model::write_safetensors(&state_tensors, p)
        })?,
    );
    let momentum = opt.momentum_buffers();
    files.insert(
        OPTIM_FILE.to_string(),
        write_atomic(dir, OPTIM_FILE, |p| model::write_safetensors(&momentum, p))?,
    );
    let size_bytes = files.values().map(|f| f.bytes).sum();
    let meta = CheckpointMeta {
        format_version: FORMAT_VERSION,
        step: state.step,
        epoch: state.epoch,
        config_text: state.config_text.clone(),
        trainer_state: state.trainer_state.clone(),
        model_config: model.config().clone(),
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        sha256: content_hash(&files, state.step, state.epoch, &state.config_text),
        files,
        size_bytes,
    };
    let json = serde_json::to_vec_pretty(&meta)
        .map_err(|e| ck_err(&meta_path, format!("encoding meta: {e}")))?;
    write_atomic(dir, META_FILE, |p| {
        let mut f = File::create(p).map_err(|e| Error::io(p, e))?;
        f.write_all(&json).map_err(|e| Error::io(p, e))
    })?;
    sync_dir(dir)?;
    Ok(meta)
}

/// Reads `meta.json` (no file verification).
pub fn read_meta(dir: &Path) -> Result<CheckpointMeta> {
    let p = dir.join(META_FILE);
    let text = match fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ck_err(
                &p,
                "missing: not a checkpoint directory, or an incomplete (interrupted) write",
            ))
        }
        Err(e) => return Err(Error::io(&p, e)),
    };
    let meta: CheckpointMeta =
        serde_json::from_slice(&text).map_err(|e| ck_err(&p, format!("unreadable: {e}")))?;
    if meta.format_version != FORMAT_VERSION {
        return Err(ck_err(
            &p,
            format!(
                "format version {} (this worker reads {FORMAT_VERSION})",
                meta.format_version
            ),
        ));
    }
    Ok(meta)
}

/// Reads `meta.json` and checks every file's size and sha256 and the content hash.
pub fn verify(dir: &Path) -> Result<CheckpointMeta> {
    let meta = read_meta(dir)?;
    for name in [MODEL_FILE, OPTIM_FILE] {
        let p = dir.join(name);
        let want = meta
            .files
            .get(name)
            .ok_or_else(|| ck_err(&dir.join(META_FILE), format!("lists no {name}")))?;
        let len = fs::metadata(&p).map_err(|e| Error::io(&p, e))?.len();
        if len != want.bytes {
            return Err(ck_err(
                &p,
                format!(
                    "size {len} bytes, meta.json says {} (truncated or replaced); \
                     use an earlier checkpoint",
                    want.bytes
                ),
            ));
        }
        let got = hash_file(&p)?;
        if got.sha256 != want.sha256 {
            return Err(ck_err(
                &p,
                format!(
                    "sha256 {} does not match meta.json ({}): the file is corrupt; \
                     use an earlier checkpoint",
                    got.sha256, want.sha256
                ),
            ));
        }
    }
    let h = content_hash(&meta.files, meta.step, meta.epoch, &meta.config_text);
    if h != meta.sha256 {
        return Err(ck_err(
            &dir.join(META_FILE),
            format!(
                "content hash {h} does not match the recorded {}",
                meta.sha256
            ),
        ));
    }
    Ok(meta)
}

/// Verifies the checkpoint and loads model state and momentum buffers.
pub fn load(dir: &Path, model: &BarlowTwinsModel, opt: &mut Lars) -> Result<CheckpointMeta> {
    let meta = verify(dir)?;
    load_model_unverified(dir, model)?;
    let p = dir.join(OPTIM_FILE);
    let src = model::read_safetensors(&p)?;
    opt.load_momentum_buffers(&src)
        .map_err(|e| ck_err(&p, e.to_string()))?;
    Ok(meta)
}

/// Verifies the checkpoint and loads only the model (e.g. for evaluation).
pub fn load_model(dir: &Path, model: &BarlowTwinsModel) -> Result<CheckpointMeta> {
    let meta = verify(dir)?;
    load_model_unverified(dir, model)?;
    Ok(meta)
}

fn load_model_unverified(dir: &Path, model: &BarlowTwinsModel) -> Result<()> {
    let p: PathBuf = dir.join(MODEL_FILE);
    model.load_state_safetensors(&p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, ModelConfig};
    use crate::optim::LarsConfig;
    use tch::{nn, Device, Kind, Tensor};

    fn setup(proj: Vec<i64>) -> (nn::VarStore, BarlowTwinsModel, Lars) {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ModelConfig {
            cifar_stem: true,
            projector: proj,
            ..ModelConfig::new(Arch::Resnet18)
        };
        let m = BarlowTwinsModel::new(&vs.root(), &cfg).unwrap();
        let opt = Lars::new(&m.parameters(), LarsConfig::default(), 8, 1, 10);
        (vs, m, opt)
    }

    fn train_step(m: &BarlowTwinsModel, opt: &mut Lars, step: u64) {
        let x = Tensor::randn([4, 3, 8, 8], (Kind::Float, Device::Cpu));
        let z = m.forward(&x, true).unwrap();
        let l = z.square().mean(Kind::Float);
        opt.zero_grad();
        l.backward();
        opt.step(step).unwrap();
    }

    #[test]
    fn round_trip_restores_model_optimizer_and_meta() {
        tch::manual_seed(1);
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("00000002");
        let (_vs, m, mut opt) = setup(vec![16, 8]);
        train_step(&m, &mut opt, 0);
        train_step(&m, &mut opt, 1);
        let state = TrainState {
            step: 2,
            epoch: 0,
            config_text: "[train]\nseed = 3\n".into(),
            trainer_state: serde_json::json!({"seed": 3}),
        };
        let saved = save_with_state(&ck, &m, &opt, &state).unwrap();
        assert_eq!(saved.sha256.len(), 64);
        assert!(saved.size_bytes > 0);
        // Fresh model/optimizer with other weights.
        let (_vs2, m2, mut opt2) = setup(vec![16, 8]);
        let meta = load(&ck, &m2, &mut opt2).unwrap();
        assert_eq!(meta, saved);
        assert_eq!(meta.trainer_state["seed"], 3);
        for (a, b) in m.state().iter().zip(m2.state().iter()) {
            assert_eq!(a.name, b.name);
            assert!(a.tensor.equal(&b.tensor), "{}", a.name);
        }
        for (a, b) in opt
            .momentum_buffers()
            .iter()
            .zip(opt2.momentum_buffers().iter())
        {
            assert!(a.tensor.equal(&b.tensor), "{}", a.name);
        }
        // Overwriting in place works and leaves no temp files.
        save(&ck, &m, &opt, 2, 0, "x").unwrap();
        let names: Vec<String> = fs::read_dir(&ck)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn refuses_corrupt_truncated_and_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("ck");
        let (_vs, m, mut opt) = setup(vec![8]);
        save(&ck, &m, &opt, 1, 0, "cfg").unwrap();
        // Flip one byte of the model file (same size).
        let mp = ck.join(MODEL_FILE);
        let mut bytes = fs::read(&mp).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&mp, &bytes).unwrap();
        let e = load(&ck, &m, &mut opt).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("sha256"),
            "{e}"
        );
        // Truncate the optimizer file.
        save(&ck, &m, &opt, 1, 0, "cfg").unwrap();
        let op = ck.join(OPTIM_FILE);
        let b = fs::read(&op).unwrap();
        fs::write(&op, &b[..b.len() / 2]).unwrap();
        let e = load(&ck, &m, &mut opt).unwrap_err().to_string();
        assert!(
            e.contains("optim.safetensors") && e.contains("truncated"),
            "{e}"
        );
        // Edited meta (step changed): content hash mismatch.
        save(&ck, &m, &opt, 1, 0, "cfg").unwrap();
        let metap = ck.join(META_FILE);
        let t = fs::read_to_string(&metap)
            .unwrap()
            .replace("\"step\": 1", "\"step\": 9");
        fs::write(&metap, t).unwrap();
        let e = verify(&ck).unwrap_err().to_string();
        assert!(e.contains("meta.json") && e.contains("content hash"), "{e}");
        // No meta.json: incomplete.
        fs::remove_file(&metap).unwrap();
        let e = verify(&ck).unwrap_err().to_string();
        assert!(e.contains("meta.json") && e.contains("incomplete"), "{e}");
    }

    #[test]
    fn refuses_other_shapes_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("ck");
        let (_vs, m, opt) = setup(vec![16, 8]);
        save(&ck, &m, &opt, 1, 0, "cfg").unwrap();
        let (_vs2, m2, mut opt2) = setup(vec![32, 8]);
        let e = load(&ck, &m2, &mut opt2).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors")
                && e.contains("projector.0.weight")
                && e.contains("[16, 512]")
                && e.contains("[32, 512]"),
            "{e}"
        );
    }
}
