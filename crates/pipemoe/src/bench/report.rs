//! Figures over their floors, the projection to 8 × RTX 3090 for the real model, the table and the JSON.
//!
//! Projection (single stream, every GPU working in turn on one token): per layer, the bytes a decode step reads
//! (weights of attention + indexer + 8 routed + shared experts + router, and the cache at the benchmark's
//! context), over the target's bandwidth times the efficiency measured here (the slice's decode floor over its
//! measured step), summed over the real model's 3 dense + 58 MoE layers and lm_head, plus one hand-off per hop.

use std::fmt::Write;

use pipemoe_model::footprint::{CacheBytes, LayerBytes};
use pipemoe_model::random_checkpoint::{Dims, RandomSpec, tensors};
use pipemoe_model::{ModelConfig, SliceSpec};
use serde_json::{Value, json};

use super::floor::{SliceBytes, attention_flop, prefill_shapes};
use super::{BenchArgs, Measured};

/// Hops per token in the pipeline: 7 between the 8 workers, and the last worker's token back through the
/// controller to the first.
const HOPS: usize = 8;

pub struct Report {
    json: Value,
    table: String,
}

/// One line of the table: what, measured, floor, measured as a fraction of the floor's speed.
struct Line {
    what: String,
    measured: String,
    floor: String,
    ratio: Option<f64>,
}

/// The real model's per-layer decode bytes from the generator's plan (dense layer, MoE layer, lm_head + norm).
fn real_layer_bytes() -> (f64, f64, f64, usize, usize) {
    let d = Dims::deepseek_v32_reap();
    let sum = |layer: usize, routed: bool| -> f64 {
        let spec = RandomSpec { dims: d.clone(), layers: layer..layer + 1, embed: false, head: false, seed: 0 };
        tensors(&spec)
            .iter()
            .filter(|t| t.name.contains(".mlp.experts.") == routed)
            .map(|t| (t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8) as f64)
            .sum()
    };
    let dense = sum(0, false);
    let moe = sum(d.first_dense, false) + sum(d.first_dense, true) / d.experts as f64 * d.top_k as f64;
    let head = (d.vocab * d.hidden * 2 + d.hidden * 2) as f64;
    (dense, moe, head, d.first_dense, d.layers - d.first_dense)
}

/// Tensor-core FLOPs the kernels issue per quantized weight at one decode row: the GEMV's m16n8k16 mma carries
/// the row in one of its 8 columns (16 FLOPs a weight), and each k-step's sums of x take one more mma, shared by a
/// warp's 4 tiles (kernels/gptq_mma.cu).
const MMA_FLOP_PER_WEIGHT: f64 = 16.0 * 1.25;

/// Tensor-core FLOPs one token's decode issues in the real model at `context` cached positions: each quantized
/// weight it multiplies (attention, indexer, dense MLP or shared + top-k routed experts) at `MMA_FLOP_PER_WEIGHT`,
/// flash attention over the selected keys and the indexer's scores over every cached key (those mma rows are
/// heads, all used).
fn real_token_tensor_flop(context: usize) -> f64 {
    let d = Dims::deepseek_v32_reap();
    let weights = |layer: usize, routed: bool| -> f64 {
        let spec = RandomSpec { dims: d.clone(), layers: layer..layer + 1, embed: false, head: false, seed: 0 };
        tensors(&spec)
            .iter()
            .filter(|t| t.name.ends_with(".qweight") && t.name.contains(".mlp.experts.") == routed)
            .map(|t| (t.shape[0] * 32 / d.bits as usize * t.shape[1]) as f64)
            .sum()
    };
    let dense = weights(0, false);
    let moe = weights(d.first_dense, false) + weights(d.first_dense, true) / d.experts as f64 * d.top_k as f64;
    let keys = context.min(d.index_topk) as f64;
    let attention = 2.0 * d.heads as f64 * (2 * d.kv_lora + d.rope) as f64 * keys
        + 2.0 * (d.index_heads * d.index_dim) as f64 * context as f64;
    let n_moe = (d.layers - d.first_dense) as f64;
    MMA_FLOP_PER_WEIGHT * (d.first_dense as f64 * dense + n_moe * moe) + d.layers as f64 * attention
}

