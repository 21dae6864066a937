//! One trainer child process: spawned with its assignment on stdin, events read from its stdout,
//! stderr kept in a log file and relayed to the coordinator in batches (the last lines also go
//! with the exit report), stopped with SIGTERM then
//! SIGKILL.
use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bt_proto::trainer_report::Body;
use bt_proto::*;
use prost::Message;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::Local;

/// Log lines kept for the exit report.
const TAIL_LINES: usize = 20;

/// Log lines relayed to the coordinator in one report at most.
const LOG_BATCH_LINES: usize = 64;
/// Lines are relayed at least this often while a trainer writes.
const LOG_FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Lines a trainer may have relayed per second; the excess is dropped and counted.
const LOG_LINES_PER_SEC: u32 = 200;

/// Batches a trainer's stderr lines into `LogLines` reports: bounded per report and per second
/// (what goes over is counted in the next report's `dropped`).
#[derive(Default)]
struct LogRelay {
    lines: Vec<String>,
    first_ms: i64,
    dropped: u64,
    window_start_ms: i64,
    in_window: u32,
}

impl LogRelay {
    fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.dropped == 0
    }

    fn push(&mut self, line: &str, report: &impl Fn(Body)) {
        let now = bt_common::now_ms();
        if now - self.window_start_ms >= 1000 {
            self.window_start_ms = now;
            self.in_window = 0;
        }
        if self.in_window >= LOG_LINES_PER_SEC {
            self.dropped += 1;
            return;
        }
        self.in_window += 1;
        if self.lines.is_empty() {
            self.first_ms = now;
        }
        self.lines.push(bt_common::domain::LogLine::bounded(line));
        if self.lines.len() >= LOG_BATCH_LINES {
            self.flush(report);
        }
    }

    fn flush(&mut self, report: &impl Fn(Body)) {
        if self.is_empty() {
            return;
        }
        let time_ms = if self.lines.is_empty() {
            bt_common::now_ms()
        } else {
            self.first_ms
        };
        report(Body::Logs(LogLines {
            lines: std::mem::take(&mut self.lines),
            dropped: std::mem::take(&mut self.dropped),
            time_ms,
        }));
    }
}

/// Exit code a trainer uses for an error in the job itself (bad spec, bad data): no restart helps.
const EXIT_USER_ERROR: i32 = crate::trainer::EXIT_USER_ERROR as i32;
/// Stopped on request after saving its state (see `trainer::EXIT_STOPPED`): a preemption.
const EXIT_STOPPED: i32 = crate::trainer::EXIT_STOPPED as i32;

pub struct TrainerHandle {
    pid: u32,
    done: watch::Receiver<bool>,
}

impl TrainerHandle {
    /// SIGTERM now, SIGKILL after `grace` if it is still running.
    pub fn stop(&self, grace: Duration) {
        signal(self.pid, libc::SIGTERM);
        let pid = self.pid;
        let mut done = self.done.clone();
        tokio::spawn(async move {
            if tokio::time::timeout(grace, done.wait_for(|d| *d))
                .await
                .is_err()
            {
                warn!(pid, "trainer ignored SIGTERM; killing it");
                signal(pid, libc::SIGKILL);
            }
        });
    }

