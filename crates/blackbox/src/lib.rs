//! The one black-box test suite that every server in this workspace must pass.
//!
//! Each pattern crate (single-thread, dispatcher, prefork, ...) builds a server binary that
//! speaks the same HTTP/1.1 and runs the same application. This crate starts such a binary as a
//! child process and talks to it only through its socket, its stderr and signals, so the same
//! checks hold every pattern to the same contract: responses, keep-alive, pipelining, request
//! bodies, rejections of bad input, timeouts, `/stats` counts, running out of file descriptors,
//! and graceful shutdown.
//!
//! A server crate uses it from one test file:
//!
//! ```no_run
//! // crates/<pattern>/tests/blackbox.rs
//! blackbox::suite!(env!("CARGO_BIN_EXE_single-thread"));
//! // or, with extra server flags:
//! // blackbox::suite!(env!("CARGO_BIN_EXE_dispatcher"), ["--workers", "4"]);
//! ```
//!
//! with `blackbox = { workspace = true }` under `[dev-dependencies]`. That expands to one
//! `#[test]` per check in [`checks`], so cargo test and nextest run and report each separately;
//! each test starts its own server on `127.0.0.1:0` and kills it when done.
//!
//! The pieces are public for a pattern's own tests as well:
//! - [`Server`]: start a binary, find its address, signal it, wait for its exit, read its CPU
//!   time and stderr (printed automatically when a test fails);
//! - [`Client`]: a blocking HTTP/1.1 client where every read has a timeout and every failure
//!   shows the bytes received;
//! - [`checks`]: the checks, plus measurements that are not in the suite, such as
//!   [`checks::heavy_delays_hello`].

pub mod checks;
pub mod client;
pub mod json;
pub mod proxy;
pub mod server;
pub mod sse;

pub use client::{Client, Expect, ReadError, Response};
pub use server::Server;

/// Expands to one `#[test]` per check in [`checks`] against the server binary `$bin`, started
/// with the extra flags `$args` (a bracketed list of `&str`, optional).
///
/// ```no_run
/// blackbox::suite!(env!("CARGO_BIN_EXE_single-thread"));
/// ```
///
/// ```no_run
/// blackbox::suite!(env!("CARGO_BIN_EXE_single-thread"), ["--workers", "4"]);
/// ```
/// The journal's crash checks, one `#[test]` each: acknowledged writes survive kill -9 of the
/// server's whole process group under load, with `--commit sync` and `--commit async`, and
/// damaged logs are recovered or refused as the journal specifies.
#[macro_export]
macro_rules! crash_suite {
    ($bin:expr, $args:tt $(,)?) => {
        #[test]
        fn acked_writes_survive_kill_9_with_sync_commit() {
            let args: &[&str] = &$args;
            let (recovery, acked) = $crate::checks::acked_writes_survive_kill_9($bin, args, "sync");
            eprintln!("{acked} acknowledged before the kill; after it: {recovery}");
        }

        #[test]
        fn acked_writes_survive_kill_9_with_async_commit() {
            let args: &[&str] = &$args;
            let (recovery, acked) =
                $crate::checks::acked_writes_survive_kill_9($bin, args, "async");
            eprintln!("{acked} acknowledged before the kill; after it: {recovery}");
        }

        #[test]
        fn damaged_logs_are_recovered_or_refused() {
            let args: &[&str] = &$args;
            $crate::checks::recovery_of_damaged_logs($bin, args);
        }
    };
}

#[macro_export]
macro_rules! suite {
    (@tests ($bin:expr, $args:tt) $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                let args: &[&str] = &$args;
                $crate::checks::$check($bin, args);
            }
        )*
    };
    ($bin:expr, $args:tt $(,)?) => {
        $crate::suite!(@tests ($bin, $args)
            hello,
            keep_alive_1000_requests,
            pipelined_50_in_order,
            request_one_byte_at_a_time,
            chunked_request_body,
            echo_1mib,
            http10_closes_after_reply,
            http10_keep_alive,
            http11_connection_close,
            head_request,
            expect_100_continue,
            not_found_404,
            wrong_method_405,
            unknown_method_501,
            reject_extra_token_in_request_line,
            reject_request_line_without_target,
            reject_space_before_header_colon,
            reject_header_without_colon,
            reject_http11_without_host,
            reject_transfer_encoding_with_content_length,
            reject_conflicting_content_lengths,
            reject_bad_chunk_size,
            reject_chunk_extension_without_name,
            reject_unterminated_chunk_extension,
            reject_bare_cr_in_header,
            reject_header_section_too_large_431,
            reject_target_too_long_414,
            reject_content_length_over_limit_413,
            reject_chunked_body_over_limit_413,
            reject_transfer_encoding_gzip_501,
            reject_http20_505,
            reject_http12_505,
            no_reply_after_rejected_request,
            concurrent_clients_counted_in_stats,
            header_timeout,
            idle_timeout,
            emfile_no_spin,
            sigterm_during_load,
            sigint_during_load,
            sigterm_grace_for_a_fresh_connection,
            messages_short_poll,
            messages_long_poll,
            messages_long_poll_times_out,
            messages_reject_bad_input,
            job_runs_and_is_polled,
            job_prefer_wait_and_cancel,
            job_rejects_bad_input,
            one_post_answers_many_long_polls,
            held_requests_answered_at_sigterm,
            journal_survives_a_restart,
            data_dir_in_use_is_refused,
            sse_streams_new_messages,
            sse_resumes_after_last_event_id,
            sse_filters_by_type,
            sse_gone_after_retention,
            sse_slow_subscriber_is_cut_off_and_resumes,
            sse_long_replay_is_paced_not_cut_off,
            sse_keep_alive_comment,
            sse_ends_cleanly_at_sigterm,
            stats_stream_every_interval,
            idempotency_replays_the_first_reply,
            idempotency_different_request_is_422,
            idempotency_in_flight_is_409,
            idempotency_bad_or_missing_key_is_400,
            idempotency_survives_a_restart,
            tus_options_and_version,
            tus_upload_in_pieces_and_download,
            tus_rejects_bad_requests,
            tus_cut_connection_keeps_what_arrived,
            tus_one_patch_at_a_time,
            tus_defer_length_and_creation_with_upload,
            tus_concatenation_out_of_order,
            tus_termination_and_expiry,
            plain_upload_streams_past_max_body,
            tus_js_chunked_upload,
            tus_js_parallel_uploads,
            tus_js_method_override,
            tus_js_resumes_after_cut,
            tuspy_chunked_upload,
            tuspy_resumes_after_cut,
        );
    };
    ($bin:expr $(,)?) => {
        $crate::suite!($bin, []);
    };
}