impl Report {
    pub fn new(
        args: &BenchArgs,
        cfg: &ModelConfig,
        slice: &SliceSpec,
        bytes: &SliceBytes,
        m: &Measured,
        with_indexer: bool,
    ) -> Self {
        let bw = m.read_gbps * 1e9;
        let mut lines = Vec::new();

        // (a) single-stream decode
        let b1 = bytes.decode_step(1, args.context);
        let floor1 = b1 / bw;
        let eff = floor1 / m.decode.median;
        lines.push(Line {
            what: format!("decode, 1 stream @ {} ctx", args.context),
            measured: format!("{:.3} ms/step = {:.1} tok/s", m.decode.median * 1e3, 1.0 / m.decode.median),
            floor: format!("{:.3} ms ({:.2} GB)", floor1 * 1e3, b1 / 1e9),
            ratio: Some(eff),
        });
        lines.push(Line {
            what: "  same, after the host queued the step (device)".into(),
            measured: format!("{:.3} ms/step", m.decode_after.median * 1e3),
            floor: format!("{:.3} ms", floor1 * 1e3),
            ratio: Some(floor1 / m.decode_after.median),
        });
        if let Some((t, _)) = &m.decode_launches {
            lines.push(Line {
                what: "  same, as launches (CUDA graphs off)".into(),
                measured: format!("{:.3} ms/step = {:.1} tok/s", t.median * 1e3, 1.0 / t.median),
                floor: format!("{:.3} ms", floor1 * 1e3),
                ratio: Some(floor1 / t.median),
            });
        }
        // (b) batched decode
        let streams = m.streams_decode.as_ref().map(|t| {
            let bytes_b = bytes.decode_step(args.streams, m.streams_context);
            (t.clone(), bytes_b, bytes_b / bw)
        });
        if let Some((t, bb, fb)) = &streams {
            lines.push(Line {
                what: format!("decode, {} streams @ {} ctx", args.streams, m.streams_context),
                measured: format!("{:.3} ms/step = {:.0} tok/s", t.median * 1e3, args.streams as f64 / t.median),
                floor: format!("{:.3} ms ({:.2} GB)", fb * 1e3, bb / 1e9),
                ratio: Some(fb / t.median),
            });
        }
        // (c) prefill against cuBLAS on the same GEMMs plus the attention FLOPs at cuBLAS's best rate
        let prefill_secs: f64 = m.prefill_chunks.iter().sum();
        let chunks = args.context.div_ceil(args.chunk);
        let prefill_floor = m.cublas.as_ref().ok().map(|times| {
            let peak = times.iter().map(|(s, t)| s.flop() / t).fold(0.0, f64::max);
            let mut per_chunk = 0.0;
            let mut flop_linear = 0.0;
            for l in slice.layers.clone() {
                for (s, count) in prefill_shapes(cfg, l, args.chunk, with_indexer) {
                    per_chunk += times.get(&s).copied().unwrap_or(0.0) * count as f64;
                    flop_linear += s.flop() * count as f64;
                }
            }
            let attn = slice.layers.len() as f64 * attention_flop(cfg, 0, args.context, with_indexer);
            let secs = per_chunk * chunks as f64 + attn / peak;
            (secs, peak, flop_linear * chunks as f64 + attn)
        });
        lines.push(Line {
            what: format!("prefill {} tokens, chunks of {}", args.context, args.chunk),
            measured: format!("{:.0} tok/s ({:.2} s)", args.context as f64 / prefill_secs, prefill_secs),
            floor: prefill_floor.map_or("- (no cuBLAS)".into(), |(s, peak, _)| {
                format!("{:.0} tok/s (cuBLAS, peak {:.0} TFLOP/s)", args.context as f64 / s, peak / 1e12)
            }),
            ratio: prefill_floor.map(|(s, _, _)| s / prefill_secs),
        });
        lines.push(Line {
            what: "  a process's first chunk (untimed above: one-time setup)".into(),
            measured: format!("{:.3} s", m.prefill_warmup),
            floor: "-".into(),
            ratio: None,
        });
        // (d) one layer's blocks
        if let Some(bl) = &m.blocks {
            let lb = bytes.layers.iter().find(|l| l.layer == bl.layer).cloned().unwrap_or_default();
            let ab = (lb.norms + lb.attention + lb.indexer + bytes.cache.decode_read(args.context)) as f64;
            lines.push(Line {
                what: format!("layer {} attention, 1 row @ {} ctx", bl.layer, args.context),
                measured: format!("{:.1} us", bl.attention * 1e6),
                floor: format!("{:.1} us ({:.1} MB)", ab / bw * 1e6, ab / 1e6),
                ratio: Some(ab / bw / bl.attention),
            });
            for &(rows, secs) in &bl.moe {
                let mb = moe_bytes(&lb, bytes.top_k, rows);
                lines.push(Line {
                    what: format!("layer {} MoE block, {rows} rows", bl.layer),
                    measured: format!("{:.1} us", secs * 1e6),
                    floor: format!("{:.1} us ({:.1} MB)", mb / bw * 1e6, mb / 1e6),
                    ratio: Some(mb / bw / secs),
                });
            }
        }
        if let Ok(t) = &m.ipc {
            let us = |t: &super::stage::Times| t.median * 1e6;
            let ipc = [
                (
                    if t.receiver == m.ordinal {
                        "IPC hand-off [1, hidden] bf16, 2 processes, one GPU"
                    } else {
                        "IPC hand-off [1, hidden] bf16, 2 processes, 2 GPUs"
                    },
                    format!("{:.1} us round trip (median)", us(&t.round_trip)),
                ),
                (
                    "  of which export / import / bare pipe round trip",
                    format!("{:.1} / {:.1} / {:.1} us", us(&t.export), us(&t.import), us(&t.pipe)),
                ),
                (
                    "  data landed on the receiver's device; sender synced first",
                    format!(
                        "{:.1} us; {:.1} us (landed {:.1})",
                        us(&t.landed),
                        us(&t.settled_round_trip),
                        us(&t.settled_landed)
                    ),
                ),
            ];
            for (what, measured) in ipc {
                lines.push(Line { what: what.into(), measured, floor: "-".into(), ratio: None });
            }
        }

        // The projection.
        let (dense_w, moe_w, head_w, n_dense, n_moe) = real_layer_bytes();
        let slice_moe: Vec<&LayerBytes> = bytes.layers.iter().filter(|l| !l.routed.is_empty()).collect();
        let moe_w = if slice_moe.is_empty() {
            moe_w
        } else {
            slice_moe.iter().map(|l| l.decode_weights(bytes.top_k, 1)).sum::<f64>() / slice_moe.len() as f64
        };
        let real = Dims::deepseek_v32_reap();
        let cache_layer = CacheBytes {
            latent: ((real.kv_lora + real.rope) * 2) as u64,
            index_key: (real.index_dim * 2) as u64,
            topk: Some(real.index_topk),
        }
        .decode_read(args.context) as f64;
        let token_bytes = n_dense as f64 * (dense_w + cache_layer) + n_moe as f64 * (moe_w + cache_layer) + head_w;
        let target = args.target_gbps * 1e9;
        let (hop_s, hop_source) = match (args.hop_us, &m.ipc) {
            (Some(us), _) => (us * 1e-6, format!("{us} us given by --hop-us")),
            // The receiver answers once its copy is queued; what a hop adds to a token is the data's landing on the
            // next device (measured here) and the serving path's message (measured by tools/hop-cost.sh, or
            // given), no credit taken for the message overlapping the sender's device work.
            (None, Ok(t)) => (
                t.landed.median + args.grpc_us * 1e-6,
                format!(
                    "IPC data landed on the next device {:.0} us after its import (measured) + {:.0} us for the gRPC step (tools/hop-cost.sh)",
                    t.landed.median * 1e6,
                    args.grpc_us
                ),
            ),
            (None, Err(_)) => (
                (300.0 + args.grpc_us) * 1e-6,
                format!(
                    "IPC not measured: 300 us assumed + {:.0} us for the gRPC step (tools/hop-cost.sh)",
                    args.grpc_us
                ),
            ),
        };
        let t_token = token_bytes / (target * eff) + HOPS as f64 * hop_s;
        let projected = 1.0 / t_token;
        // The other reading of the same run: what the kernels spend above the read floor is instruction issue and
        // latency (ncu on the H200), which scales with multiprocessor cycles, not with bytes — the 3090 has 2.7×
        // more SM cycles per byte. Its floor plus this GPU's excess time, scaled by the cycle ratio.
        let cycle_scaled = m.sm_ghz.map(|here| {
            let ratio = here / args.target_sm_ghz;
            let excess = token_bytes / bw * (1.0 / eff - 1.0);
            (1.0 / (token_bytes / target + excess * ratio + HOPS as f64 * hop_s), ratio)
        });
        let bound = target / token_bytes;
        // Tensor-core work is neither bytes nor SM cycles: the 3090's bf16 rate with f32 accumulation is a small
        // fraction of the H200's, so the check is against its own rate.
        let tensor_flop = real_token_tensor_flop(args.context);
        let tensor_s = tensor_flop / (args.target_tflops * 1e12);
        let assumptions = vec![
            format!("real model: {n_dense} dense + {n_moe} MoE layers, 128 routed experts, top-8 + 1 shared, 3-bit g128, lm_head bf16"),
            format!("bytes per token {:.2} GB: weights read once per token, cache at {} positions (bf16)", token_bytes / 1e9, args.context),
            format!("each RTX 3090 reaches {:.0}% of its {:.0} GB/s, the fraction of the read floor measured here", eff * 100.0, args.target_gbps),
            "the 3090's achievable read bandwidth is its nominal one (optimistic by ~5-10%); fixed per-step costs scale with bandwidth (pessimistic)".into(),
            format!(
                "tensor-core work {:.0} GFLOP a token as the kernels issue it (a one-row GEMV's mma carries the row in \
                 1 of its 8 columns): {:.1} ms at the 3090's {:.0} TFLOP/s (bf16, f32 accumulation), {} the {:.1} ms \
                 its bytes take at full bandwidth",
                tensor_flop / 1e9,
                tensor_s * 1e3,
                args.target_tflops,
                if tensor_s < token_bytes / target { "under" } else { "OVER" },
                token_bytes / target * 1e3
            ),
            format!("{HOPS} hops per token (7 between workers, 1 through the controller), each {:.0} us: {hop_source}", hop_s * 1e6),
            match &m.ipc {
                Ok(t) if t.receiver != m.ordinal => format!(
                    "hops between 3090s cross PCIe (peer access untested); measured here from device {} to {}",
                    m.ordinal, t.receiver
                ),
                _ => "hops between different 3090s cross PCIe (peer access untested), measured here on one GPU \
                      (two processes taking turns on it: pessimistic)"
                    .into(),
            },
        ];

        let mut table = String::new();
        let _ = writeln!(
            table,
            "pipemoe bench — {}; slice layers {:?}{}{}; {} of weights; bf16 activations, {} cache",
            m.device,
            slice.layers,
            if slice.embed { " + embed" } else { "" },
            if slice.head { " + head" } else { "" },
            gb(bytes.weights() as f64),
            args.kv_cache_dtype
        );
        let _ = writeln!(
            table,
            "ceilings (same run): streaming read {:.0} GB/s over {}; {}; load {:.1} s",
            m.read_gbps,
            gb(m.read_buffer_bytes as f64),
            prefill_floor.map_or("no cuBLAS".into(), |(_, p, _)| format!("cuBLAS bf16 up to {:.0} TFLOP/s", p / 1e12)),
            m.load_seconds
        );
        let _ = writeln!(table, "{:<44} {:>32} {:>38} {:>8}", "figure", "measured", "floor", "of floor");
        for l in &lines {
            let r = l.ratio.map_or("-".into(), |r| format!("{:.1}%", r * 100.0));
            let _ = writeln!(table, "{:<44} {:>32} {:>38} {:>8}", l.what, l.measured, l.floor, r);
        }
        let _ = writeln!(
            table,
            "projection, 8 x RTX 3090, real 345B model, 1 stream @ {} ctx: {projected:.1} tok/s \
             (bandwidth bound {bound:.1} tok/s; goal >= 40)",
            args.context
        );
        for a in &assumptions {
            let _ = writeln!(table, "  assumes: {a}");
        }
        if let Some((tps, ratio)) = cycle_scaled {
            let _ = writeln!(
                table,
                "projection, same, if the time above the floor scales with SM cycles: {tps:.1} tok/s \
                 (the 3090's floor + this run's excess × {ratio:.2}, this GPU's SM cycles over the 3090's {:.0} G/s)",
                args.target_sm_ghz
            );
        }

        let json = json!({
            "device": m.device,
            "slice": {"layers": [slice.layers.start, slice.layers.end], "embed": slice.embed, "head": slice.head,
                      "weight_bytes": bytes.weights()},
            "args": {"context": args.context, "steps": args.steps, "streams": args.streams,
                     "streams_context": m.streams_context, "chunk": args.chunk, "kv_cache_dtype": args.kv_cache_dtype},
            "ceilings": {"read_gbps": m.read_gbps, "read_buffer_bytes": m.read_buffer_bytes,
                         "cublas": m.cublas.as_ref().map(|t| t.iter().map(|(s, secs)| json!({
                             "m": s.m, "k": s.k, "n": s.n, "seconds": secs, "tflops": s.flop() / secs / 1e12
                         })).collect::<Vec<_>>()).map_err(Clone::clone).map_or_else(|e| json!({"error": e}), Value::from)},
            "load_seconds": m.load_seconds,
            "ab": m.ab.iter().map(|r| json!({"switch": r.switch.name(), "rounds": r.rounds, "usual_s": r.usual,
                "old_way_s": r.apart, "saved_median_s": r.saved.0, "saved_min_s": r.saved.1,
                "saved_max_s": r.saved.2, "steps_usual_s": r.steps.0, "steps_old_way_s": r.steps.1}))
                .collect::<Vec<_>>(),
            "decode": {"median_s": m.decode.median, "mean_s": m.decode.mean, "min_s": m.decode.min,
                       "max_s": m.decode.max, "steps": m.decode.n, "tokens_per_s": 1.0 / m.decode.median,
                       "host_queued_median_s": m.decode_issued.median, "after_queued_median_s": m.decode_after.median,
                       "graph_replays": m.graph_replays,
                       "launches_median_s": m.decode_launches.as_ref().map(|t| t.0.median),
                       "launches_host_queued_median_s": m.decode_launches.as_ref().map(|t| t.1.median),
                       "bytes": b1, "floor_s": floor1, "fraction_of_floor": eff},
            "streams": streams.as_ref().map(|(t, bb, fb)| json!({
                "streams": args.streams, "median_s": t.median, "mean_s": t.mean,
                "tokens_per_s": args.streams as f64 / t.median, "bytes": bb, "floor_s": fb,
                "fraction_of_floor": fb / t.median, "prefill_s": m.streams_prefill_seconds})),
            "prefill": {"tokens": args.context, "seconds": prefill_secs, "chunk_seconds": m.prefill_chunks,
                        "warmup_chunk_seconds": m.prefill_warmup,
                        "tokens_per_s": args.context as f64 / prefill_secs,
                        "floor_s": prefill_floor.map(|f| f.0), "flop": prefill_floor.map(|f| f.2),
                        "fraction_of_floor": prefill_floor.map(|f| f.0 / prefill_secs)},
            "blocks": m.blocks.as_ref().map(|b| json!({"layer": b.layer, "attention_s": b.attention,
                "moe": b.moe.iter().map(|(r, s)| json!({"rows": r, "seconds": s})).collect::<Vec<_>>()})),
            "profile": m.profile.as_ref().map(|p| serde_json::to_value(p).unwrap_or(Value::Null)),
            "prefill_profile": m.prefill_profile.as_ref().map(|p| serde_json::to_value(p).unwrap_or(Value::Null)),
            "streams_profile": m.streams_profile.as_ref().map(|p| serde_json::to_value(p).unwrap_or(Value::Null)),
            "ipc_round_trip_s": m.ipc.as_ref().map(|t| t.round_trip.median).ok(),
            "ipc_export_s": m.ipc.as_ref().map(|t| t.export.median).ok(),
            "ipc_import_s": m.ipc.as_ref().map(|t| t.import.median).ok(),
            "ipc_pipe_round_trip_s": m.ipc.as_ref().map(|t| t.pipe.median).ok(),
            "ipc_landed_s": m.ipc.as_ref().map(|t| t.landed.median).ok(),
            "ipc_devices": m.ipc.as_ref().map(|t| [m.ordinal, t.receiver]).ok(),
            "ipc_settled_round_trip_s": m.ipc.as_ref().map(|t| t.settled_round_trip.median).ok(),
            "ipc_settled_landed_s": m.ipc.as_ref().map(|t| t.settled_landed.median).ok(),
            "ipc_error": m.ipc.as_ref().err(),
            "projection": {"gpu": "RTX 3090", "gbps": args.target_gbps, "efficiency": eff,
                           "bytes_per_token": token_bytes, "hop_s": hop_s, "hops": HOPS,
                           "tokens_per_s": projected, "bandwidth_bound_tokens_per_s": bound,
                           "cycle_scaled_tokens_per_s": cycle_scaled.map(|c| c.0),
                           "sm_cycle_ratio": cycle_scaled.map(|c| c.1),
                           "tensor_flop_per_token": tensor_flop, "target_tflops": args.target_tflops,
                           "tensor_s_per_token": tensor_s,
                           "assumptions": assumptions},
        });
        Report { json, table }
    }

