//! Async jobs (the async request-reply pattern; RFC 9110 202, RFC 7240 `Prefer: wait`).
//! `POST /jobs` records a job as queued in the journal and answers 202 with its `Location`;
//! a bounded pool of job workers in the same process runs it (never an event-loop thread), and
//! each change of its state is another record, so `GET /jobs/ID` answers from any process.
//!
//! A job is never lost with its process. Its records name an owner (pid, and the server's boot)
//! and a lease; every owner renews the leases of its jobs in one record per lease/3. A job
//! whose lease ran out, or whose owner belongs to an earlier boot (the server restarted), is
//! taken over by another process: compare-and-append under the journal's lock, so exactly one
//! takes it, and it runs again (at least once).

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use journal::Tx;
use proto::Response;

use crate::hub::lock;
use crate::idempotency::Written;
use crate::messages::{MAX_WAIT, wait_param};
use crate::problem::{json, problem};
use crate::records::{self, Job, Key, Lease, Owner, Status, Work, now_ms};
use crate::reply::{Pending, Reply, Wait};
use crate::task::burn_cpu;
use crate::{App, AppArgs, Routable};

/// The longest CPU job, and the longest sleeping one.
const MAX_WORK_US: u64 = 60_000_000;
const MAX_SLEEP_MS: u64 = 600_000;
/// The largest job input.
const MAX_INPUT: usize = 1 << 20;

/// Who runs the jobs a process accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobRole {
    /// This process runs them on its own job workers (and takes over orphaned jobs).
    Run,
    /// They are handed to the process with this pid, which runs `Run` (a process per
    /// connection hands its jobs to a background worker, as PostgreSQL's backends do).
    HandTo(u32),
}

/// This process's job workers and their queue.
pub(crate) struct Jobs {
    workers: usize,
    max_queued: usize,
    lease: Duration,
    /// Identifies this run of the server (the same in every process of a prefork server).
    boot: u64,
    role: std::sync::OnceLock<JobRole>,
    local: Mutex<Local>,
    more: Condvar,
    /// The journal moved: look for queued jobs handed to this process.
    adopt: AtomicBool,
    /// Queued-job records the view has applied, and how many had been when a worker last
    /// looked for handed jobs: only a new one is worth a look (the hub calls for every append
    /// and every fdatasync, and a message must not wake a job worker).
    queued_seen: AtomicU64,
    queued_checked: AtomicU64,
}

/// The jobs this process has taken on: waiting for a worker, or running.
#[derive(Default)]
struct Local {
    queue: VecDeque<u64>,
    known: std::collections::HashSet<u64>,
}

impl Jobs {
    pub fn new(args: &AppArgs) -> Jobs {
        Jobs {
            workers: args.job_workers,
            max_queued: args.max_queued_jobs,
            lease: args.job_lease,
            boot: random_u64(),
            role: std::sync::OnceLock::new(),
            local: Mutex::new(Local::default()),
            more: Condvar::new(),
            adopt: AtomicBool::new(false),
            queued_seen: AtomicU64::new(0),
            queued_checked: AtomicU64::new(0),
        }
    }

    /// The view has applied `n` queued-job records in all (see `queued_seen`).
    pub(crate) fn saw_queued(&self, n: u64) {
        self.queued_seen.store(n, Ordering::Release);
    }

    fn role(&self) -> JobRole {
        *self.role.get().unwrap_or(&JobRole::Run)
    }

    /// The owner the jobs accepted here are recorded with.
    fn owner_for_new(&self) -> Owner {
        match self.role() {
            JobRole::Run => self.me(),
            JobRole::HandTo(pid) => Owner {
                boot: self.boot,
                pid,
            },
        }
    }

    /// This process, as a job owner (the pid is read each time: it changes across fork).
    pub(crate) fn me(&self) -> Owner {
        Owner {
            boot: self.boot,
            pid: std::process::id(),
        }
    }

    fn lease_until(&self) -> u64 {
        now_ms() + self.lease.as_millis() as u64
    }

    /// Takes on these jobs (each once), for this process's workers.
    fn push(&self, ids: impl IntoIterator<Item = u64>) {
        let mut local = lock(&self.local);
        for id in ids {
            if local.known.insert(id) {
                local.queue.push_back(id);
            }
        }
        drop(local);
        self.more.notify_all();
    }
}

