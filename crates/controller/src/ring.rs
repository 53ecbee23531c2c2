//! Ring steps' outcomes (proto `StepRequest.ring`). Each worker answers a ring step once it has run its part
//! and passes it on by itself, so a step's reply is not relayed back up the chain (seven replies a token on
//! eight workers); its outcome comes on the workers' Results streams instead: the sampled tokens from the last
//! worker, a failure from the worker before the one that refused the step or could not be reached.
//!
//! `Ring` keeps one Results stream open to every worker of a fleet and hands each outcome to the step that
//! waits for it. A stream that ends or breaks (its worker exited or is shutting down) fails every waiting step
//! at once, instead of leaving them to the step timeout; later steps go nested (a worker that exited is reported
//! by the fleet's watcher, which restarts the fleet with a new `Ring`; one that lives on keeps serving).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use pipemoe_proto::worker_v1::worker_client::WorkerClient;
use pipemoe_proto::worker_v1::{ResultsRequest, StepResponse, StepResult};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// What a ring step's waiter receives.
pub type Outcome = Result<StepResponse, Status>;

#[derive(Default)]
struct Waiting {
    steps: HashMap<u64, oneshot::Sender<Outcome>>,
    /// Why the ring cannot deliver any more (a stream ended); new steps go nested.
    broken: Option<String>,
    fallback_said: bool,
}

/// The Results streams of one fleet.
pub struct Ring {
    waiting: Arc<Mutex<Waiting>>,
    readers: Vec<JoinHandle<()>>,
}

impl Ring {
    /// Opens a Results stream on each worker (in rank order) and starts reading them.
    pub async fn open(clients: &[WorkerClient<Channel>]) -> Result<Ring, (usize, Status)> {
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let mut readers = Vec::new();
        for (rank, client) in clients.iter().enumerate() {
            let stream = client.clone().results(ResultsRequest {}).await.map_err(|s| (rank, s))?.into_inner();
            readers.push(tokio::spawn(read(rank, stream, waiting.clone())));
        }
        Ok(Ring { waiting, readers })
    }

    /// Registers a step before it is sent (its outcome may come before the first worker's answer does);
    /// `None` once a stream has stopped: the step goes nested instead (said once in the log).
    pub fn expect(&self, step_id: u64) -> Option<oneshot::Receiver<Outcome>> {
        let mut w = lock(&self.waiting);
        if let Some(why) = &w.broken {
            if !w.fallback_said {
                tracing::warn!(%why, "ring steps stopped: steps go nested (replies relayed up the chain) from now on");
                w.fallback_said = true;
            }
            return None;
        }
        let (tx, rx) = oneshot::channel();
        w.steps.insert(step_id, tx);
        Some(rx)
    }

    /// Stops waiting for a step (it failed before any outcome could be sent, or its caller gave up).
    pub fn forget(&self, step_id: u64) {
        lock(&self.waiting).steps.remove(&step_id);
    }

    /// Steps waiting for their outcome.
    pub fn waiting(&self) -> usize {
        lock(&self.waiting).steps.len()
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
        fail_all(&self.waiting, "the worker fleet stopped".into());
    }
}

fn lock(w: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    w.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Hands each outcome on worker `rank`'s stream to its step; fails everything when the stream stops.
async fn read(rank: usize, mut stream: tonic::Streaming<StepResult>, waiting: Arc<Mutex<Waiting>>) {
    let why = loop {
        match stream.message().await {
            Ok(Some(r)) => deliver(&waiting, r),
            Ok(None) => break format!("worker {rank}'s results stream ended"),
            Err(s) => break format!("worker {rank}'s results stream broke: {}", s.message()),
        }
    };
    tracing::debug!(rank, %why, "ring stopped");
    fail_all(&waiting, why);
}

fn deliver(waiting: &Mutex<Waiting>, r: StepResult) {
    let Some(tx) = lock(waiting).steps.remove(&r.step_id) else {
        // Its step timed out, or failed at the first worker after a later one had reported it.
        tracing::debug!(step_id = r.step_id, "an outcome nobody waits for");
        return;
    };
    let outcome = match (r.code, r.response) {
        (0, Some(response)) => Ok(response),
        (0, None) => Err(Status::internal(format!("step {}: an outcome with neither a reply nor an error", r.step_id))),
        (code, _) => Err(Status::new(Code::from_i32(code), r.message)),
    };
    let _ = tx.send(outcome);
}

fn fail_all(waiting: &Mutex<Waiting>, why: String) {
    // (Waiting steps fail: their outcome may have been on the stream that stopped.)
    let mut w = lock(waiting);
    for (_, tx) in w.steps.drain() {
        let _ = tx.send(Err(Status::unavailable(why.clone())));
    }
    w.broken.get_or_insert(why);
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipemoe_proto::worker_v1::Sampled;

    fn ring() -> Ring {
        Ring { waiting: Arc::new(Mutex::new(Waiting::default())), readers: Vec::new() }
    }

    fn result(step_id: u64, code: i32) -> StepResult {
        let response =
            (code == 0).then(|| StepResponse { sampled: vec![Sampled { seq: 4, token: 9, ..Default::default() }] });
        StepResult {
            step_id,
            response,
            code,
            message: if code == 0 { String::new() } else { "worker 2 is full".into() },
        }
    }

    #[tokio::test]
    async fn outcomes_reach_their_steps_and_a_stopped_stream_fails_the_waiting_ones() {
        let r = ring();
        let (a, b, c) = (r.expect(1).unwrap(), r.expect(2).unwrap(), r.expect(3).unwrap());
        deliver(&r.waiting, result(2, Code::ResourceExhausted as i32));
        deliver(&r.waiting, result(1, 0));
        deliver(&r.waiting, result(7, 0)); // nobody waits for it: dropped
        assert_eq!(a.await.unwrap().unwrap().sampled[0].token, 9);
        let e = b.await.unwrap().unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::ResourceExhausted, "worker 2 is full"));
        r.forget(3);
        assert!(c.await.is_err(), "a forgotten step's sender is gone");
        let d = r.expect(4).unwrap();
        assert_eq!(r.waiting(), 1);
        fail_all(&r.waiting, "worker 1's results stream ended".into());
        let e = d.await.unwrap().unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::Unavailable, "worker 1's results stream ended"));
        // Later steps go nested.
        assert!(r.expect(5).is_none() && r.waiting() == 0);
    }

    #[tokio::test]
    async fn dropping_the_ring_fails_what_waits() {
        let r = ring();
        let a = r.expect(1).unwrap();
        drop(r);
        assert_eq!(a.await.unwrap().unwrap_err().code(), Code::Unavailable);
    }
}
