//! The listening socket, set up the same way for every pattern.

use std::io;
use std::net::TcpListener;

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