/// Starts the job workers and the lease keeper of this process, if it runs jobs.
pub(crate) fn start(app: &App, role: JobRole) -> io::Result<()> {
    let _ = app.inner.jobs.role.set(role);
    if role != JobRole::Run {
        return Ok(());
    }
    // Jobs another process handed here are found when the journal moves.
    let adopting = app.clone();
    let subscription = app.hub().subscribe(move || {
        let jobs = &adopting.inner.jobs;
        let seen = jobs.queued_seen.load(Ordering::Acquire);
        if seen != jobs.queued_checked.load(Ordering::Acquire)
            && !jobs.adopt.swap(true, Ordering::AcqRel)
        {
            jobs.more.notify_one();
        }
    });
    std::mem::forget(subscription); // for the process's life
    // Jobs handed here before the subscription (a jobs process started again) are looked for
    // once at the start.
    app.inner.jobs.adopt.store(true, Ordering::Release);
    for i in 0..app.inner.jobs.workers {
        let app = app.clone();
        std::thread::Builder::new()
            .name(format!("job-{i}"))
            .spawn(move || app.run_jobs())?;
    }
    let app = app.clone();
    std::thread::Builder::new()
        .name("job-leases".into())
        .spawn(move || app.keep_leases())?;
    Ok(())
}

impl App {
    // ---- the routes ------------------------------------------------------------------------

    #[inline(never)]
    pub(crate) fn post_job<R: Routable + ?Sized>(&self, req: &R) -> Reply {
        let work = match (req.query_param("work_us"), req.query_param("sleep_ms")) {
            (Some(us), None) => match us.parse::<u64>() {
                Ok(us) if us <= MAX_WORK_US => Work::WorkUs(us),
                _ => return bad(format!("work_us: expected 0 to {MAX_WORK_US}")),
            },
            (None, Some(ms)) => match ms.parse::<u64>() {
                Ok(ms) if ms <= MAX_SLEEP_MS => Work::SleepMs(ms),
                _ => return bad(format!("sleep_ms: expected 0 to {MAX_SLEEP_MS}")),
            },
            _ => return bad("expected /jobs?work_us=N (CPU work) or /jobs?sleep_ms=N".into()),
        };
        let fail = match req.query_param("fail") {
            None | Some("0") => false,
            Some("1") => true,
            Some(_) => return bad("fail: expected 0 or 1".into()),
        };
        let input = req.body();
        if input.len() > MAX_INPUT {
            return problem(413, format!("a job's input is at most {MAX_INPUT} bytes")).into();
        }
        let prefer_wait = match prefer_wait(req) {
            Ok(wait) => wait,
            Err(r) => return r.into(),
        };
        let jobs = &self.inner.jobs;
        if lock(&jobs.local).queue.len() >= jobs.max_queued {
            return problem(
                503,
                format!(
                    "{} jobs are waiting for a worker here; retry",
                    jobs.max_queued
                ),
            )
            .with_header("Retry-After", "1")
            .into();
        }
        self.keyed_write(req, |app, tx, key| {
            let id = tx.last_seq() + 1;
            let key = key.map(|key| Key {
                waits: prefer_wait.is_some(),
                ..key
            });
            let job = Job {
                id,
                status: Status::Queued,
                work,
                fail,
                input_seq: (!input.is_empty()).then_some(id),
                input_bytes: input.len() as u64,
                created_ms: now_ms(),
                started_ms: None,
                finished_ms: None,
                result: None,
                owner: jobs.owner_for_new(),
                lease_until_ms: jobs.lease_until(),
                attempts: 0,
                key: key.clone(),
            };
            let seq = app.append(tx, records::JOB, &job_payload(&job, input))?;
            if jobs.role() == JobRole::Run {
                jobs.push([job.id]);
            }
            Ok(match prefer_wait {
                Some(wait) => {
                    app.inner.commit.want(seq);
                    Written::Later {
                        wait: Wait::Job {
                            id: job.id,
                            durable: seq,
                            accepted: true,
                            key,
                        },
                        until: Instant::now() + wait,
                    }
                }
                None => Written::Now {
                    seq,
                    reply: accepted_reply(&job),
                },
            })
        })
    }

    #[inline(never)]
    pub(crate) fn get_job<R: Routable + ?Sized>(&self, req: &R, id: &str) -> Reply {
        let Ok(id) = id.parse::<u64>() else {
            return unknown(id).into();
        };
        let wait = match wait_param(req) {
            Ok(wait) => wait,
            Err(r) => return r.into(),
        };
        match self.poll_job(id, 0, false, wait.is_none()) {
            Some(reply) => reply.into(),
            None => Reply::Later(Pending {
                app: self.clone(),
                wait: Wait::Job {
                    id,
                    durable: 0,
                    accepted: false,
                    key: None,
                },
                until: wait.map(|w| Instant::now() + w),
            }),
        }
    }

