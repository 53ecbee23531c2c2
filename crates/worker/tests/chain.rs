//! Three in-process workers over the demo model, chained worker → worker (Unix sockets and TCP): the chain's
//! tokens equal the single-process generator's, concurrent steps equal sequential ones, and a refused step
//! changes nothing.

mod common;

use anyhow::Result;
use common::*;
use pipemoe_worker::proto::{Sampling, WorkerState};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_equals_the_generator() -> Result<()> {
    let chain = Chain::start().await?;
    let prompts = prompts(&chain.tokenizer)?;
    let want = expected(&prompts)?;
    let mut c = chain.entry();
    // Both prompts prefilled in one step, then decoded together.
    let seqs: Vec<(u64, Vec<u32>)> = prompts.iter().cloned().enumerate().map(|(i, p)| (100 + i as u64, p)).collect();
    let got = generate(&mut c, &chain.tokenizer, 1, &seqs).await?;
    assert_eq!(got, want);
    // The demo answers 42, then EOS.
    let answer = &got[0];
    assert!(answer.last().is_some_and(|&t| chain.tokenizer.is_eos(t)), "{answer:?}");
    assert_eq!(chain.tokenizer.decode(&answer[..answer.len() - 1], true)?, "42");

    let steps = got.iter().map(Vec::len).max().unwrap_or(0) as u64;
    for (rank, (layers, embed, head)) in
        [(0..1, true, false), (1..3, false, false), (3..4, false, true)].into_iter().enumerate()
    {
        let h = health(&mut chain.clients[rank].clone()).await?;
        assert_eq!(h.state, WorkerState::Ready as i32);
        assert_eq!((h.rank, h.device.as_str(), h.embed, h.head), (rank as u32, "cpu", embed, head));
        let l = h.layers.unwrap_or_default();
        assert_eq!(l.start as usize..l.end as usize, layers);
        assert_eq!(h.experts, None);
        assert_eq!(h.steps, steps, "worker {rank}");
        assert_eq!(h.pid, std::process::id());
        assert!(h.memory_bytes > 0);
        assert!(h.message.is_empty(), "{}", h.message);
    }
    chain.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_steps_equal_sequential() -> Result<()> {
    let chain = Chain::start().await?;
    let prompts = prompts(&chain.tokenizer)?;
    let want = expected(&prompts)?;
    let (mut a, mut b) = (chain.entry(), chain.entry());
    let tok = &chain.tokenizer;
    let seq_a = [(7, prompts[0].clone())];
    let seq_b = [(8, prompts[1].clone())];
    let (got_a, got_b) = tokio::join!(generate(&mut a, tok, 1000, &seq_a), generate(&mut b, tok, 2000, &seq_b));
    assert_eq!(got_a?, want[..1]);
    assert_eq!(got_b?, want[1..]);
    chain.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_step_changes_nothing() -> Result<()> {
    let chain = Chain::start().await?;
    let prompts = prompts(&chain.tokenizer)?;
    let want = expected(&prompts)?;
    let mut c = chain.entry();
    let p = &prompts[0];
    let first = step(&mut c, 1, vec![chunk(1, 0, p, Some(greedy()))]).await?;
    assert_eq!(first.sampled[0].token, want[0][0]);

    // Each refused before anything runs: wrong start (alone, and beside a good chunk), no tokens, a token
    // outside the vocabulary, sampling settings that differ from the sequence's first ones.
    let good = chunk(1, p.len(), &[want[0][0]], Some(greedy()));
    let sampled_hot = Some(Sampling { temperature: 0.7, top_p: 1.0, ..Sampling::default() });
    let bad = [
        (vec![chunk(1, p.len() + 1, &[want[0][0]], Some(greedy()))], "starts at position"),
        (vec![chunk(2, 0, p, Some(greedy())), chunk(1, 3, &[want[0][0]], Some(greedy()))], "positions are cached"),
        (vec![chunk(1, p.len(), &[], Some(greedy()))], "no tokens"),
        (vec![chunk(1, p.len(), &[100_000], Some(greedy()))], "outside the vocabulary"),
        (vec![chunk(1, p.len(), &[want[0][0]], sampled_hot)], "differs from the settings"),
    ];
    for (i, (chunks, why)) in bad.into_iter().enumerate() {
        let err = step(&mut c, 10 + i as u64, chunks).await.err().map(|s| (s.code(), s.message().to_string()));
        let (code, message) = err.unwrap_or((Code::Ok, String::new()));
        assert_eq!(code, Code::InvalidArgument, "{why}: {message}");
        assert!(message.contains(why) && message.contains(&format!("step {}", 10 + i)), "{message}");
    }
    // Sequence 2 of the mixed step was not prefilled either: it starts at 0 still.
    let again = step(&mut c, 20, vec![chunk(2, 0, p, Some(greedy()))]).await?;
    assert_eq!(again.sampled[0].token, want[0][0]);
    // Sequence 1 continues exactly as the generator does.
    let mut tokens = vec![want[0][0]];
    let mut next = good;
    for step_id in 30.. {
        let resp = step(&mut c, step_id, vec![next.clone()]).await?;
        let t = resp.sampled[0].token;
        tokens.push(t);
        if chain.tokenizer.is_eos(t) || tokens.len() >= MAX_TOKENS {
            break;
        }
        next = chunk(1, next.start as usize + 1, &[t], Some(greedy()));
    }
    assert_eq!(tokens, want[0]);
    chain.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_then_prefill_again() -> Result<()> {
    let chain = Chain::start().await?;
    let prompts = prompts(&chain.tokenizer)?;
    let want = expected(&prompts)?;
    let mut c = chain.entry();
    let p = &prompts[1];
    let before = health(&mut chain.clients[2].clone()).await?.memory_bytes;
    step(&mut c, 1, vec![chunk(5, 0, p, Some(greedy()))]).await?;
    step(&mut c, 2, vec![chunk(5, p.len(), &[want[1][0]], Some(greedy()))]).await?;
    let cached = health(&mut chain.clients[2].clone()).await?.memory_bytes;
    assert!(cached > before, "the cache shows in memory_bytes: {cached} vs {before}");
    free(&mut c, &[5, 999]).await?;
    assert_eq!(health(&mut chain.clients[2].clone()).await?.memory_bytes, before);
    // Gone from every worker: continuing is refused, starting over gives the same tokens.
    let err = step(&mut c, 3, vec![chunk(5, p.len() + 1, &[want[1][1]], Some(greedy()))]).await.err();
    assert_eq!(err.map(|s| s.code()), Some(Code::InvalidArgument));
    let got = generate(&mut c, &chain.tokenizer, 4, &[(5, p.clone())]).await?;
    assert_eq!(got, want[1..]);
    chain.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_whose_caller_stops_waiting_still_frees_every_worker() -> Result<()> {
    let chain = Chain::start().await?;
    let prompts = prompts(&chain.tokenizer)?;
    let mut c = chain.entry();
    step(&mut c, 1, vec![chunk(6, 0, &prompts[0], Some(greedy()))]).await?;
    // A long prefill of another sequence holds the workers' engines while the free arrives, so the caller's
    // deadline passes while the free waits behind it, and the server cancels the free's handler. (A deadline
    // of microseconds could pass before the server has even read the request, which then never runs at all:
    // a caller's choice, not the case under test.)
    let long: Vec<u32> = prompts[1].iter().cycle().take(1024).copied().collect();
    let mut busy_client = chain.entry();
    let busy = tokio::spawn(async move { step(&mut busy_client, 2, vec![chunk(7, 0, &long, None)]).await });
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let mut req = tonic::Request::new(pipemoe_worker::proto::FreeRequest { seqs: vec![6] });
    req.set_timeout(std::time::Duration::from_millis(20));
    // The prefill takes seconds on the CPU; the free's 20 ms pass long before it ends.
    let code = c.free(req).await.err().map(|s| s.code());
    assert!(matches!(code, Some(Code::Cancelled | Code::DeadlineExceeded)), "the caller gave up first: {code:?}");
    busy.await??;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for rank in 0..3 {
        loop {
            // Only the long sequence stays.
            let used = health(&mut chain.clients[rank].clone()).await?.kv_used_positions;
            if used == 1024 {
                break;
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "worker {rank} caches {used} positions, not 1024");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    chain.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_agree_with_greedy() -> Result<()> {
    let chain = Chain::start().await?;
    let prompts = prompts(&chain.tokenizer)?;
    let want = expected(&prompts)?;
    let mut c = chain.entry();
    let asks = |top_logprobs| {
        Some(Sampling { temperature: 0.0, top_p: 1.0, logprobs: true, top_logprobs, ..Sampling::default() })
    };
    let resp = step(&mut c, 1, vec![chunk(1, 0, &prompts[0], asks(5)), chunk(2, 0, &prompts[1], asks(50))]).await?;
    assert_eq!(resp.sampled.len(), 2);
    for (s, (k, want)) in resp.sampled.iter().zip([(5, &want[0]), (20, &want[1])]) {
        assert_eq!(s.token, want[0]);
        assert_eq!(s.top.len(), k, "top_logprobs is capped at 20");
        assert_eq!(s.top[0].token, s.token, "greedy picks the most likely token");
        assert_eq!(s.logprob, Some(s.top[0].logprob));
        assert!(s.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        assert!(s.top.iter().all(|t| t.logprob <= 0.0));
    }
    // Without asking: neither.
    let resp = step(&mut c, 2, vec![chunk(3, 0, &prompts[0], Some(greedy()))]).await?;
    assert_eq!((resp.sampled[0].logprob, resp.sampled[0].top.len()), (None, 0));
    chain.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_is_reproducible() -> Result<()> {
    let chain = Chain::start().await?;
    let prompts = prompts(&chain.tokenizer)?;
    let mut c = chain.entry();
    let hot = Some(Sampling { temperature: 1.5, top_p: 1.0, seed: Some(42), ..Sampling::default() });
    let mut runs = Vec::new();
    for seq in [1, 2] {
        let mut tokens = Vec::new();
        let mut next = chunk(seq, 0, &prompts[1], hot);
        for step_id in 0..6 {
            let t = step(&mut c, seq * 100 + step_id, vec![next.clone()]).await?.sampled[0].token;
            tokens.push(t);
            next = chunk(seq, next.start as usize + next.tokens.len(), &[t], hot);
        }
        runs.push(tokens);
    }
    assert_eq!(runs[0], runs[1], "same seed, same prompt, same tokens");
    chain.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_recomputed_after_a_preemption_continues_its_seeded_stream() -> Result<()> {
    let chain = Chain::start().await?;
    let mut c = chain.entry();
    let hot = Some(Sampling { temperature: 2.0, top_p: 1.0, seed: Some(42), ..Sampling::default() });
    // A prompt the demo was never trained on, so its next-token distributions are wide and the draws matter.
    let p: &Vec<u32> = &(0..24).map(|i| 40 + (i * 7) % 50).collect();
    // Eight tokens in one go.
    let mut whole = Vec::new();
    let mut next = chunk(1, 0, p, hot);
    for step_id in 0..8 {
        let t = step(&mut c, 100 + step_id, vec![next.clone()]).await?.sampled[0].token;
        whole.push(t);
        next = chunk(1, next.start as usize + next.tokens.len(), &[t], hot);
        next.generated = whole.len() as u32;
    }
    // As the scheduler recomputes a sequence preempted after four tokens: its prompt and first three tokens
    // prefilled without sampling, then decoding from the fourth, the sampler told four came before.
    let context: Vec<u32> = p.iter().chain(&whole[..3]).copied().collect();
    step(&mut c, 200, vec![chunk(2, 0, &context, None)]).await?;
    let mut next = chunk(2, context.len(), &whole[3..4], hot);
    next.generated = 4;
    let mut resumed = Vec::new();
    for step_id in 0..4 {
        let t = step(&mut c, 201 + step_id, vec![next.clone()]).await?.sampled[0].token;
        resumed.push(t);
        next = chunk(2, next.start as usize + 1, &[t], hot);
        next.generated = 4 + resumed.len() as u32;
    }
    assert_eq!(resumed, whole[4..], "the recomputed sequence samples as the uninterrupted one did");
    chain.stop().await
}
