//! `btctl tensorboard JOB DIR`: a job's persisted history as TensorBoard event files, readable by
//! the stock `tensorboard` package (`tensorboard --logdir DIR`).
//!
//! The file format is TensorFlow's record framing of `Event` protocol buffers: per record, the
//! length (u64, little-endian), the masked CRC-32C of the length, the bytes, the masked CRC-32C of
//! the bytes; the first event names the file version (`brain.Event:2`). Only the few message
//! fields written here are declared below (field numbers from TensorFlow's `event.proto` and
//! `summary.proto`).
//!
//! Written: every training metric as a scalar under `train/` (loss, the on-diagonal term, the
//! λ-scaled off-diagonal term, mean C_ii, mean and max |C_ij|, learning rate, images/s, step time),
//! every evaluation under `eval/<kind>/` (top-1, top-5, both baselines, the margin), every |C|
//! picture as a grey image under `train/abs_cross_correlation` (white: |C_ij| = 1). State changes
//! and notices are not written (TensorBoard has no event log; `btctl watch` shows them).
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bt_proto::job_event::Kind;
use bt_proto::{JobEvent, WatchJobRequest};
use prost::Message;

use crate::{connect, rpc_err, Conn};

#[derive(Clone, PartialEq, prost::Message)]
pub struct TfEvent {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<TfSummary>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TfSummary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<TfValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TfValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    #[prost(message, optional, tag = "4")]
    pub image: Option<TfImage>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TfImage {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    /// 1: grey.
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    /// A PNG file.
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

/// The tag the |C| pictures are written under.
pub const PICTURE_TAG: &str = "train/abs_cross_correlation";

/// A grey PNG of `side` × `side` cells (0 black, 255 white).
fn grey_png(side: u32, cells: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, side, side);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().context("encoding a PNG")?;
        w.write_image_data(cells).context("encoding a PNG")?;
    }
    Ok(out)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bitwise.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
        }
    }
    !crc
}

