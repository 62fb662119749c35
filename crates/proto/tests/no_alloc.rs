//! The `GET /` hot path allocates nothing per request once a connection is warm: a counting
//! global allocator watches the loop a server runs for every read.
//!
//! Only allocations made on a thread inside [`counted`] are counted, and each thread keeps its
//! own count, so the test harness and tests running in parallel cannot disturb a measurement.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Instant;

use std::sync::Arc;

use proto::{CommonHeaders, Config, Conn, Response, http_date};

struct Counting;

thread_local! {
    /// Whether this thread's allocations count, and how many it made while they did.
    /// Const-initialised, so touching them never allocates.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    if COUNTING.with(Cell::get) {
        ALLOCS.with(|n| n.set(n.get() + 1));
    }
}

/// Runs `f` and returns its result with the number of allocations it made on this thread.
fn counted<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = ALLOCS.with(Cell::get);
    COUNTING.with(|c| c.set(true));
    let result = f();
    COUNTING.with(|c| c.set(false));
    (result, ALLOCS.with(Cell::get) - before)
}

// SAFETY: every call is forwarded unchanged to `System`; the counter has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
const CURL_GET: &[u8] =
    b"GET / HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
const HELLO: &str = "Hello, World!";
const ITERATIONS: usize = 10_000;
const WARMUP: usize = 8;
const PIPELINE: usize = 16;

/// How the bytes get in: read into the connection's buffer (the event loops), or read into the
/// driver's own and copied in (the blocking driver, between requests).
#[derive(Clone, Copy)]
enum Fill {
    ReadBuf,
    Copied,
}

/// One read's worth of work: copy `input` in, answer every request, take the output.
/// Returns (requests answered, bytes written) so that the loop cannot be optimised away.
fn serve(conn: &mut Conn, common: &CommonHeaders, input: &[u8], fill: Fill) -> (usize, usize) {
    let now = Instant::now();
    match fill {
        Fill::ReadBuf => {
            conn.read_buf()[..input.len()].copy_from_slice(input);
            conn.filled(input.len(), now);
        }
        Fill::Copied => {
            assert!(!conn.holds_input());
            conn.fill_from(input, now);
        }
    }
    let mut answered = 0;
    while let Some(req) = conn.next_request() {
        let id = req.id;
        conn.respond(id, Response::text(200, HELLO));
        answered += 1;
    }
    let n = conn.output(common, now).len();
    conn.written(n, now);
    // What a driver does before it waits for the next read: the buffers go back to the pool.
    conn.release_buffers();
    (answered, n)
}

/// Runs `ITERATIONS` reads of `input` after a warm-up, and returns the allocations counted in
/// the measured loop.
fn measure(input: &[u8], per_read: usize, fill: Fill) -> u64 {
    let common = CommonHeaders {
        server: "bench",
        date: http_date(1_700_000_000),
    };
    let mut conn = Conn::new(Arc::new(Config::default()), Instant::now());
    for _ in 0..WARMUP {
        let (answered, n) = serve(&mut conn, &common, input, fill);
        assert_eq!(answered, per_read);
        assert!(n > 0);
    }
    let (total, allocations) = counted(|| {
        let mut total = 0;
        for _ in 0..ITERATIONS {
            let (answered, n) = serve(&mut conn, &common, input, fill);
            total += answered;
            std::hint::black_box(n);
        }
        total
    });
    assert_eq!(total, ITERATIONS * per_read);
    assert!(!conn.is_finished() && conn.wants_read());
    allocations
}

#[test]
fn get_hello_allocates_nothing_per_request() {
    for fill in [Fill::ReadBuf, Fill::Copied] {
        let single = measure(GET, 1, fill);
        let pipelined = measure(&GET.repeat(PIPELINE), PIPELINE, fill);
        let curl = measure(CURL_GET, 1, fill);
        assert_eq!(
            (single, pipelined, curl),
            (0, 0, 0),
            "allocations in {ITERATIONS} reads: (one GET per read, {PIPELINE} pipelined per \
             read, one GET with curl's headers per read)"
        );
    }
}

/// The counter itself works: a deliberate allocation is seen.
#[test]
fn counter_sees_allocations() {
    let (v, n) = counted(|| std::hint::black_box(vec![1u8; 64]));
    assert_eq!(n, 1);
    let (_, n) = counted(|| std::hint::black_box(Response::owned(200, "text/plain", v)));
    assert_eq!(n, 0, "moving a Vec in is not an allocation");
}
