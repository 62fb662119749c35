//! The journal in one process: appending and reading, recovery, segments and retention, the
//! directory lock, threads, group commit and wake-ups. (Several processes: `processes.rs`.)

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{Scratch, frame_len, read_all};
use journal::{Config, Journal, OpenError, ReadError};

fn payload(i: u64) -> Vec<u8> {
    format!("record {i} {}", "x".repeat((i % 7) as usize)).into_bytes()
}

/// Appends records `from..=to` with `payload(i)` and kind `i % 256`.
fn fill(j: &Journal, from: u64, to: u64) {
    for i in from..=to {
        assert_eq!(j.append((i % 256) as u8, &payload(i)).unwrap(), i);
    }
}

fn check_records(records: &[(u64, u8, Vec<u8>)], from: u64, to: u64) {
    let seqs: Vec<u64> = records.iter().map(|r| r.0).collect();
    assert_eq!(seqs, (from..=to).collect::<Vec<_>>());
    for (seq, kind, data) in records {
        assert_eq!((*kind, data), ((*seq % 256) as u8, &payload(*seq)));
    }
}

#[test]
fn append_then_read_back() {
    let dir = Scratch::new("basic");
    let (j, rec) = Journal::open(Config::new(dir.path())).unwrap();
    assert_eq!((rec.records, rec.last_seq, rec.torn.clone()), (0, 0, None));
    assert_eq!((j.head(), j.first_seq(), j.durable()), (0, 1, 0));
    assert_eq!(j.read_after(0, 10, |_| panic!("empty log")).unwrap(), 0);

    fill(&j, 1, 100);
    assert_eq!(j.head(), 100);
    check_records(&read_all(&j, 0), 1, 100);

    // A window in the middle, bounded by `max`.
    let mut seqs = Vec::new();
    assert_eq!(j.read_after(50, 10, |r| seqs.push(r.seq)).unwrap(), 10);
    assert_eq!(seqs, (51..=60).collect::<Vec<_>>());
    // At or past the head, or max 0: nothing.
    for (after, max) in [(100, 10), (1000, 10), (0, 0)] {
        assert_eq!(j.read_after(after, max, |_| panic!()).unwrap(), 0);
    }
    let stats = j.stats();
    assert_eq!((stats.appends, stats.head), (100, 100));
    assert_eq!(
        stats.bytes,
        (1..=100).map(|i| frame_len(payload(i).len())).sum()
    );
}

#[test]
fn a_tx_is_invisible_until_dropped() {
    let dir = Scratch::new("tx");
    let (j, _) = Journal::open(dir.small()).unwrap();
    fill(&j, 1, 3);
    let mut tx = j.begin().unwrap();
    assert_eq!(tx.last_seq(), 3);
    assert_eq!(tx.append(1, b"a").unwrap().seq, 4);
    assert_eq!(tx.append(2, b"b").unwrap().seq, 5);
    assert_eq!(tx.last_seq(), 5);
    assert_eq!(j.head(), 3);
    assert_eq!(j.read_after(3, 10, |_| panic!("unpublished")).unwrap(), 0);
    let g = j.generation();
    drop(tx);
    assert_eq!(j.head(), 5);
    assert_ne!(j.generation(), g);
    let got = read_all(&j, 3);
    assert_eq!(got, vec![(4, 1, b"a".to_vec()), (5, 2, b"b".to_vec())]);
    // A Tx that appends nothing moves nothing.
    let g = j.generation();
    drop(j.begin().unwrap());
    assert_eq!((j.head(), j.generation()), (5, g));
}

#[test]
fn a_second_begin_on_the_same_thread_fails_instead_of_deadlocking() {
    let dir = Scratch::new("reentrant");
    let (j, _) = Journal::open(dir.small()).unwrap();
    let tx = j.begin().unwrap();
    assert!(j.begin().is_err());
    assert!(j.append(0, b"x").is_err());
    drop(tx);
    assert_eq!(j.append(0, b"x").unwrap(), 1);
}

