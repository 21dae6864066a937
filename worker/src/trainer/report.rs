//! Where a trainer's events go: length-delimited prost messages on stdout (to the daemon), or
//! a collecting buffer in tests.
use bt_proto::trainer_event::Body;
use bt_proto::TrainerEvent;

pub struct Reporter {
    out: Option<std::io::Stdout>,
    /// Events kept when there is no stdout sink (tests, benchmarks).
    pub collected: Vec<TrainerEvent>,
}

impl Reporter {
    pub fn stdout() -> Self {
        Reporter {
            out: Some(std::io::stdout()),
            collected: Vec::new(),
        }
    }

    pub fn collecting() -> Self {
        Reporter {
            out: None,
            collected: Vec::new(),
        }
    }

    pub fn send(&mut self, body: Body) {
        let ev = TrainerEvent { body: Some(body) };
        match self.out.as_mut() {
            Some(out) => {
                let mut lock = out.lock();
                if let Err(e) = crate::ipc::write_event(&mut lock, &ev) {
                    tracing::warn!(error = %e, "cannot write event to the daemon");
                }
            }
            None => self.collected.push(ev),
        }
    }

    pub fn notice(&mut self, level: &str, message: impl Into<String>) {
        self.send(Body::Notice(bt_proto::Notice {
            level: level.into(),
            message: message.into(),
        }));
    }
}
