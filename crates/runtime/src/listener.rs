//! The listening socket, set up the same way for every pattern.

use std::io;
use std::net::TcpListener;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::ServerArgs;

/// Binds `--addr` with `--backlog`, `--rcvbuf`, `--sndbuf` and `--nodelay`, non-blocking.
///
/// Buffer sizes and TCP_NODELAY are set here, not per connection: Linux copies them from the
/// listener to every socket it accepts, and a buffer size must be set before the handshake for
/// the window scale to match it.
pub fn bind(args: &ServerArgs, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(args.addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    // Restarting must not wait out TIME_WAIT on the old server's connections.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if let Some(n) = args.rcvbuf {
        socket.set_recv_buffer_size(n)?;
    }
    if let Some(n) = args.sndbuf {
        socket.set_send_buffer_size(n)?;
    }
    socket.set_tcp_nodelay(args.nodelay())?;
    socket.bind(&args.addr.into())?;
    socket.listen(args.backlog as i32)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// `n` listening sockets on one port, each with SO_REUSEPORT (reuseport's and uring's loops
/// each own one). With `--addr` port 0 the first gets a free port from the kernel, and the
/// others join it there.
pub fn bind_reuseport(args: &ServerArgs, n: usize) -> io::Result<Vec<TcpListener>> {
    let first = bind(args, true)?;
    let same_port = ServerArgs {
        addr: first.local_addr()?,
        ..args.clone()
    };
    let mut listeners = vec![first];
    for _ in 1..n {
        listeners.push(bind(&same_port, true)?);
    }
    Ok(listeners)
}

/// accept(2) failed for want of descriptors or memory. The connection stays queued, so retrying
/// at once would spin: pause accepting for a while instead (nginx disables accept for 500 ms).
pub fn is_out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// How long to pause accepting after running out of resources: 10 ms, doubling to 1 s, back to
/// 10 ms after an accept succeeds.
#[derive(Debug)]
pub struct AcceptBackoff {
    next: Duration,
}

impl AcceptBackoff {
    const MIN: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    /// An accept failed with [`is_out_of_resources`]: the pause to take now.
    pub fn failed(&mut self) -> Duration {
        let pause = self.next;
        self.next = (pause * 2).min(Self::MAX);
        pause
    }

    pub fn succeeded(&mut self) {
        self.next = Self::MIN;
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff { next: Self::MIN }
    }
}
