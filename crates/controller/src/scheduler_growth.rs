//! Holds that grow, and preemption when one cannot (vLLM's recompute policy): a decoding sequence whose next
//! position lies beyond what admission holds for it asks for `reserve_ahead` more positions; when some worker has
//! no room for them, the youngest admitted sequence that is not in a step is preempted — freed on the workers,
//! its hold given back once Free has returned, and queued first to be admitted again. Its generated tokens stay
//! (the client already has them): readmitted, it prefills its prompt and every generated token but the last,
//! then decodes from the last. It samples as if nothing happened: every chunk tells the last worker how many
//! tokens came before (`SeqChunk.generated`), and the sampler it makes afresh resumes its seeded stream there.

use std::collections::HashSet;

use pipemoe_proto::worker_v1::FreeRequest;

use super::{Core, Phase, Seq};
use crate::fleet::Fleet;

impl Seq {
    /// Positions its context fills: the prompt, and every generated token but the last (which the next decode
    /// step feeds).
    pub(super) fn context_len(&self) -> usize {
        self.req.prompt.len() + self.generated.len().saturating_sub(1)
    }

    /// Tokens `start..end` of its context.
    pub(super) fn context(&self, start: usize, end: usize) -> Vec<u32> {
        let p = self.req.prompt.len();
        (start..end).map(|i| if i < p { self.req.prompt[i] } else { self.generated[i - p] }).collect()
    }

    /// Positions to hold for its next stretch: what its next step fills plus `ahead`, at most its limit.
    pub(super) fn want(&self, ahead: usize) -> usize {
        (self.req.prompt.len() + self.generated.len() + ahead).min(self.limit)
    }
}

impl Core {
    /// Grows the hold of every decoding sequence whose next step would pass it; returns those that could not
    /// grow (they sit out this round), after preempting one sequence to make room when none is on its way.
    pub(super) fn grow_holds(&mut self) -> HashSet<u64> {
        let ahead = self.cfg.reserve_ahead;
        let mut starved = HashSet::new();
        if self.fleet.is_none() {
            self.starving = false;
            return starved;
        }
        let ids: Vec<u64> = self.queue.iter().copied().collect();
        for id in ids {
            let Some(s) = self.seqs.get_mut(&id) else { continue };
            // A decode step fills position prompt + generated − 1, so it needs prompt + generated held.
            if s.phase != Phase::Decoding || s.in_flight || s.held >= s.req.prompt.len() + s.generated.len() {
                continue;
            }
            let want = s.want(ahead);
            if self.budget.try_grow(s.held, want) {
                s.held = want;
            } else {
                starved.insert(id);
            }
        }
        self.starving = !starved.is_empty();
        // Room given back by Free is on its way: wait for it rather than preempt another sequence.
        if !starved.is_empty() && self.frees.is_empty() {
            let victim = self
                .seqs
                .iter()
                .filter(|(_, s)| s.phase != Phase::Queued && !s.in_flight)
                .max_by_key(|(_, s)| s.admitted)
                .map(|(&id, _)| id);
            if let Some(id) = victim {
                self.preempt(id);
                starved.remove(&id);
            }
        }
        starved
    }

    /// Frees `id` on the workers and queues it first, keeping what it generated.
    fn preempt(&mut self, id: u64) {
        let Some(s) = self.seqs.get_mut(&id) else { return };
        tracing::info!(
            request = %s.req.request_id,
            generated = s.generated.len(),
            "no KV cache room to grow: preempted, to recompute when there is room"
        );
        s.phase = Phase::Queued;
        let held = std::mem::take(&mut s.held);
        self.queue.retain(|&q| q != id);
        self.queue.push_front(id);
        self.free_on_workers(id, held);
    }

    /// Frees `id` on every worker and gives back `held` positions once Free has gone down the chain (or failed:
    /// a worker that does not answer takes the fleet down with it). Free waits on each worker behind the steps
    /// already queued there, so it gets a step's time, not less: given back early, the room would be admitted
    /// again while a worker still holds it, and the next step would find that worker's cache full.
    pub(super) fn free_on_workers(&mut self, id: u64, held: usize) {
        let limit = self.cfg.step_timeout;
        match self.fleet.as_ref().and_then(Fleet::head).map(|w| w.client.clone()) {
            Some(mut c) => {
                let generation = self.spec.generation;
                self.frees.spawn(async move {
                    let freed = tokio::time::timeout(limit, c.free(FreeRequest { seqs: vec![id] })).await;
                    match freed {
                        Ok(Ok(_)) => {}
                        Ok(Err(status)) => tracing::warn!(seq = id, %status, "free failed"),
                        Err(_) => tracing::warn!(seq = id, "free took longer than {} s", limit.as_secs()),
                    }
                    (generation, held)
                });
            }
            None => self.budget.release(held),
        }
    }
}