#[test]
fn sync_to_an_unappended_seq_is_refused() {
    let dir = Scratch::new("sync-ahead");
    let (j, _) = Journal::open(dir.small()).unwrap();
    let seq = j.append(0, b"x").unwrap();
    let err = j.sync_to(seq + 1).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    j.sync_to(seq).unwrap();
    assert!(j.durable() >= seq);
}

#[test]
fn bad_config_is_refused() {
    let dir = Scratch::new("config");
    for bytes in [0, 1 << 32] {
        let err = Journal::open(dir.config(bytes, 1 << 20)).unwrap_err();
        assert!(matches!(err, OpenError::Config(_)), "{err}");
    }
}

#[test]
fn clean_reopen_keeps_everything_and_continues() {
    let dir = Scratch::new("reopen");
    let config = closed_log(&dir, 1000, 200); // several segments
    let (j, rec) = Journal::open(config.clone()).unwrap();
    assert_eq!((rec.first_seq, rec.last_seq, rec.records), (1, 200, 200));
    assert_eq!(rec.segments, dir.segments().len());
    assert!(rec.segments > 2);
    assert_eq!(rec.torn, None);
    let line = rec.to_string();
    assert!(
        line.contains("200 records") && line.contains("clean") && !line.contains('\n'),
        "{line}"
    );
    // Recovery syncs what it found.
    assert_eq!((j.head(), j.durable()), (200, 200));
    fill(&j, 201, 220);
    check_records(&read_all(&j, 0), 1, 220);
    // The active segment is preallocated: its zeros are free space, not a torn tail.
    let active = dir.segments().pop().unwrap();
    assert_eq!(fs::metadata(&active).unwrap().len(), 1000);
    drop(j);
    let (_, rec) = Journal::open(config).unwrap();
    assert_eq!((rec.last_seq, rec.torn), (220, None));
}

/// Opens a fresh journal in `dir`, appends `n` records of `payload(i)` in one segment, closes
/// it, and returns the segment's path and the offset of each record.
fn one_segment(dir: &Scratch, n: u64) -> (std::path::PathBuf, Vec<u64>) {
    let (j, _) = Journal::open(dir.small()).unwrap();
    fill(&j, 1, n);
    drop(j);
    let mut offsets = vec![0];
    for i in 1..n {
        offsets.push(offsets[i as usize - 1] + frame_len(payload(i).len()));
    }
    (dir.segments().pop().unwrap(), offsets)
}

fn flip_byte(path: &std::path::Path, at: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    file.read_exact_at(&mut b, at).unwrap();
    file.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}

#[test]
fn a_record_cut_short_is_a_torn_tail() {
    let dir = Scratch::new("torn-cut");
    let (seg, offsets) = one_segment(&dir, 10);
    let last = offsets[9];
    // Not preallocated any more, and the last record half there (its header and 5 bytes of
    // payload, none zero): it runs past the end.
    fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(last + 22)
        .unwrap();
    let (j, rec) = Journal::open(dir.small()).unwrap();
    let torn = rec.torn.clone().expect("torn tail reported");
    assert_eq!(
        (torn.file, torn.offset, torn.dropped),
        (seg.clone(), last, 22)
    );
    assert_eq!(rec.last_seq, 9);
    let line = rec.to_string();
    assert!(line.contains(&format!("offset {last}")), "{line}");
    assert!(line.contains("22 byte(s) dropped"), "{line}");
    // Appending goes on from the cut.
    fill(&j, 10, 12);
    check_records(&read_all(&j, 0), 1, 12);
    drop(j);
    let (_, rec) = Journal::open(dir.small()).unwrap();
    assert_eq!((rec.last_seq, rec.torn), (12, None));
}

#[test]
fn a_half_written_record_in_preallocated_space_is_a_torn_tail() {
    let dir = Scratch::new("torn-zeros");
    let (seg, offsets) = one_segment(&dir, 10);
    let last = offsets[9];
    let len = frame_len(payload(10).len());
    // The end of the last frame never reached the disk: zeros, as preallocated.
    let file = OpenOptions::new().write(true).open(&seg).unwrap();
    file.write_all_at(&[0; 5], last + len - 5).unwrap();
    let (j, rec) = Journal::open(dir.small()).unwrap();
    let torn = rec.torn.expect("torn tail reported");
    assert_eq!((torn.offset, torn.dropped), (last, len - 5));
    assert_eq!(j.head(), 9);
}

