//! What the trainer-level tests share: the tiny model they train, the Fashion-MNIST data table and
//! a single-rank assignment. Each test file uses a part of it.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use bt_proto::Assignment;
use prost::Message;

/// ResNet-18 with the CIFAR stem and a 32-32 projector, as a `[model]` table; a test may append
/// more keys of the table (for example `sync_bn`).
pub const TINY_MODEL: &str = r#"[model]
backbone = "resnet18"
cifar_stem = true
projector = [32, 32]
"#;

/// The system's Fashion-MNIST at 16 × 16, cut to its first `limit` images, as a `[data]` table.
pub fn fashion_data(limit: usize) -> String {
    format!(
        r#"[data]
source = "fashion-mnist"
path = "/usr/share/datasets/fashion-mnist"
limit = {limit}
image_size = 16
"#
    )
}

/// A single-rank assignment of `spec` writing checkpoints under `dir`; tests override fields with
/// struct update syntax (`Assignment { rank, ..assignment(..) }`).
pub fn assignment(job_id: &str, spec: String, dir: &Path) -> Assignment {
    Assignment {
        job_id: job_id.into(),
        epoch: 1,
        world_size: 1,
        master_addr: "127.0.0.1".into(),
        // what the coordinator hands out per attempt; every rank of a test shares it
        store_prefix: "test-attempt".into(),
        spec_toml: spec,
        checkpoint_dir: dir.display().to_string(),
        ..Default::default()
    }
}

/// The trainer command (`bt-worker train` on the CPU, every stream piped), for a test to adjust.
pub fn trainer_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bt-worker"));
    cmd.args(["train", "--device-kind", "cpu"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Starts `cmd` (from [`trainer_command`]) and writes the assignment to its stdin.
pub fn start_trainer(mut cmd: Command, a: &Assignment) -> Child {
    let mut child = cmd.spawn().expect("start trainer");
    child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(&a.encode_to_vec())
        .expect("write the assignment");
    child
}
