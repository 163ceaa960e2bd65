//! A fault-injecting TCP proxy for the integration tests: it sits between a
//! ferry client and a ferry server on 127.0.0.1, forwards bytes both ways
//! exactly, and at chosen positions cuts every connection, stalls them, or
//! flips a byte.
//!
//! Positions count the bytes of one direction summed over every connection
//! the proxy ever forwarded, in the order the proxy read them, so a fault can
//! land in the third connection of a retried transfer. A fault at `at`
//! fires when the byte at position `at` (0-based) reaches the proxy; a read
//! buffer that straddles it is split there.
//!
//! Threads and `std::net` only. Every read and write times out after a tick
//! and every wait has a deadline, so the threads notice the stop flag and a
//! dropped proxy never hangs the suite.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::util::poll_until;

const BUF_SIZE: usize = 64 * 1024;
/// How long a read or write blocks before the thread looks at the flags again.
const TICK: Duration = Duration::from_millis(50);
const ACCEPT_POLL: Duration = Duration::from_millis(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a Cut or Stall waits for bytes before its position, taken by
/// other connections, to be written out.
const IN_FLIGHT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a read waits for a Cut or Stall in progress before going on.
const FENCE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cut connection keeps reading and dropping what its peers
/// send, so that closing it does not reset bytes they have yet to read.
const CUT_LINGER: Duration = Duration::from_secs(1);
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ClientToServer => 0,
            Direction::ServerToClient => 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Forward exactly up to the position, then close every live connection,
    /// both sides. New connections are forwarded normally afterwards.
    ///
    /// Each peer reads exactly what was forwarded, then end-of-file (a FIN
    /// behind the bytes). Whatever the peers send afterwards is read and
    /// dropped for up to `CUT_LINGER` (or until they close), then the
    /// sockets close and further sends draw a reset. Not a reset straight
    /// away: a reset makes the peer throw away bytes it has not read yet,
    /// so the cut would land at a random position short of `at`.
    Cut,
    /// Forward up to the position, then stop forwarding anything on every
    /// connection live at that moment, both directions, and keep them open
    /// until the proxy is dropped. New connections are forwarded normally.
    ///
    /// Stalled connections are not read either, so the senders' buffers
    /// fill and their writes block, as over a dead link.
    Stall,
    /// XOR the byte at the position with this mask (non-zero) and forward it.
    Flip(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub at: u64,
    pub action: FaultAction,
}

impl Fault {
    pub fn cut(at: u64) -> Fault {
        Fault {
            at,
            action: FaultAction::Cut,
        }
    }

    pub fn stall(at: u64) -> Fault {
        Fault {
            at,
            action: FaultAction::Stall,
        }
    }

    pub fn flip(at: u64, mask: u8) -> Fault {
        Fault {
            at,
            action: FaultAction::Flip(mask),
        }
    }
}

/// The proxy; dropping it stops accepting, closes every connection and
/// joins its threads (each within a bound).
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards each connection to `target`,
    /// applying `faults` (sorted by `at`, each fired once) to the bytes
    /// flowing in `direction`.
    pub fn start(target: SocketAddr, direction: Direction, faults: Vec<Fault>) -> FaultProxy {
        Self::start_with(target, direction, faults, None)
    }

    /// Like [`start`](Self::start), and each connection forwards at most
    /// `rate` bytes per second in `direction`: a slow link. It reads no
    /// faster than it forwards, so the sender's socket fills and its writes
    /// wait, as over the link.
    pub fn throttled(target: SocketAddr, direction: Direction, rate: u64) -> FaultProxy {
        Self::start_with(target, direction, Vec::new(), Some(rate))
    }

    fn start_with(
        target: SocketAddr,
        direction: Direction,
        faults: Vec<Fault>,
        rate: Option<u64>,
    ) -> FaultProxy {
        assert!(
            faults.windows(2).all(|w| w[0].at <= w[1].at),
            "faults must be sorted by position: {faults:?}"
        );
        assert!(
            faults.iter().all(|f| f.action != FaultAction::Flip(0)),
            "a Flip mask must be non-zero: {faults:?}"
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy to 127.0.0.1:0");
        let addr = listener.local_addr().expect("the proxy's address");
        // Non-blocking, so the acceptor can notice the stop flag.
        listener
            .set_nonblocking(true)
            .expect("make the proxy listener non-blocking");
        let shared = Arc::new(Shared {
            target,
            direction,
            rate,
            stop: AtomicBool::new(false),
            forwarded: [AtomicU64::new(0), AtomicU64::new(0)],
            connections: AtomicU64::new(0),
            state: Mutex::new(State {
                pending: faults.into(),
                fired: 0,
                position: 0,
                in_flight: 0,
                fence: false,
                live: Vec::new(),
            }),
            pumps: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("proxy-accept".into())
                .spawn(move || shared.accept_loop(&listener))
                .expect("spawn the proxy's acceptor")
        };
        FaultProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `--host` and `--port` for a client to go through the proxy.
    pub fn client_args(&self) -> Vec<String> {
        let addr = self.addr();
        let (host, port) = (addr.ip().to_string(), addr.port().to_string());
        vec!["--host".into(), host, "--port".into(), port]
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes written on so far in each direction, summed over connections:
    /// (client to server, server to client).
    pub fn forwarded(&self) -> (u64, u64) {
        let [up, down] = &self.shared.forwarded;
        (up.load(Ordering::SeqCst), down.load(Ordering::SeqCst))
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Faults that have taken effect (a Flip when its byte is claimed, a Cut
    /// or Stall once the connections are closed or stalled).
    pub fn faults_fired(&self) -> usize {
        self.shared.state().fired
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // The acceptor first, so no pump is spawned after the list is taken.
        let acceptor: Vec<_> = self.acceptor.take().into_iter().collect();
        let mut clean = join_within(acceptor);
        for conn in std::mem::take(&mut self.shared.state().live) {
            conn.close();
        }
        let pumps =
            std::mem::take(&mut *self.shared.pumps.lock().unwrap_or_else(|e| e.into_inner()));
        clean &= join_within(pumps);
        if !clean && !thread::panicking() {
            panic!("a proxy thread panicked or did not stop within {JOIN_TIMEOUT:?}");
        }
    }
}

/// Joins the threads that finish within `JOIN_TIMEOUT` and leaves the rest
/// detached; true if all finished without panicking.
fn join_within(handles: Vec<JoinHandle<()>>) -> bool {
    let finished = poll_until(JOIN_TIMEOUT, || {
        handles.iter().all(|h| h.is_finished()).then_some(())
    })
    .is_some();
    let mut clean = finished;
    for handle in handles {
        if handle.is_finished() {
            clean &= handle.join().is_ok();
        }
    }
    clean
}

struct Shared {
    target: SocketAddr,
    /// The direction whose bytes the faults are placed in.
    direction: Direction,
    /// Bytes per second each connection forwards in `direction`, if limited.
    rate: Option<u64>,
    stop: AtomicBool,
    /// Indexed by `Direction::index`.
    forwarded: [AtomicU64; 2],
    connections: AtomicU64,
    state: Mutex<State>,
    pumps: Mutex<Vec<JoinHandle<()>>>,
}

struct State {
    /// Faults not yet fired, by position.
    pending: VecDeque<Fault>,
    fired: usize,
    /// Bytes of the faulted direction read and given a position so far.
    position: u64,
    /// Of those, bytes still being written on.
    in_flight: u64,
    /// A Cut or Stall is firing: no byte may be given a position past it.
    fence: bool,
    /// Connections not yet finished in both directions.
    live: Vec<Arc<Conn>>,
}

impl State {
    /// Gives `data` the next positions and applies the faults that fall in
    /// it: flips in place; at a Cut or Stall, shortens the claim to end just
    /// before it and raises the fence. Returns how many bytes to forward and
    /// the Cut or Stall to fire after writing them.
    fn claim(&mut self, data: &mut [u8]) -> (usize, Option<Halt>) {
        let start = self.position;
        let mut len = data.len();
        let mut halt = None;
        while let Some(&fault) = self.pending.front() {
            let i = fault.at.saturating_sub(start);
            if i >= len as u64 {
                break;
            }
            let i = i as usize;
            self.pending.pop_front();
            match fault.action {
                FaultAction::Flip(mask) => {
                    data[i] ^= mask;
                    self.fired += 1;
                }
                FaultAction::Cut | FaultAction::Stall => {
                    len = i;
                    self.fence = true;
                    halt = Some(if fault.action == FaultAction::Cut {
                        Halt::Cut
                    } else {
                        Halt::Stall
                    });
                    break;
                }
            }
        }
        self.position += len as u64;
        self.in_flight += len as u64;
        (len, halt)
    }
}

#[derive(Clone, Copy, Debug)]
enum Halt {
    Cut,
    Stall,
}

/// One proxied connection: the accepted client socket and the one opened
/// to the target.
struct Conn {
    id: u64,
    client: TcpStream,
    server: TcpStream,
    cut: AtomicBool,
    stalled: AtomicBool,
    pumps_done: AtomicUsize,
}

impl Conn {
    /// Ends both sides after the bytes already written; see `FaultAction::Cut`.
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Write);
        let _ = self.server.shutdown(Shutdown::Write);
    }

    /// Ends both sides now, for an error or the proxy's drop.
    fn close(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }

    fn halted(&self) -> bool {
        self.cut.load(Ordering::SeqCst) || self.stalled.load(Ordering::SeqCst)
    }

    /// (from, to) for bytes flowing in `dir`.
    fn ends(&self, dir: Direction) -> (&TcpStream, &TcpStream) {
        match dir {
            Direction::ClientToServer => (&self.client, &self.server),
            Direction::ServerToClient => (&self.server, &self.client),
        }
    }
}

fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking pump must not take Drop down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn accept_loop(self: &Arc<Self>, listener: &TcpListener) {
        while !self.stopping() {
            match listener.accept() {
                Ok((client, _)) => self.open(client),
                // WouldBlock, or a transient error such as EMFILE: try again.
                Err(_) => thread::sleep(ACCEPT_POLL),
            }
        }
    }

    fn open(self: &Arc<Self>, client: TcpStream) {
        let id = self.connections.fetch_add(1, Ordering::SeqCst);
        // On failure the client is dropped and sees its connection close.
        let Ok(server) = TcpStream::connect_timeout(&self.target, CONNECT_TIMEOUT) else {
            return;
        };
        for stream in [&client, &server] {
            let configured = stream
                .set_nonblocking(false)
                .and_then(|()| stream.set_nodelay(true))
                .and_then(|()| stream.set_read_timeout(Some(TICK)))
                .and_then(|()| stream.set_write_timeout(Some(TICK)));
            if configured.is_err() {
                return;
            }
        }
        let conn = Arc::new(Conn {
            id,
            client,
            server,
            cut: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            pumps_done: AtomicUsize::new(0),
        });
        self.state().live.push(Arc::clone(&conn));
        let mut pumps = self.pumps.lock().unwrap_or_else(|e| e.into_inner());
        pumps.retain(|h| !h.is_finished());
        for (dir, name) in [
            (Direction::ClientToServer, "up"),
            (Direction::ServerToClient, "down"),
        ] {
            let shared = Arc::clone(self);
            let pumped = Arc::clone(&conn);
            let spawned = thread::Builder::new()
                .name(format!("proxy-{id}-{name}"))
                .spawn(move || shared.pump(&pumped, dir));
            match spawned {
                Ok(handle) => pumps.push(handle),
                Err(_) => {
                    conn.close();
                    self.pump_done(&conn);
                }
            }
        }
    }

    /// Forwards `dir` of one connection until end-of-file, an error, a Cut,
    /// or the stop flag; while stalled, holds the connection without
    /// reading.
    fn pump(&self, conn: &Conn, dir: Direction) {
        let (mut from, to) = conn.ends(dir);
        let mut buf = vec![0u8; BUF_SIZE];
        while !self.stopping() {
            if conn.cut.load(Ordering::SeqCst) {
                self.drain(from, &mut buf);
                break;
            }
            if conn.stalled.load(Ordering::SeqCst) {
                thread::sleep(TICK);
                continue;
            }
            let n = match from.read(&mut buf) {
                Ok(0) => {
                    let _ = to.shutdown(Shutdown::Write);
                    break;
                }
                Ok(n) => n,
                Err(e) if is_retry(&e) => continue,
                Err(_) => {
                    conn.close();
                    break;
                }
            };
            // None: the connection was cut or stalled meanwhile; the bytes
            // read are dropped, as a dead link would.
            let Some((len, halt)) = self.claim(conn, dir, &mut buf[..n]) else {
                continue;
            };
            let written = self.write(conn, dir, to, &buf[..len]);
            if dir == self.direction {
                self.state().in_flight -= len as u64;
                if let Some(rate) = self.rate {
                    thread::sleep(Duration::from_secs_f64(len as f64 / rate as f64));
                }
            }
            if let Some(halt) = halt {
                self.fire(halt);
            }
            if written.is_err() {
                conn.close();
                break;
            }
        }
        self.pump_done(conn);
    }

    /// Reads and drops what `from` sends until it closes, `CUT_LINGER`
    /// passes, or the proxy stops.
    fn drain(&self, mut from: &TcpStream, buf: &mut [u8]) {
        let deadline = Instant::now() + CUT_LINGER;
        while !self.stopping() && Instant::now() < deadline {
            match from.read(buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if is_retry(&e) => {}
                Err(_) => break,
            }
        }
    }

    /// Gives the bytes just read their positions; see `State::claim`.
    /// Waits while another connection fires a Cut or Stall, so nothing
    /// passes its position first.
    fn claim(&self, conn: &Conn, dir: Direction, data: &mut [u8]) -> Option<(usize, Option<Halt>)> {
        if dir != self.direction {
            return (!conn.halted()).then_some((data.len(), None));
        }
        let claimed = poll_until(FENCE_TIMEOUT, || {
            let mut state = self.state();
            if self.stopping() || conn.halted() {
                Some(None)
            } else if state.fence {
                None
            } else {
                Some(Some(state.claim(data)))
            }
        });
        // A fence that outlived its own deadlines: go on rather than wedge.
        claimed.unwrap_or_else(|| Some(self.state().claim(data)))
    }

    /// Writes `data` to `to`, counting each part as it goes; stops early
    /// (Ok) if the connection is cut or stalled or the proxy stops.
    fn write(
        &self,
        conn: &Conn,
        dir: Direction,
        mut to: &TcpStream,
        mut data: &[u8],
    ) -> io::Result<()> {
        while !data.is_empty() {
            if self.stopping() || conn.halted() {
                return Ok(());
            }
            match to.write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.forwarded[dir.index()].fetch_add(n as u64, Ordering::SeqCst);
                    data = &data[n..];
                }
                Err(e) if is_retry(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Cuts or stalls every live connection, once the bytes before the
    /// position that other connections hold have been written, then lowers
    /// the fence.
    fn fire(&self, halt: Halt) {
        let _ = poll_until(IN_FLIGHT_TIMEOUT, || {
            (self.stopping() || self.state().in_flight == 0).then_some(())
        });
        let mut state = self.state();
        for conn in &state.live {
            match halt {
                Halt::Cut => conn.cut(),
                Halt::Stall => conn.stalled.store(true, Ordering::SeqCst),
            }
        }
        state.fired += 1;
        state.fence = false;
    }

    fn pump_done(&self, conn: &Conn) {
        if conn.pumps_done.fetch_add(1, Ordering::SeqCst) == 1 {
            self.state().live.retain(|c| c.id != conn.id);
        }
    }
}

/// The proxy is what the fault tests rest on: prove it forwards exactly and
/// that each fault does what it says, at the byte it says.
mod self_test {
    use super::*;
    use crate::util::{MIB, random_bytes};
    use std::sync::mpsc;

    /// How long any expected byte or end-of-file may take to arrive.
    const WAIT: Duration = Duration::from_secs(10);
    /// How long silence must last to count as a stall.
    const QUIET: Duration = Duration::from_millis(300);

    /// What one end of a connection has read, and whether it has ended.
    #[derive(Default)]
    struct Record {
        received: Vec<u8>,
        ended: bool,
    }

    type Shared<T> = Arc<Mutex<T>>;

    /// Reads `stream` into `record` until end-of-file, an error or `stop`,
    /// passing each chunk to `echo` if given.
    fn record_reads(
        mut stream: TcpStream,
        record: Shared<Record>,
        stop: Arc<AtomicBool>,
        echo: Option<mpsc::Sender<Vec<u8>>>,
    ) {
        stream.set_read_timeout(Some(TICK)).unwrap();
        let mut buf = vec![0u8; BUF_SIZE];
        while !stop.load(Ordering::SeqCst) {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    record.lock().unwrap().received.extend_from_slice(&buf[..n]);
                    if let Some(echo) = &echo {
                        let _ = echo.send(buf[..n].to_vec());
                    }
                }
                Err(e) if is_retry(&e) => {}
                Err(_) => break,
            }
        }
        record.lock().unwrap().ended = true;
    }

    /// Writes as much of `data` as `stream` takes within `WAIT` (or until
    /// `stop`, or an error); returns how much that was.
    fn write_bounded(mut stream: &TcpStream, data: &[u8], stop: &AtomicBool) -> usize {
        stream.set_write_timeout(Some(TICK)).unwrap();
        let deadline = Instant::now() + WAIT;
        let mut sent = 0;
        while sent < data.len() && Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
            match stream.write(&data[sent..]) {
                Ok(0) => break,
                Ok(n) => sent += n,
                Err(e) if is_retry(&e) => {}
                Err(_) => break,
            }
        }
        sent
    }

    fn spawn(threads: &Mutex<Vec<JoinHandle<()>>>, f: impl FnOnce() + Send + 'static) {
        threads.lock().unwrap().push(thread::spawn(f));
    }

    /// An echo server that records what each connection brought, in
    /// accept order. Reading never waits on echoing (a channel sits
    /// between), so the record shows all that arrived even when the echo
    /// is stalled.
    struct Peer {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        records: Shared<Vec<Shared<Record>>>,
        threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    }

    impl Peer {
        fn start() -> Peer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let peer = Peer {
                addr: listener.local_addr().unwrap(),
                stop: Arc::default(),
                records: Arc::default(),
                threads: Arc::default(),
            };
            let (stop, records, threads) = (
                Arc::clone(&peer.stop),
                Arc::clone(&peer.records),
                Arc::clone(&peer.threads),
            );
            spawn(&peer.threads, move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((stream, _)) = listener.accept() else {
                        thread::sleep(ACCEPT_POLL);
                        continue;
                    };
                    stream.set_nonblocking(false).unwrap();
                    let record = Shared::<Record>::default();
                    records.lock().unwrap().push(Arc::clone(&record));
                    let (tx, rx) = mpsc::channel::<Vec<u8>>();
                    let reader = stream.try_clone().unwrap();
                    let reader_stop = Arc::clone(&stop);
                    spawn(&threads, move || {
                        record_reads(reader, record, reader_stop, Some(tx))
                    });
                    let writer_stop = Arc::clone(&stop);
                    spawn(&threads, move || {
                        while !writer_stop.load(Ordering::SeqCst) {
                            match rx.recv_timeout(TICK) {
                                Ok(chunk) => {
                                    write_bounded(&stream, &chunk, &writer_stop);
                                }
                                Err(mpsc::RecvTimeoutError::Timeout) => {}
                                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                            }
                        }
                        // The client half-closed: so does the echo.
                        let _ = stream.shutdown(Shutdown::Write);
                    });
                }
            });
            peer
        }

        /// The record of the `index`th connection accepted, once it exists.
        fn record(&self, index: usize) -> Shared<Record> {
            poll_until(WAIT, || self.records.lock().unwrap().get(index).cloned())
                .unwrap_or_else(|| panic!("the peer never accepted connection {index}"))
        }
    }

    impl Drop for Peer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let handles = std::mem::take(&mut *self.threads.lock().unwrap());
            let stopped = join_within(handles);
            if !thread::panicking() {
                assert!(stopped, "the test peer's threads did not stop");
            }
        }
    }

    /// A client connection whose reads are recorded on a thread.
    struct Client {
        stream: TcpStream,
        record: Shared<Record>,
        stop: Arc<AtomicBool>,
        reader: Option<JoinHandle<()>>,
    }

    impl Client {
        fn connect(addr: SocketAddr) -> Client {
            let stream = TcpStream::connect_timeout(&addr, WAIT).unwrap();
            let record = Shared::<Record>::default();
            let stop = Arc::<AtomicBool>::default();
            let reader = {
                let (stream, record, stop) = (
                    stream.try_clone().unwrap(),
                    Arc::clone(&record),
                    Arc::clone(&stop),
                );
                thread::spawn(move || record_reads(stream, record, stop, None))
            };
            Client {
                stream,
                record,
                stop,
                reader: Some(reader),
            }
        }

        fn send(&self, data: &[u8]) -> usize {
            write_bounded(&self.stream, data, &self.stop)
        }

        /// Sends `data` and waits for all of its echo.
        #[track_caller]
        fn round_trip(&self, data: &[u8]) {
            let already = self.received().len();
            assert_eq!(self.send(data), data.len(), "could not send everything");
            let echo = self.wait_received(already + data.len());
            assert!(
                echo[already..] == *data,
                "the echo differs from what was sent"
            );
        }

        fn received(&self) -> Vec<u8> {
            self.record.lock().unwrap().received.clone()
        }

        fn ended(&self) -> bool {
            self.record.lock().unwrap().ended
        }

        /// Waits until at least `len` bytes have arrived; returns them all.
        #[track_caller]
        fn wait_received(&self, len: usize) -> Vec<u8> {
            poll_until(WAIT, || {
                let received = self.received();
                (received.len() >= len).then_some(received)
            })
            .unwrap_or_else(|| {
                panic!(
                    "expected {len} bytes, got {} within {WAIT:?}",
                    self.received().len()
                )
            })
        }

        #[track_caller]
        fn wait_ended(&self) {
            poll_until(WAIT, || self.ended().then_some(()))
                .expect("the client's connection should have ended");
        }
    }

    impl Drop for Client {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let reader: Vec<_> = self.reader.take().into_iter().collect();
            let stopped = join_within(reader);
            if !thread::panicking() {
                assert!(stopped, "the test client's reader did not stop");
            }
        }
    }

    #[track_caller]
    fn wait_ended(record: &Shared<Record>) {
        poll_until(WAIT, || record.lock().unwrap().ended.then_some(()))
            .expect("the peer's connection should have ended");
    }

    fn received(record: &Shared<Record>) -> Vec<u8> {
        record.lock().unwrap().received.clone()
    }

    #[track_caller]
    fn wait_forwarded(proxy: &FaultProxy, expected: (u64, u64)) {
        let counted = poll_until(WAIT, || (proxy.forwarded() == expected).then_some(()));
        assert!(
            counted.is_some(),
            "forwarded {:?}, expected {expected:?}",
            proxy.forwarded()
        );
    }

    #[test]
    fn forwards_both_ways_byte_exact_and_counts() {
        let peer = Peer::start();
        let proxy = FaultProxy::start(peer.addr, Direction::ClientToServer, Vec::new());
        let data = random_bytes(4 * MIB as usize + 5, 1);

        let client = Client::connect(proxy.addr());
        client.round_trip(&data);
        assert!(
            received(&peer.record(0)) == data,
            "the peer got other bytes"
        );
        let len = data.len() as u64;
        wait_forwarded(&proxy, (len, len));

        // A half-close passes through both ways.
        client.stream.shutdown(Shutdown::Write).unwrap();
        wait_ended(&peer.record(0));
        client.wait_ended();
        assert_eq!(client.received().len(), data.len());
        assert_eq!(proxy.connections(), 1);
        assert_eq!(proxy.faults_fired(), 0);
    }

    #[test]
    fn cut_forwards_exactly_up_to_the_position() {
        let at = MIB + 3;
        let peer = Peer::start();
        let proxy = FaultProxy::start(peer.addr, Direction::ClientToServer, vec![Fault::cut(at)]);
        let data = random_bytes(3 * MIB as usize, 2);

        let client = Client::connect(proxy.addr());
        // The send may stop short when the connection is cut under it.
        client.send(&data);
        let record = peer.record(0);
        wait_ended(&record);
        let got = received(&record);
        assert_eq!(
            got.len() as u64,
            at,
            "the peer should get exactly the bytes before the cut"
        );
        assert!(
            got == data[..at as usize],
            "the bytes before the cut differ"
        );
        client.wait_ended();
        let echo = client.received();
        assert!(echo.len() as u64 <= at && echo == data[..echo.len()]);
        assert_eq!(proxy.faults_fired(), 1);

        // A new connection afterwards is forwarded normally.
        let again = Client::connect(proxy.addr());
        let more = random_bytes(100_000, 3);
        again.round_trip(&more);
        assert!(received(&peer.record(1)) == more);
        assert_eq!(proxy.connections(), 2);
        assert_eq!(proxy.forwarded().0, at + more.len() as u64);
    }

    #[test]
    fn positions_count_over_all_connections() {
        // Server to client: 1,000 bytes on the first connection, 3,000 on
        // the second (the flip lands on its 11th byte), the cut 500 bytes
        // into the third.
        let peer = Peer::start();
        let faults = vec![Fault::flip(1_010, 0x01), Fault::cut(4_500)];
        let proxy = FaultProxy::start(peer.addr, Direction::ServerToClient, faults);

        let first = Client::connect(proxy.addr());
        first.round_trip(&random_bytes(1_000, 4));
        drop(first);

        let second = Client::connect(proxy.addr());
        let data = random_bytes(3_000, 5);
        assert_eq!(second.send(&data), data.len());
        let echo = second.wait_received(data.len());
        let differ: Vec<usize> = (0..data.len()).filter(|&i| echo[i] != data[i]).collect();
        assert_eq!(differ, [10], "exactly the 11th byte should be flipped");
        assert_eq!(echo[10] ^ data[10], 0x01);
        assert_eq!(proxy.faults_fired(), 1);

        // The second connection stays open, so the cut closes it too.
        let third = Client::connect(proxy.addr());
        let data = random_bytes(2_000, 6);
        third.send(&data);
        third.wait_ended();
        assert!(
            third.received() == data[..500],
            "the third connection should get exactly 500 bytes"
        );
        second.wait_ended();
        assert_eq!(second.received().len(), 3_000);
        assert_eq!(proxy.faults_fired(), 2);

        let fourth = Client::connect(proxy.addr());
        fourth.round_trip(&random_bytes(10_000, 7));
        assert_eq!(proxy.connections(), 4);
        assert_eq!(proxy.forwarded().1, 1_000 + 3_000 + 500 + 10_000);
    }

    #[test]
    fn flip_changes_exactly_the_byte_at_the_position() {
        let peer = Peer::start();
        let faults = vec![Fault::flip(0, 0x80), Fault::flip(2 * MIB + 7, 0x5A)];
        let proxy = FaultProxy::start(peer.addr, Direction::ServerToClient, faults);
        let data = random_bytes(4 * MIB as usize, 8);

        let client = Client::connect(proxy.addr());
        assert_eq!(client.send(&data), data.len());
        let echo = client.wait_received(data.len());
        assert_eq!(echo.len(), data.len());
        let differ: Vec<(usize, u8)> = (0..data.len())
            .filter(|&i| echo[i] != data[i])
            .map(|i| (i, echo[i] ^ data[i]))
            .collect();
        assert_eq!(differ, [(0, 0x80), (2 * MIB as usize + 7, 0x5A)]);
        // The other direction is untouched.
        assert!(received(&peer.record(0)) == data);
        assert_eq!(proxy.faults_fired(), 2);
        let len = data.len() as u64;
        wait_forwarded(&proxy, (len, len));
    }

    #[test]
    fn stall_holds_connections_open_and_silent() {
        let at = 256 * 1024 + 1;
        let peer = Peer::start();
        let proxy = FaultProxy::start(peer.addr, Direction::ClientToServer, vec![Fault::stall(at)]);
        let data = random_bytes(at as usize + 64 * 1024, 9);

        let client = Client::connect(proxy.addr());
        // Loopback buffers take the 64 KiB past the stall.
        assert_eq!(client.send(&data), data.len());
        poll_until(WAIT, || (proxy.faults_fired() == 1).then_some(()))
            .expect("the stall should fire");
        let record = peer.record(0);
        let got = poll_until(WAIT, || {
            let got = received(&record);
            (got.len() as u64 >= at).then_some(got)
        })
        .expect("the bytes before the stall should arrive");
        assert!(
            got == data[..at as usize],
            "the peer should get exactly the bytes before the stall"
        );

        // Let an echo write already under way land, then expect silence.
        thread::sleep(Duration::from_millis(100));
        let echoed = client.received().len();
        thread::sleep(QUIET);
        assert_eq!(received(&record).len() as u64, at, "bytes passed the stall");
        assert_eq!(
            client.received().len(),
            echoed,
            "echo bytes passed the stall"
        );
        assert!(echoed as u64 <= at);
        assert!(
            !client.ended() && !record.lock().unwrap().ended,
            "a stall keeps connections open"
        );

        // A new connection afterwards is forwarded normally.
        let again = Client::connect(proxy.addr());
        let more = random_bytes(100_000, 10);
        again.round_trip(&more);
        assert_eq!(proxy.forwarded().0, at + more.len() as u64);

        // Dropping the proxy ends the stalled connection, promptly.
        let start = Instant::now();
        drop(proxy);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "drop took {:?}",
            start.elapsed()
        );
        client.wait_ended();
        wait_ended(&record);
    }
}