#[test]
fn a_flipped_byte_in_the_last_record_is_a_torn_tail() {
    let dir = Scratch::new("torn-flip");
    let (_, offsets) = one_segment(&dir, 10);
    let seg = dir.segments().pop().unwrap();
    flip_byte(&seg, offsets[9] + 20);
    let (j, rec) = Journal::open(dir.small()).unwrap();
    assert_eq!(rec.torn.expect("torn").offset, offsets[9]);
    assert_eq!(j.head(), 9);
    check_records(&read_all(&j, 0), 1, 9);
}

#[test]
fn a_flipped_byte_in_a_middle_record_is_corruption() {
    let dir = Scratch::new("corrupt-middle");
    let (seg, offsets) = one_segment(&dir, 10);
    flip_byte(&seg, offsets[4] + 20);
    let before = fs::read(&seg).unwrap();
    match Journal::open(dir.small()).unwrap_err() {
        OpenError::Corrupt { file, offset, .. } => {
            assert_eq!((file, offset), (seg.clone(), offsets[4]));
        }
        other => panic!("{other}"),
    }
    let msg = Journal::open(dir.small()).unwrap_err().to_string();
    assert!(
        msg.contains(&seg.display().to_string()) && msg.contains(&format!("offset {}", offsets[4])),
        "{msg}"
    );
    // Nothing was cut.
    assert_eq!(fs::read(&seg).unwrap(), before);
}

/// A log of records `1..=n` in segments of `segment_bytes`, closed; its config.
fn closed_log(dir: &Scratch, segment_bytes: u64, n: u64) -> Config {
    let config = dir.config(segment_bytes, 1 << 20);
    let (j, _) = Journal::open(config.clone()).unwrap();
    fill(&j, 1, n);
    config
}

