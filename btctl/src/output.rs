//! Text and JSON rendering of coordinator replies.
use bt_proto::*;
use serde_json::{json, Value};

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn utc_time(ms: i64) -> String {
    let (y, mo, d, h, mi, s, ms) = bt_common::utc_parts(ms);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
}

fn time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = (bt_common::now_ms() - ms).max(0) / 1000;
    match secs {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s => format!("{}h ago", s / 3600),
    }
}

pub fn metrics_json(m: &TrainMetrics) -> Value {
    json!({
        "step": m.step, "epoch": m.epoch, "total_steps": m.total_steps, "loss": m.loss,
        "on_diag": m.on_diag, "off_diag": m.off_diag, "off_diag_scaled": m.off_diag_scaled,
        "mean_diag": m.mean_diag, "mean_abs_off_diag": m.mean_abs_off_diag,
        "max_abs_off_diag": m.max_abs_off_diag, "lr": m.lr, "images_per_sec": m.images_per_sec,
        "skipped_images": m.skipped_images, "step_time_ms": m.step_time_ms,
    })
}

pub fn eval_json(e: &EvalResult) -> Value {
    let measured = |v: f64| (e.has_baselines || v > 0.0).then_some(v);
    json!({
        "kind": eval_kind(e), "step": e.step, "epoch": e.epoch, "top1": e.top1, "top5": e.top5,
        "baseline_top1": measured(e.baseline_top1),
        "raw_pixels_top1": measured(e.raw_pixels_top1),
        "margin": e.has_baselines.then_some(e.margin),
        "detail": e.detail,
    })
}

fn job_json(j: &Job) -> Value {
    json!({
        "id": j.id, "name": j.name, "kind": job_kind(j), "state": j.state().name(),
        "priority": j.priority, "world_size": j.world_size, "created_at_ms": j.created_at_ms,
        "updated_at_ms": j.updated_at_ms, "epoch": j.epoch, "attempts": j.attempts,
        "restarts_used": j.restarts_used, "max_restarts": j.max_restarts,
        "preemptions": j.preemptions,
        "failure_reason": j.failure_reason, "pending_reason": j.pending_reason,
        "total_steps": j.total_steps,
        "rendezvous": j.rendezvous,
        "last_metrics": j.last_metrics.as_ref().map(metrics_json),
        "placement": j.placement.iter().map(|p| json!({
            "rank": p.rank, "worker_id": p.worker_id, "worker_name": p.worker_name,
            "host": p.host, "device": p.device,
        })).collect::<Vec<_>>(),
        "evals": j.evals.iter().map(eval_json).collect::<Vec<_>>(),
        "spec": j.spec_toml,
    })
}

pub fn print_jobs(jobs: &[Job], as_json: bool) {
    if as_json {
        let v: Vec<Value> = jobs.iter().map(job_json).collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!(
        "{:<36}  {:<20} {:<10} {:>5} {:>12} {:>10}  CREATED",
        "ID", "NAME", "STATE", "RANKS", "STEP", "LOSS"
    );
    for j in jobs {
        let (step, loss) = match &j.last_metrics {
            Some(m) => (
                format!("{}/{}", m.step, m.total_steps),
                format!("{:.2}", m.loss),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<36}  {:<20} {:<10} {:>5} {:>12} {:>10}  {}",
            j.id,
            truncate(&j.name, 20),
            j.state().name(),
            j.world_size,
            step,
            loss,
            time(j.created_at_ms)
        );
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

pub fn print_job(j: &Job, as_json: bool) {
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&job_json(j)).unwrap_or_default()
        );
        return;
    }
    println!("id:        {}", j.id);
    println!("name:      {} ({})", j.name, job_kind(j));
    println!("state:     {}", j.state().name());
    println!("priority:  {}", j.priority);
    println!("ranks:     {}", j.world_size);
    println!(
        "attempts:  {} (epoch {}, restarts used {}/{}, preemptions {})",
        j.attempts, j.epoch, j.restarts_used, j.max_restarts, j.preemptions
    );
    println!("created:   {}", time(j.created_at_ms));
    if !j.rendezvous.is_empty() {
        println!("rendezvous: {}", j.rendezvous);
    }
    for p in &j.placement {
        println!(
            "  rank {:<3} worker {} ({}) device {}",
            p.rank, p.worker_name, p.host, p.device
        );
    }
    if let Some(m) = &j.last_metrics {
        println!(
            "progress:  step {}/{} epoch {}  loss {:.4} (on-diag {:.4}, off-diag {:.4} x lambda = {:.4})",
            m.step, m.total_steps, m.epoch, m.loss, m.on_diag, m.off_diag, m.off_diag_scaled
        );
        println!(
            "           mean C_ii {:.4}  mean |C_ij| {:.4}  max |C_ij| {:.4}  lr {:.5}  {:.1} img/s",
            m.mean_diag, m.mean_abs_off_diag, m.max_abs_off_diag, m.lr, m.images_per_sec
        );
        if m.skipped_images > 0 {
            println!("           skipped images: {}", m.skipped_images);
        }
    }
    for e in &j.evals {
        println!("eval:      {}", eval_line(e));
    }
    if !j.pending_reason.is_empty() {
        println!("waiting:   {}", j.pending_reason);
    }
    if !j.failure_reason.is_empty() {
        println!(
            "failure:   {}",
            j.failure_reason.replace('\n', "\n           ")
        );
    }
}

