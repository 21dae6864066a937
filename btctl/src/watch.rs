//! `btctl watch`: follows a job's event stream with a progress bar (or plain lines).
use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use bt_proto::job_event::Kind;
use bt_proto::*;
use indicatif::{ProgressBar, ProgressStyle};

use crate::output::eval_line;

pub async fn watch(
    c: &mut crate::Client,
    job_id: &str,
    from_step: u64,
    plain: bool,
) -> Result<ExitCode> {
    let mut stream = c
        .watch_job(WatchJobRequest {
            job_id: job_id.to_string(),
            from_step,
            follow: true,
        })
        .await
        .map_err(crate::rpc_err)?
        .into_inner();
    let plain = plain || !std::io::stderr().is_terminal();
    let bar = if plain {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}  ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    };
    let say = |line: String| {
        if plain {
            println!("{line}");
        } else {
            bar.println(line);
        }
    };
    let mut last_state = JobState::Unspecified;
    while let Some(ev) = stream.message().await.map_err(crate::rpc_err)? {
        match ev.kind {
            Some(Kind::State(s)) => {
                last_state = s.state();
                let mut line = format!("state: {}", last_state.name());
                if s.epoch > 0 {
                    line += &format!(" (attempt epoch {})", s.epoch);
                }
                if !s.reason.is_empty() {
                    line += &format!(": {}", s.reason);
                }
                say(line);
            }
            Some(Kind::Metrics(m)) => {
                if m.total_steps > 0 {
                    bar.set_length(m.total_steps);
                }
                bar.set_position(m.step);
                bar.set_message(format!(
                    "loss {:.2}  on {:.2} off {:.2}  C_ii {:.3}  {:.0} img/s",
                    m.loss, m.on_diag, m.off_diag_scaled, m.mean_diag, m.images_per_sec
                ));
                if plain {
                    println!(
                        "step {}/{} epoch {}  loss {:.4}  on-diag {:.4}  off-diag(λ) {:.4}  mean C_ii {:.4}  mean|C_ij| {:.4}  lr {:.5}  {:.1} img/s",
                        m.step, m.total_steps, m.epoch, m.loss, m.on_diag, m.off_diag_scaled,
                        m.mean_diag, m.mean_abs_off_diag, m.lr, m.images_per_sec
                    );
                }
            }
            Some(Kind::Eval(e)) => say(format!("eval: {}", eval_line(&e))),
            Some(Kind::Checkpoint(cp)) => say(format!(
                "checkpoint: step {} -> {} ({:.1} MB)",
                cp.step,
                cp.path,
                cp.size_bytes as f64 / 1e6
            )),
            Some(Kind::Notice(n)) => {
                let level =
                    bt_proto::convert::notice_level(&n).map_or(n.level.as_str(), |l| l.name());
                say(format!("{level}: {}", n.message))
            }
            Some(Kind::Missed(m)) => say(format!(
                "warning: this watcher fell behind and missed {} events",
                m.count
            )),
            // The |C| picture is drawn by the dashboard and exported by `btctl tensorboard`.
            Some(Kind::Picture(_)) | None => {}
        }
    }
    bar.finish_and_clear();
    if !last_state.is_terminal() {
        // The stream ended early (coordinator restart?): report the job's state as it is now.
        let job = c
            .get_job(GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await
            .map_err(crate::rpc_err)?
            .into_inner();
        last_state = job.state();
    }
    println!("job {job_id} {}", last_state.name());
    crate::exit_for(last_state)
}
