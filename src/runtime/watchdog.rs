//! Bounds blocking client calls that librdkafka does not bound itself.
//!
//! librdkafka 2.12 can leave a transactional call waiting forever: after a broker was fenced or
//! restarted, `send_offsets_to_transaction` can wait on a coordinator request that is never sent,
//! whatever its timeout says (its op is queued with an infinite wait). The stream thread must not
//! hang with it (DESIGN.md 12.4): such calls run on a worker thread of their own, and the stream
//! thread waits for the answer with a deadline, watching for shutdown. A call that outlives its
//! deadline makes the client count as stuck: the stream thread rebuilds with new clients and
//! leaves the worker (and the client it holds) behind.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use super::error::RuntimeError;
use super::stream_thread::Shutdown;

type Job = Box<dyn FnOnce() + Send>;

/// One worker thread that runs calls in order.
pub struct Watchdog {
    jobs: Sender<Job>,
}

impl Watchdog {
    pub fn new(name: &str) -> Result<Self, RuntimeError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                for job in queue {
                    job();
                }
            })
            .map_err(|e| RuntimeError::ClientStuck(format!("cannot start a worker thread: {e}")))?;
        Ok(Self { jobs })
    }

    /// Runs `call` on the worker and waits for its result up to `limit`. Past it (or past the
    /// shutdown grace) the call is abandoned: [`RuntimeError::ClientStuck`] (or `Interrupted`).
    pub fn run<T: Send + 'static>(
        &self,
        operation: &'static str,
        limit: Duration,
        shutdown: &Shutdown,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, RuntimeError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move || {
                let _ = reply.send(call());
            }))
            .map_err(|_| RuntimeError::ClientStuck(format!("{operation}: worker gone")))?;
        let deadline = Instant::now() + limit;
        loop {
            let step = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            match answer.recv_timeout(step) {
                Ok(value) => return Ok(value),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(RuntimeError::ClientStuck(format!(
                        "{operation}: the worker stopped"
                    )))
                }
                Err(RecvTimeoutError::Timeout) => {
                    // Shutdown leaves the call a short grace, so the last commit can finish.
                    if shutdown.grace_over() {
                        return Err(RuntimeError::Interrupted(operation));
                    }
                    if Instant::now() >= deadline {
                        return Err(RuntimeError::ClientStuck(format!(
                            "{operation} did not return within {} s",
                            limit.as_secs()
                        )));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_that_returns_is_answered_and_one_that_hangs_is_abandoned() {
        let watchdog = Watchdog::new("test-watchdog").unwrap();
        let shutdown = Shutdown::new();
        let value = watchdog
            .run("quick", Duration::from_secs(5), &shutdown, || 42)
            .unwrap();
        assert_eq!(value, 42);
        let started = Instant::now();
        let hung = watchdog.run("hanging", Duration::from_millis(300), &shutdown, || {
            std::thread::sleep(Duration::from_secs(3));
        });
        assert!(
            matches!(hung, Err(RuntimeError::ClientStuck(_))),
            "{hung:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        // After shutdown a call still gets the grace: a quick one is answered, a hanging one is
        // abandoned once the grace is over, long before its own limit.
        shutdown.request();
        let quick = watchdog.run("after", Duration::from_secs(30), &shutdown, || 7);
        assert_eq!(quick.unwrap(), 7);
        let started = Instant::now();
        let interrupted = watchdog.run("hanging after", Duration::from_secs(60), &shutdown, || {
            std::thread::sleep(Duration::from_secs(20));
        });
        assert!(matches!(interrupted, Err(RuntimeError::Interrupted(_))));
        assert!(
            started.elapsed()
                < crate::runtime::stream_thread::SHUTDOWN_GRACE + Duration::from_secs(2)
        );
    }
}