pub fn eval_line(e: &EvalResult) -> String {
    let mut s = format!(
        "{} at step {} (epoch {}): top-1 {:.2}%",
        eval_kind(e),
        e.step,
        e.epoch,
        100.0 * e.top1
    );
    if e.top5 > 0.0 {
        s += &format!(", top-5 {:.2}%", 100.0 * e.top5);
    }
    if let Some(b) = baselines(e) {
        s += &format!("; {b}");
    }
    if !e.detail.is_empty() {
        s += &format!(" [{}]", e.detail);
    }
    s
}

/// "random-init top-1 71.9%, raw pixels 79.4%, margin +6.1 points" (what was measured).
fn baselines(e: &EvalResult) -> Option<String> {
    let mut parts = Vec::new();
    if e.has_baselines || e.baseline_top1 > 0.0 {
        parts.push(format!(
            "random-init (default init) top-1 {:.2}%",
            100.0 * e.baseline_top1
        ));
    }
    if e.has_baselines || e.raw_pixels_top1 > 0.0 {
        parts.push(format!("raw pixels {:.2}%", 100.0 * e.raw_pixels_top1));
    }
    if e.has_baselines {
        parts.push(format!(
            "margin {:+.2} points over the better baseline",
            100.0 * e.margin
        ));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

// The closed sets below travel as an enum (preferred) and as a name (what older coordinators
// send); a value this btctl does not know is shown as it came.

fn eval_kind(e: &EvalResult) -> String {
    bt_proto::convert::eval_kind(e).map_or_else(|_| e.kind.clone(), |k| k.name().into())
}

fn job_kind(j: &Job) -> String {
    bt_proto::convert::job_kind(j).map_or_else(
        |_| j.kind.clone(),
        |k| bt_common::domain::job_kind_name(k).into(),
    )
}

fn device_kind(d: &bt_proto::Device) -> String {
    bt_proto::convert::device_kind(d).map_or_else(|_| d.kind.clone(), |k| k.name().into())
}

/// A checkpoint's evaluation state, "-" when none was requested.
fn eval_state(c: &CheckpointInfo) -> String {
    match bt_proto::convert::checkpoint_eval_state(c) {
        Ok(Some(s)) => s.name().into(),
        Ok(None) => "-".into(),
        Err(_) => c.eval_state.clone(),
    }
}

/// A checkpoint's evaluation in one short cell: its state, and the probe's result once done.
fn checkpoint_eval(c: &CheckpointInfo) -> String {
    let state = eval_state(c);
    match &c.eval {
        Some(e) if state == "done" => {
            let mut s = format!("done: top-1 {:.2}%", 100.0 * e.top1);
            if let Some(b) = baselines(e) {
                s += &format!(" ({b})");
            }
            s
        }
        _ => state.to_string(),
    }
}

pub fn print_workers(ws: &[Worker], as_json: bool) {
    let state = |w: &Worker| match w.state() {
        WorkerState::Online => "online",
        WorkerState::Lost => "lost",
        WorkerState::Unspecified => "unknown",
    };
    if as_json {
        let v: Vec<Value> = ws
            .iter()
            .map(|w| {
                json!({
                    "id": w.id, "name": w.name, "host": w.host, "state": state(w),
                    "last_seen_ms": w.last_seen_ms, "busy_devices": w.busy_devices,
                    "drained": w.drained, "unhealthy": w.unhealthy,
                    "protocol_version": w.protocol_version, "features_off": w.features_off,
                    "devices": w.devices.iter().map(|d| json!({
                        "index": d.index, "kind": device_kind(d), "name": d.name})).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!(
        "{:<36}  {:<16} {:<16} {:<9} {:>7}  {:<19}  DRAINED / UNHEALTHY",
        "ID", "NAME", "HOST", "STATE", "BUSY", "LAST SEEN"
    );
    for w in ws {
        println!(
            "{:<36}  {:<16} {:<16} {:<9} {:>3}/{:<3}  {:<19}  {}",
            w.id,
            truncate(&w.name, 16),
            truncate(&w.host, 16),
            // Connected, but its node offers nothing (GPUs expected, none usable).
            if w.unhealthy.is_empty() || w.state() != WorkerState::Online {
                state(w)
            } else {
                "unhealthy"
            },
            w.busy_devices,
            w.devices.len(),
            time(w.last_seen_ms),
            match (w.drained.is_empty(), w.unhealthy.is_empty()) {
                (true, true) => "-".to_string(),
                (false, true) => w.drained.clone(),
                (true, false) => format!("unhealthy: {}", w.unhealthy),
                (false, false) => format!("{}; unhealthy: {}", w.drained, w.unhealthy),
            }
        );
    }
    // Daemons one protocol version behind the coordinator (mid-upgrade) run with some features
    // off: say which, under the table.
    for w in ws.iter().filter(|w| !w.features_off.is_empty()) {
        println!(
            "note: {} speaks protocol {} (older than the coordinator's): off for it: {}",
            w.name,
            w.protocol_version,
            w.features_off.join(", ")
        );
    }
}

pub fn print_checkpoints(cps: &[CheckpointInfo], as_json: bool) {
    if as_json {
        let v: Vec<Value> = cps
            .iter()
            .map(|c| {
                json!({"job_id": c.job_id, "step": c.step, "epoch": c.epoch, "path": c.path,
                "created_at_ms": c.created_at_ms, "size_bytes": c.size_bytes, "sha256": c.sha256,
                "eval_state": Some(eval_state(c)).filter(|s| s != "-").unwrap_or_default(), "eval_job_id": c.eval_job_id,
                "eval": c.eval.as_ref().map(eval_json)})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!(
        "{:>8} {:>6} {:>10}  {:<12} PATH  EVAL",
        "STEP", "EPOCH", "SIZE", "CREATED"
    );
    for c in cps {
        println!(
            "{:>8} {:>6} {:>9.1}M  {:<12} {}  {}",
            c.step,
            c.epoch,
            c.size_bytes as f64 / 1e6,
            time(c.created_at_ms),
            c.path,
            checkpoint_eval(c)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knn(has_baselines: bool) -> EvalResult {
        EvalResult {
            step: 300,
            epoch: 2,
            kind: "knn".into(),
            top1: 0.861,
            top5: 0.99,
            baseline_top1: 0.723,
            raw_pixels_top1: 0.795,
            margin: 0.066,
            has_baselines,
            detail: "k=200".into(),
            ..Default::default()
        }
    }

    #[test]
    fn utc_times_are_civil_dates() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_time(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc_time(1_796_408_889_001), "2026-12-04T18:28:09.001Z");
        assert_eq!(utc_time(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn evaluations_show_both_baselines_and_the_margin() {
        let line = eval_line(&knn(true));
        assert!(line.contains("top-1 86.10%"), "{line}");
        assert!(
            line.contains("random-init (default init) top-1 72.30%"),
            "{line}"
        );
        assert!(line.contains("raw pixels 79.50%"), "{line}");
        assert!(line.contains("margin +6.60 points"), "{line}");
        let v = eval_json(&knn(true));
        assert_eq!(v["raw_pixels_top1"], json!(0.795));
        assert_eq!(v["margin"], json!(0.066));
        // Not measured: no baseline numbers, no margin.
        let bare = EvalResult {
            baseline_top1: 0.0,
            raw_pixels_top1: 0.0,
            margin: 0.0,
            ..knn(false)
        };
        assert!(
            !eval_line(&bare).contains("baseline"),
            "{}",
            eval_line(&bare)
        );
        assert_eq!(eval_json(&bare)["margin"], Value::Null);
        let c = CheckpointInfo {
            eval_state: "done".into(),
            eval: Some(EvalResult {
                kind: "linear_probe".into(),
                ..knn(true)
            }),
            ..Default::default()
        };
        let cell = checkpoint_eval(&c);
        assert!(
            cell.starts_with("done: top-1 86.10%") && cell.contains("raw pixels 79.50%"),
            "{cell}"
        );
        let pending = CheckpointInfo {
            eval_state: "pending".into(),
            ..Default::default()
        };
        assert_eq!(checkpoint_eval(&pending), "pending");
        assert_eq!(checkpoint_eval(&CheckpointInfo::default()), "-");
    }
}