    pub async fn wait(mut self) {
        let _ = self.done.wait_for(|d| *d).await;
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child's.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

pub(crate) fn spawn(
    bin: &Path,
    work_dir: &Path,
    a: Assignment,
    device_kind: bt_common::domain::DeviceKind,
    tx: mpsc::UnboundedSender<Local>,
) -> anyhow::Result<TrainerHandle> {
    let log_path = work_dir.join(format!("{}-e{}-r{}.log", a.job_id, a.epoch, a.rank));
    let mut cmd = Command::new(bin);
    cmd.arg("train")
        .arg("--device-kind")
        .arg(device_kind.name())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    // A trainer never outlives its daemon: killed with it (kill -9 included), it frees its device
    // and its store port at once instead of running on as an orphan nobody reports for.
    let daemon_pid = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the closure calls only async-signal-safe functions
    // (prctl, getppid, _exit) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The daemon died between fork and prctl: nobody would be told of this trainer.
            if libc::getppid() != daemon_pid {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start trainer {}: {e}", bin.display()))?;
    let pid = child.id().unwrap_or(0);
    let (done_tx, done_rx) = watch::channel(false);
    let mut stdin = child.stdin.take().expect("stdin piped");
    let stdout = child.stdout.take().expect("stdout piped");
    let stderr = child.stderr.take().expect("stderr piped");
    let (job_id, epoch, rank) = (a.job_id.clone(), a.epoch, a.rank);
    let report = {
        let tx = tx.clone();
        let job_id = job_id.clone();
        move |body: Body| {
            let _ = tx.send(Local::Report(Box::new(TrainerReport {
                job_id: job_id.clone(),
                epoch,
                rank,
                body: Some(body),
            })));
        }
    };
    report(Body::Started(TrainerStarted { pid }));
    let payload = a.encode_to_vec();
    tokio::spawn(async move {
        let _ = stdin.write_all(&payload).await;
        let _ = stdin.shutdown().await;
    });

    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
    let stderr_task = {
        let tail = tail.clone();
        let log_path = log_path.clone();
        let report = report.clone();
        tokio::spawn(async move {
            let mut log = tokio::fs::File::create(&log_path).await.ok();
            let mut lines = BufReader::new(stderr).lines();
            let mut relay = LogRelay::default();
            loop {
                // Waits for the next line; with lines in hand, at most until they are due.
                let next = if relay.is_empty() {
                    Ok(lines.next_line().await)
                } else {
                    tokio::time::timeout(LOG_FLUSH_EVERY, lines.next_line()).await
                };
                let line = match next {
                    Ok(Ok(Some(line))) => line,
                    Ok(Ok(None)) | Ok(Err(_)) => break,
                    Err(_due) => {
                        relay.flush(&report);
                        continue;
                    }
                };
                if let Some(f) = log.as_mut() {
                    let _ = f.write_all(format!("{line}\n").as_bytes()).await;
                }
                relay.push(&line, &report);
                let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
                if t.len() == TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
            // Before the exit report: the last lines tell why it ended.
            relay.flush(&report);
        })
    };
    let events_task = {
        let report = report.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(stdout);
            loop {
                match crate::ipc::read_event(&mut r).await {
                    Ok(Some(ev)) => {
                        use bt_proto::trainer_event::Body as E;
                        match ev.body {
                            Some(E::Metrics(m)) => report(Body::Metrics(m)),
                            Some(E::Eval(e)) => report(Body::Eval(e)),
                            Some(E::Checkpoint(c)) => report(Body::Checkpoint(c)),
                            Some(E::Notice(n)) => report(Body::Notice(n)),
                            Some(E::Picture(p)) => report(Body::Picture(p)),
                            None => {}
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        warn!(error = %e, "garbled trainer event stream; ignoring the rest");
                        break;
                    }
                }
            }
        })
    };
    tokio::spawn(async move {
        let status = child.wait().await;
        let _ = events_task.await;
        let _ = stderr_task.await;
        let last: Vec<String> = tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        let exit = match status {
            Ok(s) => {
                let code = s.code().unwrap_or(-1);
                let sig = s.signal().unwrap_or(0);
                let reason = if s.success() {
                    "finished".to_string()
                } else if code == EXIT_STOPPED {
                    "trainer stopped on request (state saved)".to_string()
                } else if sig != 0 {
                    format!("trainer killed by signal {sig}")
                } else {
                    let last_err = last
                        .iter()
                        .rev()
                        .find(|l| {
                            l.contains("error") || l.contains("ERROR") || l.contains("panicked")
                        })
                        .cloned()
                        .unwrap_or_default();
                    format!("trainer exited with code {code}: {last_err}")
                };
                TrainerExit {
                    success: s.success(),
                    code,
                    signal: sig,
                    user_error: code == EXIT_USER_ERROR,
                    preempted: code == EXIT_STOPPED,
                    reason,
                    last_log_lines: last,
                }
            }
            Err(e) => TrainerExit {
                success: false,
                code: -1,
                reason: format!("cannot wait for trainer: {e}"),
                last_log_lines: last,
                ..Default::default()
            },
        };
        info!(job_id = %job_id, epoch, rank, success = exit.success, code = exit.code, signal = exit.signal, log = %log_path.display(), "trainer exited");
        report(Body::Exit(exit));
        let _ = tx.send(Local::Exited {
            job_id,
            epoch,
            rank,
        });
        let _ = done_tx.send(true);
    });
    Ok(TrainerHandle { pid, done: done_rx })
}