#[test]
fn a_bad_record_in_an_earlier_segment_is_corruption() {
    let dir = Scratch::new("corrupt-earlier");
    let config = closed_log(&dir, 1000, 100);
    let segments = dir.segments();
    assert!(segments.len() > 2);
    // The last record of the first segment: in the last segment it would pass for torn.
    let first = &segments[0];
    let len = fs::metadata(first).unwrap().len();
    flip_byte(first, len - 2);
    match Journal::open(config).unwrap_err() {
        OpenError::Corrupt { file, reason, .. } => {
            assert_eq!(&file, first);
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_missing_segment_is_a_gap() {
    let dir = Scratch::new("gap");
    let config = closed_log(&dir, 1000, 100);
    let segments = dir.segments();
    fs::remove_file(&segments[1]).unwrap();
    match Journal::open(config).unwrap_err() {
        OpenError::Corrupt {
            file,
            offset,
            reason,
        } => {
            assert_eq!((&file, offset), (&segments[2], 0));
            assert!(reason.contains("expected"), "{reason}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn segments_roll_at_the_size() {
    let dir = Scratch::new("roll");
    // 100-byte frames, 10 to a segment.
    let (j, _) = Journal::open(dir.config(1000, 1 << 20)).unwrap();
    let body = [7u8; 83];
    let mut rolled_at = Vec::new();
    for _ in 0..25 {
        let mut tx = j.begin().unwrap();
        let a = tx.append(1, &body).unwrap();
        if a.rolled {
            rolled_at.push(a.seq);
        }
    }
    assert_eq!(rolled_at, vec![11, 21]);
    let names: Vec<String> = dir
        .segments()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "00000000000000000001.log",
            "00000000000000000011.log",
            "00000000000000000021.log"
        ]
    );
    // Rolled segments are cut to their data; the active one is preallocated.
    let sizes: Vec<u64> = dir
        .segments()
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .collect();
    assert_eq!(sizes, [1000, 1000, 1000]);
    assert_eq!(j.stats().segments_rolled, 2);
    // A roll syncs the old segment, so everything published before it is durable.
    assert!(j.durable() >= 20);

    // A record bigger than a segment gets one of its own; the next one rolls again.
    let big = vec![9u8; 2500];
    let mut tx = j.begin().unwrap();
    assert!(tx.append(2, &big).unwrap().rolled);
    assert!(tx.append(3, b"after").unwrap().rolled);
    drop(tx);
    let got = read_all(&j, 25);
    assert_eq!(got, vec![(26, 2, big), (27, 3, b"after".to_vec())]);
    drop(j);
    let (_, rec) = Journal::open(dir.config(1000, 1 << 20)).unwrap();
    assert_eq!((rec.last_seq, rec.segments, rec.torn), (27, 5, None));
}

#[test]
fn reads_cross_segment_boundaries() {
    let dir = Scratch::new("across");
    let (j, _) = Journal::open(dir.config(300, 1 << 20)).unwrap();
    fill(&j, 1, 60);
    assert!(dir.segments().len() > 5);
    for after in [0, 3, 17, 59] {
        for max in [1, 2, 7, 100] {
            let mut got = Vec::new();
            let n = j
                .read_after(after, max, |r| {
                    got.push((r.seq, r.kind, r.payload.to_vec()))
                })
                .unwrap();
            let to = (after + max as u64).min(60);
            assert_eq!(n as u64, to - after);
            check_records(&got, after + 1, to);
        }
    }
}

#[test]
fn retention_deletes_old_segments_and_readers_get_gone() {
    let dir = Scratch::new("retain");
    // 100-byte frames, 10 per 1000-byte segment; keep about 3 segments.
    let (j, _) = Journal::open(dir.config(1000, 3000)).unwrap();
    let body = [1u8; 83];
    for _ in 0..100 {
        j.append(0, &body).unwrap();
    }
    let segments = dir.segments();
    assert_eq!(segments.len(), 3, "{segments:?}");
    // This process keeps no deleted segment open (that would hold its disk space).
    assert_eq!(open_deleted_files(dir.path()), 0);
    let first = j.first_seq();
    assert_eq!(first, 71);
    assert_eq!(j.stats().segments_deleted, 7);
    match j.read_after(0, 10, |_| panic!("deleted")) {
        Err(ReadError::Gone { first: f }) => assert_eq!(f, first),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        j.read_after(first - 2, 10, |_| panic!("deleted")),
        Err(ReadError::Gone { .. })
    ));
    let mut seqs = Vec::new();
    j.read_after(first - 1, 1000, |r| seqs.push(r.seq)).unwrap();
    assert_eq!(seqs, (first..=100).collect::<Vec<_>>());
    drop(j);
    let (_, rec) = Journal::open(dir.config(1000, 3000)).unwrap();
    assert_eq!((rec.first_seq, rec.last_seq), (71, 100));
}

/// Descriptors of this process on files under `dir` that were deleted.
fn open_deleted_files(dir: &std::path::Path) -> usize {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|target| {
            let target = target.to_string_lossy();
            target.starts_with(&*dir.to_string_lossy()) && target.ends_with(" (deleted)")
        })
        .count()
}

#[test]
fn a_second_open_is_locked_out_until_the_first_closes() {
    let dir = Scratch::new("lock");
    let (j, _) = Journal::open(dir.small()).unwrap();
    let err = Journal::open(dir.small()).unwrap_err();
    match &err {
        OpenError::Locked { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
        other => panic!("{other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("is in use by pid {}", std::process::id())),
        "{msg}"
    );
    j.append(0, b"x").unwrap();
    drop(j);
    let (j, rec) = Journal::open(dir.small()).unwrap();
    assert_eq!((rec.last_seq, j.head()), (1, 1));
}

#[test]
fn concurrent_appends_get_every_seq_exactly_once() {
    let dir = Scratch::new("threads");
    let (j, _) = Journal::open(dir.config(64 << 10, 1 << 30)).unwrap();
    let j = Arc::new(j);
    const THREADS: u64 = 8;
    const EACH: u64 = 500;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let j = j.clone();
            thread::spawn(move || {
                (0..EACH)
                    .map(|i| j.append(t as u8, &(t * EACH + i).to_le_bytes()).unwrap())
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=THREADS * EACH).collect::<Vec<_>>());
    assert!(j.stats().segments_rolled > 0);
    // On disk, each thread's records are all there, in its order.
    let mut next = vec![0u64; THREADS as usize];
    for (seq, kind, data) in read_all(&j, 0) {
        let value = u64::from_le_bytes(data.try_into().unwrap());
        let t = kind as u64;
        assert_eq!(value, t * EACH + next[t as usize], "seq {seq}");
        next[t as usize] += 1;
    }
    assert_eq!(next, vec![EACH; THREADS as usize]);
}

#[test]
fn compare_and_append_under_a_tx() {
    // Each thread reads the last record's counter and appends counter + 1: the result is a
    // gap-free count only if nobody appends between a Tx's read and its append.
    let dir = Scratch::new("cas");
    let (j, _) = Journal::open(dir.small()).unwrap();
    j.append(0, &0u64.to_le_bytes()).unwrap();
    let j = Arc::new(j);
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let j = j.clone();
            thread::spawn(move || {
                for _ in 0..200 {
                    let mut tx = j.begin().unwrap();
                    let mut counter = None;
                    j.read_after(tx.last_seq() - 1, 1, |r| {
                        counter = Some(u64::from_le_bytes(r.payload.try_into().unwrap()))
                    })
                    .unwrap();
                    tx.append(0, &(counter.unwrap() + 1).to_le_bytes()).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let values: Vec<u64> = read_all(&j, 0)
        .into_iter()
        .map(|(_, _, d)| u64::from_le_bytes(d.try_into().unwrap()))
        .collect();
    assert_eq!(values, (0..=1200).collect::<Vec<_>>());
}

#[test]
fn group_commit_shares_fdatasyncs_and_every_caller_is_durable() {
    let dir = Scratch::new("group");
    let (j, _) = Journal::open(dir.small()).unwrap();
    let j = Arc::new(j);
    const THREADS: usize = 16;
    const EACH: usize = 40;
    let start = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (j, start) = (j.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                for i in 0..EACH {
                    let seq = j.append(t as u8, &i.to_le_bytes()).unwrap();
                    j.sync_to(seq).unwrap();
                    assert!(j.durable() >= seq, "sync_to({seq}) returned early");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let stats = j.stats();
    let appends = (THREADS * EACH) as u64;
    assert_eq!((stats.appends, stats.durable), (appends, appends));
    assert_eq!(stats.synced_records, appends);
    // Without grouping there would be one fdatasync per append.
    assert!(
        stats.fdatasyncs * 3 <= appends,
        "{} fdatasyncs for {appends} synced appends",
        stats.fdatasyncs
    );
}

#[test]
fn wait_for_change_times_out_returns_at_once_and_wakes_on_append() {
    let dir = Scratch::new("wait");
    let (j, _) = Journal::open(dir.small()).unwrap();
    // Appends with nobody waiting make no wake-up syscall.
    fill(&j, 1, 5);
    assert_eq!(j.stats().futex_wakes, 0);

    let g = j.generation();
    let t0 = Instant::now();
    assert_eq!(j.wait_for_change(g, Duration::from_millis(30)), g);
    assert!(t0.elapsed() >= Duration::from_millis(30));

    // Already changed: no wait at all (a generous bound, far below the timeout).
    j.append(0, b"moved").unwrap();
    let t0 = Instant::now();
    assert_ne!(j.wait_for_change(g, Duration::from_secs(10)), g);
    assert!(t0.elapsed() < Duration::from_secs(5));

    // Woken by another thread's append.
    let j = Arc::new(j);
    let g = j.generation();
    let appender = {
        let j = j.clone();
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while j.stats().watchers == 0 {
                assert!(Instant::now() < deadline, "the watcher never waited");
                thread::yield_now();
            }
            j.append(0, b"wake").unwrap()
        })
    };
    let t0 = Instant::now();
    let now = j.wait_for_change(g, Duration::from_secs(10));
    assert_ne!(now, g);
    assert!(t0.elapsed() < Duration::from_secs(5));
    let seq = appender.join().unwrap();
    assert_eq!(j.head(), seq);
    assert_eq!(j.stats().futex_wakes, 1);

    // wake_watchers moves the generation even without an append.
    let g = j.generation();
    j.wake_watchers();
    assert_ne!(j.wait_for_change(g, Duration::from_secs(10)), g);
}