    #[inline(never)]
    pub(crate) fn delete_job(&self, id: &str) -> Reply {
        let Ok(id) = id.parse::<u64>() else {
            return unknown(id).into();
        };
        let canceled = self.journal().begin().and_then(|mut tx| {
            let Some(mut job) = self.view().jobs.get(&id).map(|e| e.job.clone()) else {
                return Ok(Err(unknown(&id.to_string())));
            };
            if job.status.is_finished() {
                let detail = format!("job {id} has finished ({:?})", job.status).to_lowercase();
                return Ok(Err(job_reply(409, &job, Some(&detail))));
            }
            job.status = Status::Canceled;
            job.finished_ms = Some(now_ms());
            let seq = self.append(&mut tx, records::JOB, &job_payload(&job, &[]))?;
            Ok(Ok((job, seq)))
        });
        match canceled {
            Ok(Ok((job, seq))) => self.after_commit(seq, job_reply(200, &job, None)),
            Ok(Err(reply)) => reply.into(),
            Err(e) => problem(500, format!("appending to the journal: {e}")).into(),
        }
    }

    /// A poll of job `id`: its final state once it has finished (and `durable` is on disk);
    /// when `expired`, its current state (200), or 202 for a `Prefer: wait` that ran out.
    pub(crate) fn poll_job(
        &self,
        id: u64,
        durable: u64,
        accepted: bool,
        expired: bool,
    ) -> Option<Response> {
        let job = self.view().jobs.get(&id).map(|e| e.job.clone());
        let Some(job) = job else {
            return Some(unknown(&id.to_string()));
        };
        let on_disk = self.journal().durable() >= durable;
        if job.status.is_finished() && on_disk {
            return Some(job_reply(200, &job, None));
        }
        if !expired {
            return None;
        }
        if !on_disk && !self.is_stopping() {
            // Not acknowledged before the write is: `after_commit`'s rule, for Prefer too.
            return None;
        }
        Some(match accepted {
            true => accepted_reply(&job),
            false => job_reply(200, &job, None),
        })
    }

    // ---- the workers ------------------------------------------------------------------------

    /// A job worker's life: run this process's queued jobs, one at a time.
    fn run_jobs(&self) {
        let jobs = &self.inner.jobs;
        loop {
            if jobs.adopt.swap(false, Ordering::AcqRel) {
                self.adopt_handed_jobs();
            }
            let id = {
                let mut local = lock(&jobs.local);
                loop {
                    if let Some(id) = local.queue.pop_front() {
                        break Some(id);
                    }
                    if jobs.adopt.load(Ordering::Acquire) {
                        break None;
                    }
                    local = jobs.more.wait(local).unwrap_or_else(|e| e.into_inner());
                }
            };
            let Some(id) = id else { continue };
            if let Err(e) = self.run_job(id) {
                eprintln!("{}: job {id}: {e}", self.inner.pattern);
            }
            lock(&jobs.local).known.remove(&id);
        }
    }

    /// Queued jobs recorded with this process as owner that it has not taken on yet: handed
    /// here by another process.
    fn adopt_handed_jobs(&self) {
        let jobs = &self.inner.jobs;
        jobs.queued_checked
            .store(jobs.queued_seen.load(Ordering::Acquire), Ordering::Release);
        let me = jobs.me();
        let handed: Vec<u64> = {
            let view = self.view();
            let known = &lock(&self.inner.jobs.local).known;
            view.queued()
                .filter(|j| j.owner == me && !known.contains(&j.id))
                .map(|j| j.id)
                .collect()
        };
        if !handed.is_empty() {
            self.inner.jobs.push(handed);
        }
    }