/// TensorFlow's masked CRC: rotated right by 15 bits plus a constant.
fn masked_crc(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One event file being written.
pub struct EventWriter {
    out: BufWriter<File>,
    pub path: PathBuf,
    pub records: u64,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<secs>.<host>.bt` and writes the version record.
    pub fn create(dir: &Path, wall_time: f64) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .unwrap_or_else(|| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.bt",
            wall_time.floor() as i64
        ));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = EventWriter {
            out: BufWriter::new(file),
            path,
            records: 0,
        };
        w.write(&TfEvent {
            wall_time,
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        Ok(w)
    }

    pub fn write(&mut self, event: &TfEvent) -> Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(&data)?;
        self.out.write_all(&masked_crc(&data).to_le_bytes())?;
        self.records += 1;
        Ok(())
    }

    /// Scalars at one step.
    pub fn scalars(&mut self, wall_time: f64, step: u64, values: &[(String, f64)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.write(&TfEvent {
            wall_time,
            step: step as i64,
            file_version: None,
            summary: Some(TfSummary {
                value: values
                    .iter()
                    .map(|(tag, v)| TfValue {
                        tag: tag.clone(),
                        simple_value: Some(*v as f32),
                        image: None,
                    })
                    .collect(),
            }),
        })
    }

    /// The |C| picture at its step, as a grey image.
    pub fn picture(&mut self, wall_time: f64, p: &bt_proto::CorrelationPicture) -> Result<()> {
        let side = p.side;
        anyhow::ensure!(
            side > 0 && p.cells.len() == (side as usize).pow(2),
            "a picture of side {side} with {} cells",
            p.cells.len()
        );
        self.write(&TfEvent {
            wall_time,
            step: p.step as i64,
            file_version: None,
            summary: Some(TfSummary {
                value: vec![TfValue {
                    tag: PICTURE_TAG.into(),
                    simple_value: None,
                    image: Some(TfImage {
                        height: side as i32,
                        width: side as i32,
                        colorspace: 1,
                        encoded_image_string: grey_png(side, &p.cells)?,
                    }),
                }],
            }),
        })
    }

    pub fn finish(mut self) -> Result<PathBuf> {
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.out
            .get_ref()
            .sync_all()
            .with_context(|| format!("syncing {}", self.path.display()))?;
        Ok(self.path)
    }
}

/// The scalars of one history event (empty for kinds TensorBoard has no place for).
pub fn event_scalars(e: &JobEvent) -> Vec<(String, f64)> {
    match &e.kind {
        Some(Kind::Metrics(m)) => vec![
            ("train/loss".into(), m.loss),
            ("train/on_diag".into(), m.on_diag),
            ("train/off_diag_scaled".into(), m.off_diag_scaled),
            ("train/mean_diag".into(), m.mean_diag),
            ("train/mean_abs_off_diag".into(), m.mean_abs_off_diag),
            ("train/max_abs_off_diag".into(), m.max_abs_off_diag),
            ("train/lr".into(), m.lr),
            ("train/images_per_sec".into(), m.images_per_sec),
            ("train/step_time_ms".into(), m.step_time_ms),
        ],
        Some(Kind::Eval(r)) => {
            let kind = if r.kind.is_empty() { "eval" } else { &r.kind };
            let mut v = vec![
                (format!("eval/{kind}/top1"), r.top1),
                (format!("eval/{kind}/top5"), r.top5),
            ];
            if r.has_baselines {
                v.push((format!("eval/{kind}/random_init_top1"), r.baseline_top1));
                v.push((format!("eval/{kind}/raw_pixels_top1"), r.raw_pixels_top1));
                v.push((format!("eval/{kind}/margin"), r.margin));
            }
            v
        }
        _ => Vec::new(),
    }
}

/// Writes a history (events in order) into `dir`; returns the file and the count of scalar and
/// image events.
pub fn write_history(dir: &Path, events: &[JobEvent]) -> Result<(PathBuf, u64)> {
    let start = events
        .first()
        .map(|e| e.time_ms as f64 / 1e3)
        .unwrap_or_else(|| bt_common::now_ms() as f64 / 1e3);
    let mut w = EventWriter::create(dir, start)?;
    let mut n = 0;
    for e in events {
        let wall_time = e.time_ms as f64 / 1e3;
        if let Some(Kind::Picture(p)) = &e.kind {
            w.picture(wall_time, p)?;
            n += 1;
            continue;
        }
        let values = event_scalars(e);
        if !values.is_empty() {
            w.scalars(wall_time, e.step, &values)?;
            n += 1;
        }
    }
    Ok((w.finish()?, n))
}

pub async fn tensorboard(conn: &Conn, job_id: &str, dir: &Path) -> Result<()> {
    let mut c = connect(conn).await?;
    let mut stream = c
        .watch_job(WatchJobRequest {
            job_id: job_id.to_string(),
            from_step: 0,
            follow: false,
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
    let mut events = Vec::new();
    while let Some(e) = stream.message().await.map_err(rpc_err)? {
        events.push(e);
    }
    let job_dir = dir.join(job_id);
    let (path, n) = write_history(&job_dir, &events)?;
    println!(
        "wrote {n} scalar and image events of job {job_id} ({} history events) to {}",
        events.len(),
        path.display()
    );
    println!("view them: tensorboard --logdir {}", dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C of "123456789" is 0xE3069283 (RFC 3720's check value).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    fn metrics(step: u64, loss: f64) -> JobEvent {
        JobEvent {
            seq: step,
            time_ms: 1_700_000_000_000 + step as i64 * 1000,
            step,
            job_id: "j".into(),
            kind: Some(Kind::Metrics(bt_proto::TrainMetrics {
                step,
                loss,
                on_diag: loss / 2.0,
                off_diag_scaled: loss / 4.0,
                mean_diag: 0.5,
                lr: 0.1,
                images_per_sec: 123.0,
                ..Default::default()
            })),
        }
    }

    /// TensorBoard's own reader (the Python `tensorboard` package) reads the scalars back.
    #[test]
    fn tensorboard_reads_the_scalars_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut events: Vec<JobEvent> =
            (1..=5).map(|s| metrics(s * 10, 100.0 / s as f64)).collect();
        events.push(JobEvent {
            seq: 99,
            time_ms: 1_700_000_100_000,
            step: 50,
            job_id: "j".into(),
            kind: Some(Kind::Eval(bt_proto::EvalResult {
                step: 50,
                kind: "knn".into(),
                top1: 0.77,
                top5: 0.99,
                baseline_top1: 0.68,
                raw_pixels_top1: 0.79,
                margin: -0.02,
                has_baselines: true,
                ..Default::default()
            })),
        });
        events.push(JobEvent {
            seq: 100,
            time_ms: 1_700_000_100_000,
            step: 50,
            job_id: "j".into(),
            kind: Some(Kind::Picture(bt_proto::CorrelationPicture {
                step: 50,
                side: 4,
                cells: (0..16).map(|i| i * 16).collect(),
                mean_diag: 0.9,
                mean_abs_off_diag: 0.1,
            })),
        });
        let (path, n) = write_history(dir.path(), &events).unwrap();
        assert_eq!(n, 7);
        assert!(path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .contains("tfevents"));
        let py = std::env::var("BT_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = std::process::Command::new(py)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/tensorboard_reader.py"
            ))
            .arg(dir.path())
            .output()
            .expect("running python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        /// (step, width, height, the first row's grey values)
        type ImageRow = (u64, u32, u32, Vec<u8>);
        #[derive(serde::Deserialize)]
        struct Read {
            scalars: std::collections::BTreeMap<String, Vec<(u64, f64)>>,
            /// tag → its images
            images: std::collections::BTreeMap<String, Vec<ImageRow>>,
        }
        let read: Read = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            read.images[PICTURE_TAG],
            vec![(50, 4, 4, vec![0, 16, 32, 48])],
            "the picture decodes to its cells"
        );
        let got = read.scalars;
        let loss = &got["train/loss"];
        assert_eq!(loss.len(), 5);
        for (i, (step, v)) in loss.iter().enumerate() {
            let s = (i as u64 + 1) * 10;
            assert_eq!(*step, s);
            assert!((v - 100.0 / (i as f64 + 1.0)).abs() < 1e-4, "{v}");
        }
        assert_eq!(got["train/images_per_sec"][0].1, 123.0);
        assert_eq!(got["eval/knn/top1"], vec![(50, 0.77f32 as f64)]);
        assert_eq!(got["eval/knn/raw_pixels_top1"], vec![(50, 0.79f32 as f64)]);
        assert_eq!(got["eval/knn/margin"], vec![(50, -0.02f32 as f64)]);
    }
}
