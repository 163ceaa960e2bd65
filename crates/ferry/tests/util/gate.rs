//! A TCP forwarder that holds one direction's bytes back once a given
//! number have passed, until the test lets them go: a transfer paused at a
//! known point, with nothing lost, so that a test can change the source
//! while the sender is in the middle of it.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

const TICK: Duration = Duration::from_millis(5);

#[derive(Default)]
struct Shared {
    /// Whether the held direction is client to server (an upload's data).
    hold_up: bool,
    /// Bytes of the held direction forwarded, over all connections.
    passed: AtomicU64,
    hold_at: AtomicU64,
    released: AtomicBool,
    stop: AtomicBool,
}

/// Forwards 127.0.0.1:PORT to a target; holds the bytes of one direction
/// once `hold_at` have passed (over all connections) until
/// [`Gate::release`].
pub struct Gate {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Gate {
    /// Holds what the client sends: an upload's data.
    pub fn upload(target: SocketAddr, hold_at: u64) -> Gate {
        Self::start(target, hold_at, true)
    }

    /// Holds what the server sends: a download's data.
    pub fn download(target: SocketAddr, hold_at: u64) -> Gate {
        Self::start(target, hold_at, false)
    }

    fn start(target: SocketAddr, hold_at: u64, hold_up: bool) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            hold_up,
            ..Shared::default()
        });
        shared.hold_at.store(hold_at, Ordering::SeqCst);
        let accepting = shared.clone();
        thread::spawn(move || {
            while !accepting.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => forward(client, target, &accepting),
                    Err(_) => thread::sleep(TICK),
                }
            }
        });
        Gate { addr, shared }
    }

    /// `--host 127.0.0.1 --port PORT` of the gate.
    pub fn client_args(&self) -> Vec<String> {
        let port = self.addr.port().to_string();
        ["--host", "127.0.0.1", "--port", &port]
            .map(String::from)
            .to_vec()
    }

    /// Bytes of the held direction forwarded so far, over all connections.
    pub fn passed(&self) -> u64 {
        self.shared.passed.load(Ordering::SeqCst)
    }

    /// Whether bytes are being held now.
    pub fn holding(&self) -> bool {
        is_held(&self.shared)
    }

    pub fn release(&self) {
        self.shared.released.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn forward(client: TcpStream, target: SocketAddr, shared: &Arc<Shared>) {
    let Ok(server) = TcpStream::connect(target) else {
        return;
    };
    client.set_nonblocking(false).unwrap();
    let pairs = [
        (
            client.try_clone().unwrap(),
            server.try_clone().unwrap(),
            true,
        ),
        (server, client, false),
    ];
    for (from, to, up) in pairs {
        let shared = shared.clone();
        thread::spawn(move || pump(from, to, up, &shared));
    }
}

/// Copy until end-of-file; the held direction waits at the gate. Whole
/// reads are written before the gate is checked again: nothing is dropped.
fn pump(mut from: TcpStream, mut to: TcpStream, up: bool, shared: &Shared) {
    let mut buf = vec![0u8; 64 * 1024];
    let gated = up == shared.hold_up;
    loop {
        while gated && is_held(shared) && !shared.stop.load(Ordering::SeqCst) {
            thread::sleep(TICK);
        }
        // Never past the gate in one read.
        let room = if gated && !shared.released.load(Ordering::SeqCst) {
            let passed = shared.passed.load(Ordering::SeqCst);
            let left = shared.hold_at.load(Ordering::SeqCst).saturating_sub(passed);
            buf.len().min(left.max(1) as usize)
        } else {
            buf.len()
        };
        let n = match from.read(&mut buf[..room]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if gated {
            shared.passed.fetch_add(n as u64, Ordering::SeqCst);
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn is_held(shared: &Shared) -> bool {
    !shared.released.load(Ordering::SeqCst)
        && shared.passed.load(Ordering::SeqCst) >= shared.hold_at.load(Ordering::SeqCst)
}
