//! Trainer → daemon events: length-delimited prost `TrainerEvent`s on the trainer's stdout.
use std::io::Write;

use bt_proto::TrainerEvent;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest event accepted from a trainer (a |C| picture is well below this).
const MAX_EVENT: u64 = 16 << 20;

/// Writes one event and flushes.
pub fn write_event(w: &mut impl Write, ev: &TrainerEvent) -> std::io::Result<()> {
    w.write_all(&ev.encode_length_delimited_to_vec())?;
    w.flush()
}

/// Reads one event; `Ok(None)` at a clean end of stream.
pub async fn read_event(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<TrainerEvent>> {
    let mut len: u64 = 0;
    let mut shift = 0;
    loop {
        let mut b = [0u8; 1];
        if r.read(&mut b).await? == 0 {
            if shift == 0 {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        len |= u64::from(b[0] & 0x7f) << shift;
        if b[0] & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 63 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "bad length prefix",
            ));
        }
    }
    if len > MAX_EVENT {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("event of {len} bytes is over the {MAX_EVENT}-byte limit"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).await?;
    TrainerEvent::decode(buf.as_slice())
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bt_proto::{trainer_event::Body, Notice};

    #[tokio::test]
    async fn roundtrip_and_garbage() {
        let ev = TrainerEvent {
            body: Some(Body::Notice(Notice {
                level: "info".into(),
                message: "hello".into(),
                ..Default::default()
            })),
        };
        let mut buf = Vec::new();
        write_event(&mut buf, &ev).unwrap();
        write_event(&mut buf, &ev).unwrap();
        let mut r = buf.as_slice();
        assert_eq!(read_event(&mut r).await.unwrap(), Some(ev.clone()));
        assert_eq!(read_event(&mut r).await.unwrap(), Some(ev));
        assert_eq!(read_event(&mut r).await.unwrap(), None);
        let mut bad: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(read_event(&mut bad).await.is_err());
    }
}
