//! Ring steps over three in-process workers (proto `StepRequest.ring`): each worker answers once it has run its
//! part, the last worker's Results stream carries the sampled tokens — the same tokens nested steps give — and a
//! step refused past the first worker is reported on the stream of the worker before the one that refused it.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::*;
use pipemoe_worker::proto::{ResultsRequest, SeqChunk, StepRequest, StepResult};
use tonic::{Code, Streaming};

async fn results(c: &mut Client) -> Result<Streaming<StepResult>> {
    Ok(c.results(ResultsRequest {}).await?.into_inner())
}

async fn ring_step(c: &mut Client, step_id: u64, chunks: Vec<SeqChunk>) -> Result<(), tonic::Status> {
    let reply = c.step(StepRequest { step_id, chunks, hidden: None, ring: true }).await?.into_inner();
    // The first worker answers for its own part only: the tokens come on the last worker's stream.
    assert!(reply.sampled.is_empty(), "{reply:?}");
    Ok(())
}

/// The next outcome on a stream (5 s at most).
async fn next(s: &mut Streaming<StepResult>) -> Result<StepResult> {
    match tokio::time::timeout(Duration::from_secs(5), s.message()).await {
        Ok(Ok(Some(r))) => Ok(r),
        Ok(Ok(None)) => bail!("the stream ended"),
        Ok(Err(status)) => bail!("the stream broke: {status}"),
        Err(_) => bail!("no outcome within 5 s"),
    }
}

/// Nothing arrives on the stream for a while.
async fn quiet(s: &mut Streaming<StepResult>) -> bool {
    tokio::time::timeout(Duration::from_millis(200), s.message()).await.is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_steps_give_the_generators_tokens_on_the_last_workers_stream() -> Result<()> {
    let chain = Chain::start().await?;
    let prompts = prompts(&chain.tokenizer)?;
    let want = expected(&prompts)?;
    let mut streams = Vec::new();
    for c in &chain.clients {
        streams.push(results(&mut c.clone()).await?);
    }
    let mut c = chain.entry();
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut chunks: Vec<SeqChunk> =
        prompts.iter().enumerate().map(|(i, p)| chunk(50 + i as u64, 0, p, Some(greedy()))).collect();
    for step_id in 1.. {
        if chunks.is_empty() {
            break;
        }
        ring_step(&mut c, step_id, chunks.clone()).await?;
        let r = next(&mut streams[2]).await?;
        assert_eq!((r.step_id, r.code), (step_id, 0), "{}", r.message);
        let sampled = r.response.context("a result without a response")?.sampled;
        assert_eq!(sampled.len(), chunks.len());
        let mut more = Vec::new();
        for (s, ch) in sampled.iter().zip(&chunks) {
            assert_eq!(s.seq, ch.seq);
            let out = &mut got[(ch.seq - 50) as usize];
            out.push(s.token);
            if !chain.tokenizer.is_eos(s.token) && out.len() < MAX_TOKENS {
                more.push(chunk(ch.seq, ch.start as usize + ch.tokens.len(), &[s.token], Some(greedy())));
            }
        }
        chunks = more;
    }
    assert_eq!(got, want);
    // The workers that passed every step on had nothing to report.
    assert!(quiet(&mut streams[0]).await && quiet(&mut streams[1]).await);
    // A second Results call takes the stream over: the first one ends.
    let mut again = results(&mut chain.clients[2].clone()).await?;
    assert!(next(&mut streams[2]).await.is_err_and(|e| e.to_string().contains("ended")));
    // The drain ends the streams, so the workers stop.
    chain.stop().await?;
    assert!(next(&mut again).await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_step_refused_past_the_first_worker_is_reported_by_the_one_before() -> Result<()> {
    let chain = Chain::start().await?;
    let p = prompts(&chain.tokenizer)?.remove(0);
    let mut c = chain.entry();
    // Nobody could be told the outcome: refused before anything runs.
    let err = ring_step(&mut c, 1, vec![chunk(1, 0, &p, Some(greedy()))]).await.expect_err("no Results stream");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("worker 0") && err.message().contains("step 1"), "{err}");

    // Streams on workers 0 and 1 only: worker 2 refuses, and worker 1 (which ran its part) says so.
    let mut first = results(&mut chain.clients[0].clone()).await?;
    let mut second = results(&mut chain.clients[1].clone()).await?;
    ring_step(&mut c, 2, vec![chunk(1, 0, &p, Some(greedy()))]).await?;
    let r = next(&mut second).await?;
    assert_eq!((r.step_id, Code::from_i32(r.code)), (2, Code::FailedPrecondition), "{}", r.message);
    assert!(r.response.is_none());
    assert!(r.message.contains("worker 2") && r.message.contains("step 2"), "{}", r.message);
    assert!(quiet(&mut first).await);

    // A step the first worker refuses is answered as an error there, with nothing on any stream.
    let err = ring_step(&mut c, 3, vec![chunk(9, 5, &p, Some(greedy()))]).await.expect_err("wrong start");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(quiet(&mut first).await && quiet(&mut second).await);
    chain.stop().await
}