    pub fn json(&self) -> &Value {
        &self.json
    }

    pub fn table(&self) -> &str {
        &self.table
    }
}

/// Bytes one MoE block call of `rows` rows must read: router, shared expert, the expected distinct experts.
fn moe_bytes(l: &LayerBytes, top_k: usize, rows: usize) -> f64 {
    let only = LayerBytes { norms: 0, attention: 0, indexer: 0, dense_mlp: 0, ..l.clone() };
    only.decode_weights(top_k, rows)
}

fn gb(b: f64) -> String {
    format!("{:.2} GB", b / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tokens_tensor_work_counts_every_quantized_weight_and_the_attention() {
        // MODEL_SPEC's dims by hand: every layer multiplies 597.4M quantized weights (attention 201.1M with the
        // indexer's; a dense MLP of 18,432 or shared + 8 routed experts of 2,048: 396.4M), 61 layers; attention at
        // 4K over 2,048 selected keys of 512 + 64 dims (scores, then the 512-wide mix), the indexer's 64 × 128 over
        // all 4,096.
        let attention_w = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 16384 * 7168;
        let indexer_w = 1536 * 64 * 128 + 7168 * 128 + 7168 * 64;
        let mlp_w = 3 * 7168 * 18432;
        assert_eq!(mlp_w, 9 * 3 * 7168 * 2048);
        let per_layer = (attention_w + indexer_w + mlp_w) as f64;
        let attention =
            2.0 * 128.0 * (512.0 + 64.0) * 2048.0 + 2.0 * 128.0 * 512.0 * 2048.0 + 2.0 * 64.0 * 128.0 * 4096.0;
        let want = 61.0 * (20.0 * per_layer + attention);
        let got = real_token_tensor_flop(4096);
        assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
        // 768 GFLOP: 10.8 ms at a 3090's 71 TFLOP/s, against the 17.6 ms its 16.5 GB take at 936 GB/s.
        assert!((got / 1e9 - 767.8).abs() < 1.0, "{got}");
    }
}
