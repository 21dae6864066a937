//! `btctl export`: a checkpoint's backbone as a PyTorch state dict (see `bt_worker::export`).
//!
//! The checkpoint is named by its directory (as `btctl checkpoints` lists it) or by its job
//! (`JOB` for the newest committed checkpoint, `JOB@STEP` for one step). A job-named checkpoint
//! is looked up at the coordinator, and its content hash must match the one the coordinator
//! committed; a directory is verified on its own (every file's size and sha256).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bt_proto::ListCheckpointsRequest;

use crate::{connect, rpc_err, Conn};

pub async fn export(conn: &Conn, checkpoint: &str, output: &Path, projector: bool) -> Result<()> {
    bt_worker::export::ExportFormat::from_path(output).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (dir, committed_sha) = if Path::new(checkpoint).is_dir() {
        (PathBuf::from(checkpoint), None)
    } else {
        let (job_id, step) = match checkpoint.split_once('@') {
            Some((j, s)) => (
                j.to_string(),
                Some(
                    s.parse::<u64>()
                        .with_context(|| format!("{checkpoint}: expected JOB@STEP"))?,
                ),
            ),
            None => (checkpoint.to_string(), None),
        };
        let mut c = connect(conn).await.with_context(|| {
            format!("{checkpoint} is not a checkpoint directory here; asking the coordinator")
        })?;
        let cps = c
            .list_checkpoints(ListCheckpointsRequest {
                job_id: job_id.clone(),
            })
            .await
            .map_err(rpc_err)?
            .into_inner()
            .checkpoints;
        let chosen = match step {
            Some(s) => cps.into_iter().find(|c| c.step == s),
            None => cps.into_iter().max_by_key(|c| c.step),
        };
        let Some(cp) = chosen else {
            match step {
                Some(s) => bail!("job {job_id} has no committed checkpoint at step {s}"),
                None => bail!("job {job_id} has no committed checkpoint yet"),
            }
        };
        (PathBuf::from(cp.path), Some(cp.sha256))
    };
    let dir_for_task = dir.clone();
    let out = output.to_path_buf();
    let summary = tokio::task::spawn_blocking(move || -> Result<_> {
        if let Some(sha) = committed_sha.filter(|s| !s.is_empty()) {
            let meta = bt_worker::checkpoint::read_meta(&dir_for_task)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if meta.sha256 != sha {
                bail!(
                    "checkpoint {}: its content hash {} is not the one the coordinator \
                     committed ({sha}); refusing it",
                    dir_for_task.display(),
                    meta.sha256
                );
            }
        }
        bt_worker::export::export_checkpoint(&dir_for_task, &out, projector)
            .map_err(|e| anyhow::anyhow!("{e}"))
    })
    .await
    .context("export task")??;
    println!(
        "exported {} (step {}, {} tensors, {:.2} M values{}) to {}",
        dir.display(),
        summary.meta.step,
        summary.tensors,
        summary.elements as f64 / 1e6,
        if projector {
            ", with the projector"
        } else {
            ""
        },
        output.display()
    );
    println!("load it in PyTorch:");
    println!("{}", summary.snippet());
    Ok(())
}
