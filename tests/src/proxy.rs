//! A TCP proxy for partition faults. It forwards bytes both ways between its listener and an
//! upstream address. When it is *stalled*, it stops moving bytes but keeps every socket open: a
//! network partition that neither side sees as a closed connection (no FIN, no RST), only as
//! silence, the way a dropped link or a hung switch looks. Un-stalled, the queued bytes flow again.
//! A stall is also the black hole a vanished node leaves (its packets dropped): connections opened
//! during it are accepted but carry nothing either way, so a client's connect or handshake times
//! out rather than being refused.
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often an idle or stalled pump looks at the flags.
const TICK: Duration = Duration::from_millis(20);

struct Shared {
    upstream: SocketAddr,
    stalled: AtomicBool,
    closed: AtomicBool,
    /// Every socket of every connection, to close them all on drop.
    sockets: Mutex<Vec<TcpStream>>,
}

/// A running proxy; dropping it closes its listener and every connection.
pub struct Proxy {
    /// Where clients connect (`127.0.0.1:port`).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream,
            stalled: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        std::thread::spawn(move || accept_loop(listener, s));
        Proxy { addr, shared }
    }

    /// Stops (true) or resumes (false) moving bytes; connections stay open either way.
    pub fn stall(&self, on: bool) {
        self.shared.stalled.store(on, Ordering::SeqCst);
    }

    pub fn is_stalled(&self) -> bool {
        self.shared.stalled.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        for s in self.shared.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.closed.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                // Accepted even while stalled (the kernel would complete the handshake anyway);
                // what the partition holds back is the traffic.
                let Ok(server) =
                    TcpStream::connect_timeout(&shared.upstream, Duration::from_secs(2))
                else {
                    continue; // upstream down (a coordinator restart): the client sees a close
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let clones = (client.try_clone(), server.try_clone());
                let (Ok(c2), Ok(s2)) = clones else { continue };
                {
                    let mut socks = shared.sockets.lock().unwrap();
                    socks.retain(|s| s.peer_addr().is_ok());
                    if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
                        socks.push(a);
                        socks.push(b);
                    }
                }
                let (a, b) = (shared.clone(), shared.clone());
                std::thread::spawn(move || pump(client, s2, &a));
                std::thread::spawn(move || pump(server, c2, &b));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(TICK),
            Err(_) => std::thread::sleep(TICK),
        }
    }
}

/// Copies `from` → `to` until either side closes, holding bytes back while stalled.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared) {
    let _ = from.set_read_timeout(Some(TICK));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if shared.closed.load(Ordering::SeqCst) {
            break;
        }
        if shared.stalled.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // Bytes read just as the stall began are held back too.
                while shared.stalled.load(Ordering::SeqCst) && !shared.closed.load(Ordering::SeqCst)
                {
                    std::thread::sleep(TICK);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_stalls_without_closing_then_resumes() {
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let up_addr = upstream.local_addr().unwrap();
        // An echo server.
        std::thread::spawn(move || {
            let (mut s, _) = upstream.accept().unwrap();
            let mut b = [0u8; 16];
            while let Ok(n) = s.read(&mut b) {
                if n == 0 || s.write_all(&b[..n]).is_err() {
                    break;
                }
            }
        });
        let p = Proxy::start(up_addr);
        let mut c = TcpStream::connect(p.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 4];
        c.write_all(b"ping").unwrap();
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        p.stall(true);
        c.write_all(b"pong").unwrap();
        let e = c.read(&mut b).unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "stalled: silence, not a close ({e})"
        );
        p.stall(false);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"pong", "held-back bytes arrive after the stall");
    }

    #[test]
    fn a_connection_opened_during_a_stall_carries_nothing_until_it_ends() {
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let up_addr = upstream.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = upstream.accept().unwrap();
            let _ = s.write_all(b"hi");
            std::thread::sleep(Duration::from_secs(5));
        });
        let p = Proxy::start(up_addr);
        p.stall(true);
        let mut c = TcpStream::connect(p.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 2];
        let e = c.read(&mut b).unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "black hole: silence ({e})"
        );
        p.stall(false);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
    }
}
