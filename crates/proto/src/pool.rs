//! Buffers lent to connections while bytes are in flight, and taken back when a connection goes
//! idle, so that an idle keep-alive connection holds no buffer at all (nginx frees an idle
//! connection's buffers the same way). One pool per thread: the thread that serves a
//! connection is a worker, so this is a per-worker pool, with no lock. A buffer taken on one
//! thread and given back on another (a task that migrated) simply changes pools.

use std::cell::RefCell;
use std::collections::VecDeque;

use crate::conn::Slot;
use crate::head::HeaderPos;

/// A buffer grown past this is freed, not kept: one huge body must not pin its memory.
const KEEP_AT_MOST_BYTES: usize = 64 * 1024;
/// Buffers of each kind a thread keeps for reuse; more than that are freed.
const KEEP_AT_MOST: usize = 1024;

/// A new input buffer's size; it grows for big heads and bodies.
pub(crate) const INPUT_SIZE: usize = 4096;

#[derive(Default)]
struct Pool {
    /// Input bytes, with the header positions of the heads parsed from them.
    inputs: Vec<(Vec<u8>, Vec<HeaderPos>)>,
    outputs: Vec<Vec<u8>>,
    queues: Vec<VecDeque<Slot>>,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

// Each function below reaches the pool itself and is never inlined: a stackful coroutine can
// move to another thread between two calls, and a caller that had the thread-local's address
// in hand (after inlining, the compiler may keep it across a call) would then use the old
// thread's pool while a coroutine there uses it too.

/// An input buffer of at least [`INPUT_SIZE`] bytes (zeroed once, when first made; its old
/// contents are never read before they are overwritten), and room for header positions.
#[inline(never)]
pub(crate) fn take_input() -> (Vec<u8>, Vec<HeaderPos>) {
    POOL.with(|p| p.borrow_mut().inputs.pop())
        .unwrap_or_else(|| (vec![0; INPUT_SIZE], Vec::new()))
}

#[inline(never)]
pub(crate) fn give_input(buf: Vec<u8>, mut positions: Vec<HeaderPos>) {
    if buf.len() <= KEEP_AT_MOST_BYTES {
        positions.clear();
        POOL.with(|p| keep(&mut p.borrow_mut().inputs, (buf, positions)));
    }
}

/// An empty output buffer, with whatever capacity it had.
#[inline(never)]
pub(crate) fn take_output() -> Vec<u8> {
    POOL.with(|p| p.borrow_mut().outputs.pop())
        .unwrap_or_default()
}

#[inline(never)]
pub(crate) fn give_output(mut buf: Vec<u8>) {
    buf.clear();
    if buf.capacity() > 0 && buf.capacity() <= KEEP_AT_MOST_BYTES {
        POOL.with(|p| keep(&mut p.borrow_mut().outputs, buf));
    }
}

/// An empty reply queue, with the capacity an earlier connection left it.
#[inline(never)]
pub(crate) fn take_queue() -> VecDeque<Slot> {
    POOL.with(|p| p.borrow_mut().queues.pop())
        .unwrap_or_else(|| VecDeque::with_capacity(4))
}

#[inline(never)]
pub(crate) fn give_queue(queue: VecDeque<Slot>) {
    debug_assert!(queue.is_empty());
    if queue.capacity() > 0 && queue.capacity() <= 64 {
        POOL.with(|p| keep(&mut p.borrow_mut().queues, queue));
    }
}

fn keep<T>(kept: &mut Vec<T>, item: T) {
    if kept.len() < KEEP_AT_MOST {
        // A thread that serves one connection at a time (thread-per-connection, a blocking
        // worker) keeps one of each: room for one, not the four a first push makes.
        if kept.capacity() == 0 {
            kept.reserve_exact(1);
        }
        kept.push(item);
    }
}
