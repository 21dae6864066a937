//! Where a trainer's events go: length-delimited prost messages on stdout (to the daemon), a
//! collecting buffer in tests, or readable lines on stdout (`bt-bench pretrain`).
use bt_proto::trainer_event::Body;
use bt_proto::TrainerEvent;

enum Sink {
    Daemon(std::io::Stdout),
    Collect,
    /// Lines prefixed with the seconds since the reporter was made.
    Lines(std::time::Instant),
}

pub struct Reporter {
    sink: Sink,
    /// Events kept when there is no stdout sink (tests, benchmarks).
    pub collected: Vec<TrainerEvent>,
}

impl Reporter {
    pub fn stdout() -> Self {
        Reporter {
            sink: Sink::Daemon(std::io::stdout()),
            collected: Vec::new(),
        }
    }

    pub fn collecting() -> Self {
        Reporter {
            sink: Sink::Collect,
            collected: Vec::new(),
        }
    }

    /// Prints each event as one line on stdout, prefixed with the seconds since this call
    /// (`[  81.2s] eval knn ...`), and keeps it in `collected` too.
    pub fn lines() -> Self {
        Reporter {
            sink: Sink::Lines(std::time::Instant::now()),
            collected: Vec::new(),
        }
    }

    pub fn send(&mut self, body: Body) {
        let ev = TrainerEvent { body: Some(body) };
        match &mut self.sink {
            Sink::Daemon(out) => {
                let mut lock = out.lock();
                if let Err(e) = crate::ipc::write_event(&mut lock, &ev) {
                    tracing::warn!(error = %e, "cannot write event to the daemon");
                }
            }
            Sink::Collect => self.collected.push(ev),
            Sink::Lines(t0) => {
                if let Some(b) = &ev.body {
                    println!("[{:>7.1}s] {}", t0.elapsed().as_secs_f64(), line(b));
                }
                self.collected.push(ev);
            }
        }
    }

    pub fn notice(&mut self, level: bt_common::domain::NoticeLevel, message: impl Into<String>) {
        self.send(Body::Notice(
            bt_common::domain::Notice {
                level,
                message: message.into(),
            }
            .into(),
        ));
    }
}

/// One readable line per event (metrics, evaluations with their baselines, checkpoints, notices).
fn line(b: &Body) -> String {
    match b {
        Body::Picture(p) => format!(
            "|C| picture step {}: {}x{}, mean C_ii {:.3}, mean |C_ij| {:.4}",
            p.step, p.side, p.side, p.mean_diag, p.mean_abs_off_diag
        ),
        Body::Metrics(m) => format!(
            "step {}/{} epoch {} loss {:.3} on-diag {:.3} off-diag(λ) {:.3} mean C_ii {:.3} lr {:.4} {:.1} img/s",
            m.step, m.total_steps, m.epoch, m.loss, m.on_diag, m.off_diag_scaled, m.mean_diag,
            m.lr, m.images_per_sec
        ),
        Body::Eval(e) => {
            let mut s = format!(
                "eval {} step {} epoch {}: top-1 {:.2}% top-5 {:.2}%",
                e.kind,
                e.step,
                e.epoch,
                100.0 * e.top1,
                100.0 * e.top5
            );
            if e.has_baselines {
                s += &format!(
                    "; random-init {:.2}%, raw pixels {:.2}%, margin {:+.2} points",
                    100.0 * e.baseline_top1,
                    100.0 * e.raw_pixels_top1,
                    100.0 * e.margin
                );
            }
            format!("{s} [{}]", e.detail)
        }
        Body::Checkpoint(c) => format!("checkpoint step {} -> {}", c.step, c.path),
        Body::Notice(n) => format!("{}: {}", n.level, n.message),
    }
}