    fn run_job(&self, id: u64) -> io::Result<()> {
        let jobs = &self.inner.jobs;
        let me = jobs.me();
        // Claim it: still queued and still ours (a cancel or a takeover may have come first).
        let claimed = {
            let mut tx = self.journal().begin()?;
            let job = self.view().jobs.get(&id).map(|e| e.job.clone());
            match job {
                Some(mut job) if job.status == Status::Queued && job.owner == me => {
                    job.status = Status::Running;
                    job.started_ms = Some(now_ms());
                    job.attempts += 1;
                    job.lease_until_ms = jobs.lease_until();
                    let seq = self.append(&mut tx, records::JOB, &job_payload(&job, &[]))?;
                    // Registered before the lock is released: a cancel appended later sets it.
                    let cancel = self.view().watch_cancel(id);
                    Some((job, seq, cancel))
                }
                _ => None,
            }
        };
        let Some((mut job, seq, cancel)) = claimed else {
            return Ok(());
        };
        self.inner.commit.want(seq);
        let input = match job.input_seq {
            Some(at) => self.read_input(at)?,
            None => Vec::new(),
        };
        let result = execute(job.work, &input, &cancel);
        let finished = {
            let mut tx = self.journal().begin()?;
            let mut view = self.view();
            view.unwatch_cancel(id);
            let current = view.jobs.get(&id).map(|e| (e.job.status, e.job.owner));
            drop(view);
            // Canceled meanwhile, or taken over by another process: its record stands.
            if current == Some((Status::Running, me)) {
                job.status = if job.fail {
                    Status::Failed
                } else {
                    Status::Succeeded
                };
                job.finished_ms = Some(now_ms());
                job.result = Some(result);
                Some(self.append(&mut tx, records::JOB, &job_payload(&job, &[]))?)
            } else {
                None
            }
        };
        if let Some(seq) = finished {
            self.inner.commit.want(seq);
        }
        Ok(())
    }

    pub(crate) fn read_input(&self, seq: u64) -> io::Result<Vec<u8>> {
        let mut input = None;
        self.journal()
            .read_after(seq - 1, 1, |r| {
                if r.seq == seq {
                    input = Some(split_payload(r.payload).1.to_vec());
                }
            })
            .map_err(|e| io::Error::other(format!("reading its input: {e}")))?;
        input.ok_or_else(|| io::Error::other(format!("its input (seq {seq}) is missing")))
    }

    // ---- leases and takeovers ---------------------------------------------------------------

    /// Every lease/3: renew the leases of this process's jobs (one record), and take over the
    /// jobs whose owner stopped renewing, or belongs to an earlier run of the server.
    fn keep_leases(&self) {
        let jobs = &self.inner.jobs;
        loop {
            if let Err(e) = self.renew_leases().and_then(|()| self.take_over()) {
                eprintln!("{}: job leases: {e}", self.inner.pattern);
            }
            std::thread::sleep(jobs.lease / 3);
        }
    }

    fn renew_leases(&self) -> io::Result<()> {
        let jobs = &self.inner.jobs;
        let me = jobs.me();
        let mine: Vec<u64> = self
            .view()
            .jobs
            .values()
            .filter(|e| e.job.owner == me && !e.job.status.is_finished())
            .map(|e| e.job.id)
            .collect();
        if mine.is_empty() {
            return Ok(());
        }
        let lease = Lease {
            owner: me,
            until_ms: jobs.lease_until(),
            jobs: mine,
        };
        let payload = serde_json::to_vec(&lease).expect("a lease serializes");
        let mut tx = self.journal().begin()?;
        self.append(&mut tx, records::LEASE, &payload)?;
        Ok(())
    }

    fn take_over(&self) -> io::Result<()> {
        let jobs = &self.inner.jobs;
        let me = jobs.me();
        let now = now_ms();
        let orphaned = |job: &Job| {
            !job.status.is_finished()
                && job.owner != me
                && (job.owner.boot != me.boot || job.lease_until_ms < now)
        };
        if !self.view().jobs.values().any(|e| orphaned(&e.job)) {
            return Ok(());
        }
        let mut taken = Vec::new();
        {
            let mut tx = self.journal().begin()?;
            // Under the lock, with the view caught up: nobody else can take the same job.
            let orphans: Vec<Job> = self
                .view()
                .jobs
                .values()
                .filter(|e| orphaned(&e.job))
                .map(|e| e.job.clone())
                .collect();
            for mut job in orphans {
                job.status = Status::Queued;
                job.owner = me;
                job.lease_until_ms = jobs.lease_until();
                self.append(&mut tx, records::JOB, &job_payload(&job, &[]))?;
                taken.push(job.id);
            }
        }
        if !taken.is_empty() {
            eprintln!(
                "{}: took over {} job(s) whose process stopped: {taken:?}",
                self.inner.pattern,
                taken.len()
            );
            jobs.push(taken);
        }
        Ok(())
    }

    /// The live jobs, appended again at the head of a new segment (with their inputs), so that
    /// retention may delete the old segments without losing them.
    pub(crate) fn carry_jobs_forward(&self, tx: &mut Tx<'_>) -> io::Result<()> {
        let live: Vec<Job> = self
            .view()
            .jobs
            .values()
            .filter(|e| !e.job.status.is_finished())
            .map(|e| e.job.clone())
            .collect();
        for mut job in live {
            let input = match job.input_seq {
                Some(at) => self.read_input(at)?,
                None => Vec::new(),
            };
            job.input_seq = (!input.is_empty()).then(|| tx.last_seq() + 1);
            tx.append(records::JOB, &job_payload(&job, &input))?;
        }
        Ok(())
    }
}

/// Runs a job's work; its result. A cancel stops it within a few milliseconds.
fn execute(work: Work, input: &[u8], cancel: &AtomicBool) -> serde_json::Value {
    let canceled = || cancel.load(Ordering::Relaxed);
    match work {
        Work::WorkUs(us) => {
            let (rounds, digest) = burn_cpu(Duration::from_micros(us), canceled);
            let digest = digest ^ fnv1a(input);
            serde_json::json!({
                "work_us": us,
                "rounds": rounds,
                "digest": format!("{digest:016x}"),
                "input_bytes": input.len(),
            })
        }
        Work::SleepMs(ms) => {
            let until = Instant::now() + Duration::from_millis(ms);
            while !canceled() {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(left.min(Duration::from_millis(10)));
            }
            serde_json::json!({ "sleep_ms": ms, "input_bytes": input.len() })
        }
    }
}

/// A JOB record: the state as JSON, then (in the records that carry it) a newline and the input.
fn job_payload(job: &Job, input: &[u8]) -> Vec<u8> {
    let mut payload = serde_json::to_vec(job).expect("a job serializes");
    if !input.is_empty() {
        payload.push(b'\n');
        payload.extend_from_slice(input);
    }
    payload
}

/// A JOB record's state and input (compact JSON has no raw newline).
pub(crate) fn split_payload(payload: &[u8]) -> (&[u8], &[u8]) {
    match payload.iter().position(|&b| b == b'\n') {
        Some(i) => (&payload[..i], &payload[i + 1..]),
        None => (payload, &[]),
    }
}

impl App {
    /// The 202 for job `id` as it stands now (a waiting request whose client left gets this as
    /// its key's final reply).
    pub(crate) fn accepted_now(&self, id: u64) -> Option<Response> {
        let view = self.view();
        view.jobs.get(&id).map(|e| accepted_reply(&e.job))
    }
}

/// 202, with where to poll and how soon.
pub(crate) fn accepted_reply(job: &Job) -> Response {
    json(202, &job.public())
        .with_header("Location", format!("/jobs/{}", job.id))
        .with_header("Retry-After", "1")
}

/// The job's state; while it is not finished, `Retry-After` says when to poll again.
fn job_reply(status: u16, job: &Job, detail: Option<&str>) -> Response {
    let mut body = job.public();
    if let Some(detail) = detail {
        body["detail"] = detail.into();
    }
    let reply = json(status, &body);
    match job.status.is_finished() {
        true => reply,
        false => reply.with_header("Retry-After", "1"),
    }
}

fn unknown(id: &str) -> Response {
    problem(404, format!("no job {id}"))
}

fn bad(detail: String) -> Reply {
    problem(400, detail).into()
}

/// RFC 7240 `Prefer: wait=N` (seconds), at most [`MAX_WAIT`]; other preferences are ignored.
fn prefer_wait<R: Routable + ?Sized>(req: &R) -> Result<Option<Duration>, Response> {
    let Some(value) = req.header("prefer") else {
        return Ok(None);
    };
    let value = String::from_utf8_lossy(value);
    for pref in value.split([',', ';']).map(str::trim) {
        let Some((name, v)) = pref.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("wait") {
            return match v.trim().trim_matches('"').parse::<u64>() {
                Ok(secs) => Ok(Some(Duration::from_secs(secs).min(MAX_WAIT))),
                Err(_) => Err(problem(400, "Prefer: wait=N takes whole seconds")),
            };
        }
    }
    Ok(None)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: `bytes` is valid for writes of its length; getrandom writes at most that.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Unique enough for a boot id: the time and the pid.
        return now_ms() ^ (u64::from(std::process::id()) << 40);
    }
    u64::from_ne_bytes(bytes)
}
