//! Device tests of the block-paged latent cache, tiled MLA attention and the indexer's device top-k, against the
//! CPU backend on fresh random inputs, at small shapes and at the real model's (128 heads, kv_lora 512, qk_rope
//! 64, qk_nope 128, v_head 128; indexer 64 heads × 128, top 2048). Skipped, with the reason printed, where there
//! is no GPU.
//!
//! Tolerances. The CPU reference is handed exactly the values the GPU computes with: the cache contents read
//! back from the pool (so a bf16 or fp8 cache is compared on its own stored values) and q / kv_b rounded to the
//! activation dtype. What is left is f32 summation order and the fast-math `__expf`: with f32 activations that
//! is ~1e-6, asserted ≤ 1e-4 (any indexing, masking or merge error is ≥ 1e-2). With bf16 activations the GPU
//! also rounds its output to bf16 (2^-9 relative at most, ~1.1e-3 RMS), asserted ≤ 5e-3 with the exact flash
//! kernel (q and P as value + remainder, `Apart::ExactFlash`). The default bf16 flash kernel also rounds q and P
//! to bf16, as HF's own attention does: two more roundings of ~1.1e-3 RMS each on the scores' and the weights'
//! terms, ~2e-3 on the output together, asserted ≤ 7.5e-3 (an indexing error is still ≥ 1e-2). The top-k must agree
//! exactly: its inputs are identical (the top-k test) or integer-valued so every score is exact in f32 (the
//! indexer test). `rel_l2` fails on NaN.

mod common;

use common::cache::*;
use common::*;
use half::bf16;
use pipemoe_cuda::cache::{BLOCK, KvDtype};
use pipemoe_cuda::gpu::Apart;
use pipemoe_cuda::indexer::top_k_rows;
use pipemoe_cuda::{ActDtype, CudaBackend, GpuSelection};
use pipemoe_model::backend::{Backend, HostLinear, IndexQuery, IndexerDims, MlaDims, MlaPrep, MlaPrepped, Row};
use pipemoe_model::cpu::CpuBackend;
use pipemoe_model::cpu::kernels::top_k;

const REAL: MlaDims =
    MlaDims { heads: 128, qk_nope: 128, qk_rope: 64, v_head: 128, kv_lora: 512, softmax_scale: 0.1352 };
/// 12 heads: one full group of 8 and a partial one; kv_lora below the kernel's 512.
const SMALL: MlaDims = MlaDims { heads: 12, qk_nope: 16, qk_rope: 8, v_head: 16, kv_lora: 64, softmax_scale: 0.2 };
/// Dims no DeepSeek config has, for the kernels' general paths: kv_lora + rope = 60 (bf16 tiles padded to 64,
/// rope not a multiple of 8 so they load through the converting path), kv_lora not a multiple of 64 (mla_out's
/// scalar loop), v_head not a multiple of mla_out's 32 columns.
const ODD: MlaDims = MlaDims { heads: 5, qk_nope: 8, qk_rope: 20, v_head: 20, kv_lora: 40, softmax_scale: 0.3 };

fn gpu(act: ActDtype, kv: KvDtype) -> CudaBackend {
    CudaBackend::new(0).expect("gpu").with_act_dtype(act).with_kv_dtype(kv)
}

/// Values as the activation dtype holds them.
fn as_act(act: ActDtype, v: Vec<f32>) -> Vec<f32> {
    match act {
        ActDtype::F32 => v,
        ActDtype::Bf16 => v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect(),
    }
}

fn rows_of(seq: u64, range: std::ops::Range<usize>) -> Vec<Row> {
    range.map(|pos| Row { seq, pos }).collect()
}

#[test]
fn paged_cache_round_trips_across_blocks_and_sequences() {
    if no_gpu() {
        return;
    }
    let ix = IndexerDims { heads: 2, head_dim: 32, topk: 16 };
    for kv in [KvDtype::F32, KvDtype::Bf16, KvDtype::Fp8] {
        let g = gpu(ActDtype::F32, kv);
        let mut cache = g.new_layer_cache(&SMALL, Some(&ix));
        let mut rng = Rng::new(3);
        let mut log = std::collections::HashMap::new();
        // Chunks that start and end inside blocks, sequences mixed in one step, and (no budget) past the first
        // 16 blocks so the pool grows and moves what it holds.
        let (mut a, mut b) = (0, 0);
        for (na, nb) in [(37, 1), (64, 0), (1, 70), (90, 1), (1000, 3), (8, 200)] {
            let mut rows = rows_of(1, a..a + na);
            rows.extend(rows_of(2, b..b + nb));
            write_rows(&g, &mut cache, &mut rng, &rows, &mut log).expect("write");
            (a, b) = (a + na, b + nb);
        }
        assert!(cache.positions_capacity() >= a + b && cache.positions_capacity().is_multiple_of(BLOCK));
        assert_eq!(cache.positions_used(), a + b);
        check_seq(&g, &cache, 1, &log[&1]);
        check_seq(&g, &cache, 2, &log[&2]);
        // A row that does not continue its sequence is refused before anything is written.
        let bad = [Row { seq: 2, pos: b }, Row { seq: 1, pos: a + 1 }];
        assert!(matches!(
            write_rows(&g, &mut cache, &mut rng, &bad, &mut std::collections::HashMap::new()),
            Err(pipemoe_model::Error::CachePosition { .. })
        ));
        assert_eq!(g.cache_len(&cache, 2), b);
        // Freed blocks go to the next sequence; the survivor is untouched.
        g.cache_free(&mut cache, 1);
        assert_eq!(cache.positions_used(), b);
        write_rows(&g, &mut cache, &mut rng, &rows_of(3, 0..130), &mut log).expect("write after free");
        check_seq(&g, &cache, 2, &log[&2]);
        check_seq(&g, &cache, 3, &log[&3]);
        eprintln!("round trip {kv:?}: {} positions, capacity {}", a + b + 130, cache.positions_capacity());
    }
}

#[test]
fn a_full_pool_refuses_the_step_and_free_makes_room() {
    if no_gpu() {
        return;
    }
    let ix = IndexerDims { heads: 2, head_dim: 32, topk: 16 };
    let kv = KvDtype::Bf16;
    let per_position = (SMALL.kv_lora + SMALL.qk_rope + ix.head_dim) * kv.bytes() + 3 * 4;
    // Two layers' worth, so each layer gets exactly 4 blocks.
    let g = gpu(ActDtype::F32, kv).with_cache_budget(2 * 4 * BLOCK * per_position + 100, 2);
    let mut cache = g.new_layer_cache(&SMALL, Some(&ix));
    assert_eq!(cache.positions_capacity(), 4 * BLOCK);
    let mut rng = Rng::new(5);
    let mut log = std::collections::HashMap::new();
    write_rows(&g, &mut cache, &mut rng, &rows_of(1, 0..200), &mut log).expect("fits");
    // Seq 1 still fits its 4th block, seq 2 needs a 5th: the whole step is refused.
    let mut rows = rows_of(1, 200..210);
    rows.extend(rows_of(2, 0..5));
    let err = write_rows(&g, &mut cache, &mut rng, &rows, &mut std::collections::HashMap::new()).expect_err("full");
    eprintln!("{err}");
    assert!(matches!(err, pipemoe_model::Error::CacheFull { capacity: 256, used: 256, needed: 64 }), "{err:?}");
    assert_eq!((g.cache_len(&cache, 1), g.cache_len(&cache, 2)), (200, 0));
    assert_eq!(cache.positions_used(), 200);
    check_seq(&g, &cache, 1, &log[&1]);
    write_rows(&g, &mut cache, &mut rng, &rows_of(1, 200..256), &mut log).expect("the last block fills");
    assert!(matches!(
        write_rows(&g, &mut cache, &mut rng, &rows_of(1, 256..257), &mut log),
        Err(pipemoe_model::Error::CacheFull { .. })
    ));
    g.cache_free(&mut cache, 1);
    assert_eq!(cache.positions_used(), 0);
    write_rows(&g, &mut cache, &mut rng, &rows_of(2, 0..256), &mut log).expect("room after free");
    check_seq(&g, &cache, 2, &log[&2]);
}

/// One attention comparison: sequences of `lens` (seq ids 0..), the step's `rows`, and optionally `selected`
/// random keys per row (V3.2) instead of every causal one.
struct Case {
    dims: MlaDims,
    lens: Vec<usize>,
    rows: Vec<Row>,
    selected: Option<usize>,
}

/// A random GPTQ kv_b_proj: (bits, group size, act-order, symmetric).
type KvbSpec = (u32, i64, bool, bool);
/// kv_b_proj as a random GPTQ weight instead of a dense one.
type Quantized = Option<KvbSpec>;

/// The relative L2 distance of the GPU's attention output from the CPU's on the same values.
fn attention_case(g: &CudaBackend, rng: &mut Rng, c: &Case, quantized: Quantized) -> f64 {
    let (d, cpu) = (c.dims, CpuBackend::F32);
    let (lora, rope, qk) = (d.kv_lora, d.qk_rope, d.qk_nope + d.qk_rope);
    let mut gc = g.new_layer_cache(&d, None);
    let mut cc = cpu.new_layer_cache(&d, None);
    for (seq, &len) in c.lens.iter().enumerate() {
        for start in (0..len).step_by(8192) {
            let rows = rows_of(seq as u64, start..len.min(start + 8192));
            let (lat, pe) = (uniform(rng, rows.len() * lora, 1.0), uniform(rng, rows.len() * rope, 1.0));
            let n = rows.len();
            g.cache_write(&mut gc, &rows, &g.upload(n, lora, lat).unwrap(), &g.upload(n, rope, pe).unwrap(), None)
                .expect("gpu cache write");
        }
        // The CPU attends over exactly what the GPU stored.
        let stored = gc.read(&g.gpu, seq as u64).expect("read back");
        let rows = rows_of(seq as u64, 0..len);
        let up = |v: Vec<f32>, cols| cpu.upload(len, cols, v).unwrap();
        cpu.cache_write(&mut cc, &rows, &up(stored.latent, lora), &up(stored.k_pe, rope), None).unwrap();
    }
    let n = c.rows.len();
    let q = as_act(g.act, uniform(rng, n * d.heads * qk, 1.0));
    let (wlen, w_out) = (d.heads * (d.qk_nope + d.v_head) * lora, d.heads * (d.qk_nope + d.v_head));
    let kv_b = as_act(g.act, uniform(rng, wlen, 0.5));
    let gptq = quantized
        .map(|(bits, group, act_order, sym)| weight_with_zeros(rng, (lora, w_out, bits, group, act_order), sym));
    let host_w = || match &gptq {
        Some(w) => HostLinear::Gptq(w.clone()),
        None => HostLinear::Dense { out_features: w_out, in_features: lora, data: kv_b.clone() },
    };
    let sel: Option<Vec<Vec<u32>>> = c.selected.map(|k| {
        c.rows
            .iter()
            .map(|r| {
                let mut keys: Vec<u32> = (0..=r.pos as u32).collect();
                for i in 0..k.min(keys.len()) {
                    let j = i + rng.below((keys.len() - i) as u64) as usize;
                    keys.swap(i, j);
                }
                keys.truncate(k);
                keys.sort_unstable();
                keys
            })
            .collect()
    });
    let want = cpu
        .mla_attention(
            &cc,
            &cpu.upload(n, d.heads * qk, q.clone()).unwrap(),
            &cpu.load_linear(host_w()).unwrap(),
            &d,
            &c.rows,
            sel.as_ref(),
        )
        .expect("cpu attention");
    let gsel = sel.as_ref().map(|s| GpuSelection::from_host(g, s).expect("selection"));
    let got = g
        .mla_attention(
            &gc,
            &g.upload(n, d.heads * qk, q).unwrap(),
            &g.load_linear(host_w()).unwrap(),
            &d,
            &c.rows,
            gsel.as_ref(),
        )
        .expect("gpu attention");
    assert_eq!(g.shape(&got), (n, d.heads * d.v_head));
    rel_l2(&g.download(&got).unwrap(), &want.data)
}

fn cases() -> Vec<(&'static str, Case)> {
    let r = |seq: u64, pos: usize| Row { seq, pos };
    vec![
        ("small, 1 key", Case { dims: SMALL, lens: vec![1], rows: vec![r(0, 0)], selected: None }),
        (
            "small, few keys and blocks",
            Case {
                dims: SMALL,
                lens: vec![5, 130],
                rows: vec![r(0, 2), r(0, 4), r(1, 63), r(1, 64), r(1, 129)],
                selected: None,
            },
        ),
        (
            "small, 100 selected of 300",
            Case { dims: SMALL, lens: vec![300], rows: vec![r(0, 250), r(0, 299)], selected: Some(100) },
        ),
        (
            "odd dims (kv_lora 40, rope 20), 70 keys",
            Case { dims: ODD, lens: vec![70], rows: vec![r(0, 3), r(0, 69)], selected: None },
        ),
        ("real, 1 key", Case { dims: REAL, lens: vec![1], rows: vec![r(0, 0)], selected: None }),
        // One row alone takes the single-row absorption kernels (`_r1`), here over every split.
        ("real, one row over 3000 keys", Case { dims: REAL, lens: vec![3000], rows: vec![r(0, 2999)], selected: None }),
        ("odd dims, one row", Case { dims: ODD, lens: vec![70], rows: vec![r(0, 69)], selected: None }),
        (
            "real, a few keys",
            Case { dims: REAL, lens: vec![3, 5], rows: vec![r(0, 0), r(0, 1), r(0, 2), r(1, 4)], selected: None },
        ),
        (
            "real, 12000 keys dense",
            Case {
                dims: REAL,
                lens: vec![12_000, 70],
                rows: vec![r(0, 11_998), r(0, 11_999), r(1, 69)],
                selected: None,
            },
        ),
        (
            "real, 2048 selected of 20500",
            Case { dims: REAL, lens: vec![20_500], rows: vec![r(0, 20_498), r(0, 20_499)], selected: Some(2048) },
        ),
    ]
}

#[test]
fn tiled_attention_matches_the_cpu_reference() {
    if no_gpu() {
        return;
    }
    let mut rng = Rng::new(17);
    let exact: &[Apart] = &[Apart::ExactFlash];
    for (act, kv, apart, tol) in [
        (ActDtype::F32, KvDtype::F32, &[][..], 1e-4),
        (ActDtype::F32, KvDtype::Fp8, &[], 1e-4),
        (ActDtype::Bf16, KvDtype::Bf16, exact, 5e-3),
        (ActDtype::Bf16, KvDtype::Bf16, &[], 7.5e-3),
        // An fp8 cache converted into the bf16 kernel's tiles (its plain-load path; with more than one row of
        // the real dims, the two-head-group kernel's): the same bound, the cache's values being the reference's.
        (ActDtype::Bf16, KvDtype::Fp8, &[], 7.5e-3),
    ] {
        let g = gpu(act, kv);
        g.gpu.set_apart(apart);
        for (name, case) in cases() {
            let err = attention_case(&g, &mut rng, &case, None);
            eprintln!("attention {name}, activations {act:?}, cache {kv:?}, {apart:?}: rel L2 {err:.2e}");
            assert!(err <= tol, "attention {name}, {act:?}/{kv:?}, {apart:?}: rel L2 {err:e} > {tol:e}");
        }
    }
}

/// The two-head-group flash kernel (`mla_flash_mma_fast_bf16_d576_g2`: DeepSeek's dims, 2+ rows, where an SM holds
/// its 160 KB — an H200, not a 3090, which runs the one-group kernel here) on a case small enough for
/// compute-sanitizer's racecheck (tools/device/run-tests.sh `racecheck`, with `PIPEMOE_FLASH_MAX_SPLITS=1`: each
/// block then takes a whole row, 22 tiles, three runs of slots and the ring's turns): its barriers per head group
/// and the block's where the key tiles change hands. A bf16 cache (the tiles by `cp.async`) and an fp8 one (by
/// plain loads and stores), at tiled_attention's bound.
#[test]
fn two_head_group_flash_matches_the_cpu_reference() {
    if no_gpu() {
        return;
    }
    let mut rng = Rng::new(23);
    let r = |seq: u64, pos: usize| Row { seq, pos };
    let case = Case { dims: REAL, lens: vec![700, 40], rows: vec![r(0, 698), r(0, 699), r(1, 39)], selected: None };
    for kv in [KvDtype::Bf16, KvDtype::Fp8] {
        let g = gpu(ActDtype::Bf16, kv);
        let err = attention_case(&g, &mut rng, &case, None);
        eprintln!("two head groups, cache {kv:?}: rel L2 {err:.2e}");
        assert!(err <= 7.5e-3, "two head groups, cache {kv:?}: rel L2 {err:e} > 7.5e-3");
    }
}

/// A GPTQ kv_b_proj in the tensor-core layout: steps of up to `Gpu::kvb_quant_rows` rows (default 4) read it
/// quantized (mla_q.cu), the rest (and `Apart::DenseKvb`) from its bf16 copy; here up to 64, so that blocks of
/// rows beyond the first (and a partial one) are covered too. Both against the CPU on the exactly dequantized weight, at the
/// bf16 bound above: the quantized kernels' products are as exact as f32 ones (values and remainders), the copy's
/// weights are rounded to bf16 (2^-9 relative each, ~1e-3 on the output). A block of 4 rows, a partial one,
/// act-order (the latent gathered and scattered through the row order), groups of 128 and 256, 2/3/4 bits. The
/// flash kernel between is the default one (bf16 q and P).
#[test]
fn quantized_kv_b_matches_the_cpu_reference() {
    if no_gpu() {
        return;
    }
    // The smallest shape the quantized kernels take: nope 32 (two tiles a B load), v 16 (one tile: three of the
    // four warps idle), one chunk of lora; 6 heads so that the GPTQ columns (288) pack whole words.
    let qsmall = MlaDims { heads: 6, qk_nope: 32, qk_rope: 16, v_head: 16, kv_lora: 128, softmax_scale: 0.2 };
    let r = |seq: u64, pos: usize| Row { seq, pos };
    let case = |dims, lens: Vec<usize>, rows: Vec<Row>, selected| Case { dims, lens, rows, selected };
    let step = |n: usize| (0..n).map(|i| r(0, 2999 - i)).collect::<Vec<_>>();
    // (bits, group, act-order, symmetric: every zero 2^(bits−1), which the tensor-core kernels do not read).
    let cases: Vec<(&str, Case, KvbSpec)> = vec![
        ("small, 1 row", case(qsmall, vec![40], vec![r(0, 39)], None), (3, 128, false, false)),
        (
            "small, 5 rows act-order",
            case(qsmall, vec![40, 9], vec![r(0, 3), r(0, 39), r(1, 0), r(1, 4), r(1, 8)], None),
            (3, 128, true, false),
        ),
        ("real, 1 row over 3000 keys", case(REAL, vec![3000], step(1), None), (3, 128, false, false)),
        ("real, 1 row, symmetric", case(REAL, vec![3000], step(1), None), (3, 128, false, true)),
        ("real, 2048 selected, act-order", case(REAL, vec![3000], step(2), Some(2048)), (3, 128, true, false)),
        ("real, 6 rows, groups of 256", case(REAL, vec![3000], step(6), None), (3, 256, false, false)),
        ("real, 1 row, 2 bits", case(REAL, vec![300], vec![r(0, 299)], None), (2, 128, false, false)),
        (
            "real, 3 rows, 4 bits",
            case(REAL, vec![300], step(3).into_iter().map(|x| r(0, x.pos - 2700)).collect(), None),
            (4, 128, false, false),
        ),
        ("real, 70 rows (the dense copy)", case(REAL, vec![3000], step(70), None), (3, 128, false, false)),
        ("real, 70 rows, symmetric", case(REAL, vec![3000], step(70), None), (3, 128, false, true)),
    ];
    let g = gpu(ActDtype::Bf16, KvDtype::Bf16);
    g.gpu.set_kvb_quant_rows(64);
    let mut rng = Rng::new(23);
    for apart in [&[][..], &[Apart::DenseKvb][..]] {
        g.gpu.set_apart(apart);
        for (name, c, q) in &cases {
            let err = attention_case(&g, &mut rng, c, Some(*q));
            eprintln!("quantized kv_b {q:?}, {name}, apart {apart:?}: rel L2 {err:.2e}");
            // The default flash kernel's bf16 q and P: the bound of the test above.
            assert!(err <= 7.5e-3, "quantized kv_b {q:?}, {name}, apart {apart:?}: rel L2 {err:e}");
        }
    }
    g.gpu.set_apart(&[]);
}

#[test]
fn device_top_k_picks_the_cpu_set() {
    if no_gpu() {
        return;
    }
    let g = gpu(ActDtype::F32, KvDtype::F32);
    let mut rng = Rng::new(23);
    let mut specials: Vec<f32> = (0..3000).map(|i| [0.0, -0.0, -1.0, 1.0, 2.5, -2.5][i % 6]).collect();
    specials[17] = f32::INFINITY;
    specials[18] = f32::NEG_INFINITY;
    specials[19] = f32::NAN;
    let rows: Vec<Vec<f32>> = vec![
        uniform(&mut rng, 5, 1.0),
        // Within one warp's window (256 keys) from the start.
        uniform(&mut rng, 200, 1.0),
        vec![1.0; 8],
        vec![0.5; 2049],
        uniform(&mut rng, 2049, 1.0),
        // One tile of the kernel (8,192 keys, held in registers), one key past it, and the 4K row of the bench.
        uniform(&mut rng, 4096, 1.0),
        uniform(&mut rng, 8192, 3.0),
        // One tile by bisection: few distinct keys (ties across the cut), and keys apart only in their last bits.
        (0..5000).map(|i| (i % 3) as f32).collect(),
        (0..4096).map(|i| 1.0 + (i * 7 % 13) as f32 * f32::EPSILON).collect(),
        (0..8193).map(|i| (i % 97) as f32 * 0.25).collect(),
        // Rows past one tile, which take the multi-block histogram and gather (kernels/topk.cu): spread keys, a few
        // distinct ones (ties in the chosen bin), and only -0.0 at the top.
        uniform(&mut rng, 20_000, 10.0),
        (0..65_536).map(|_| rng.below(100) as f32).collect(),
        (0..40_000).map(|_| -(rng.below(7) as f32)).collect(),
        // The gather's edges: bins at and above the top 2,048's holding exactly those keys (copied as they are),
        // and a row whose keys differ only in their last bits, so one bin holds more than a tile (the whole row
        // goes to the one-block select).
        (0..10_000).map(|i| if i < 2048 { 1000.0 + i as f32 } else { 1.0 }).collect(),
        (0..30_000).map(|i| 3.0 + (i * 7 % 11) as f32 * 3.0 * f32::EPSILON).collect(),
        specials,
    ];
    for topk in [1, 7, 2048] {
        let got = top_k_rows(&g, &rows, topk).expect("device top-k");
        for (r, (got, scores)) in got.iter().zip(&rows).enumerate() {
            let mut want = top_k(scores, topk);
            want.sort_unstable();
            assert_eq!(got, &want, "row {r} ({} scores), top {topk}", scores.len());
        }
    }
}

#[test]
fn indexer_select_matches_the_cpu_backend_and_feeds_attention() {
    if no_gpu() {
        return;
    }
    let d = SMALL;
    let cpu = CpuBackend::F32;
    // The real indexer (64 heads of 128: the tensor-core kernel's full 4 head tiles for bf16), then 20 heads of 48
    // (heads padded to 32, 3 k-steps).
    let big = IndexerDims { heads: 64, head_dim: 128, topk: 2048 };
    let odd = IndexerDims { heads: 20, head_dim: 48, topk: 64 };
    for (ix, act, kv) in
        [(big, ActDtype::F32, KvDtype::F32), (big, ActDtype::Bf16, KvDtype::Bf16), (odd, ActDtype::Bf16, KvDtype::Bf16)]
    {
        let g = gpu(act, kv);
        let mut rng = Rng::new(29);
        let (mut gc, mut cc) = (g.new_layer_cache(&d, Some(&ix)), cpu.new_layer_cache(&d, Some(&ix)));
        // Small integers: exact in bf16 and every score exact in f32, so the two sets must be equal, ties and
        // all. Positive weights keep zero scores +0 on both sides.
        let ints = |rng: &mut Rng, n: usize, lo: i64, hi: i64| -> Vec<f32> {
            (0..n).map(|_| (lo + rng.below((hi - lo + 1) as u64) as i64) as f32).collect()
        };
        for (seq, len) in [(0u64, 65_536usize), (1, 300)] {
            let rows = rows_of(seq, 0..len);
            let (lat, pe, k) = (
                uniform(&mut rng, len * d.kv_lora, 1.0),
                uniform(&mut rng, len * d.qk_rope, 1.0),
                ints(&mut rng, len * ix.head_dim, -2, 2),
            );
            g.cache_write(
                &mut gc,
                &rows,
                &g.upload(len, d.kv_lora, lat).unwrap(),
                &g.upload(len, d.qk_rope, pe).unwrap(),
                Some(&g.upload(len, ix.head_dim, k.clone()).unwrap()),
            )
            .expect("gpu write");
            let stored = gc.read(&g.gpu, seq).expect("read back");
            cpu.cache_write(
                &mut cc,
                &rows,
                &cpu.upload(len, d.kv_lora, stored.latent).unwrap(),
                &cpu.upload(len, d.qk_rope, stored.k_pe).unwrap(),
                Some(&cpu.upload(len, ix.head_dim, k).unwrap()),
            )
            .unwrap();
        }
        let step = vec![
            Row { seq: 0, pos: 65_535 },
            Row { seq: 0, pos: 40_000 },
            Row { seq: 1, pos: 299 },
            Row { seq: 0, pos: 2048 },
            Row { seq: 0, pos: 2047 },
        ];
        let n = step.len();
        let q = ints(&mut rng, n * ix.heads * ix.head_dim, -2, 2);
        let w = ints(&mut rng, n * ix.heads, 1, 3);
        let cols = ix.heads * ix.head_dim;
        let want = cpu
            .indexer_select(
                &cc,
                &cpu.upload(n, cols, q.clone()).unwrap(),
                &cpu.upload(n, ix.heads, w.clone()).unwrap(),
                &ix,
                &step,
            )
            .expect("cpu select");
        let (q_host, w_host) = (q.clone(), w.clone());
        let gsel = g
            .indexer_select(&gc, &g.upload(n, cols, q).unwrap(), &g.upload(n, ix.heads, w).unwrap(), &ix, &step)
            .expect("gpu select");
        let got = g.selection_to_host(&gsel).expect("download");
        for (r, (got, want)) in got.iter().zip(&want).enumerate() {
            assert_eq!(got.len(), want.len(), "{act:?} {ix:?}: row {r} count");
            assert_eq!(got, want, "{act:?} {ix:?}: row {r} ({:?}) selection", step[r]);
        }
        // Attention over the device selection equals the CPU's over its own.
        let qk = d.qk_nope + d.qk_rope;
        let qa = as_act(act, uniform(&mut rng, n * d.heads * qk, 1.0));
        let kv_b = as_act(act, uniform(&mut rng, d.heads * (d.qk_nope + d.v_head) * d.kv_lora, 0.5));
        let host_w = || HostLinear::Dense {
            out_features: d.heads * (d.qk_nope + d.v_head),
            in_features: d.kv_lora,
            data: kv_b.clone(),
        };
        let cpu_out = cpu
            .mla_attention(
                &cc,
                &cpu.upload(n, d.heads * qk, qa.clone()).unwrap(),
                &cpu.load_linear(host_w()).unwrap(),
                &d,
                &step,
                Some(&want),
            )
            .expect("cpu attention");
        let (gq, gkv) = (g.upload(n, d.heads * qk, qa).unwrap(), g.load_linear(host_w()).unwrap());
        let gpu_out = g.mla_attention(&gc, &gq, &gkv, &d, &step, Some(&gsel)).expect("gpu attention");
        let err = rel_l2(&g.download(&gpu_out).unwrap(), &cpu_out.data);
        // The selection made on a branch of the step beside the query's absorption (mla_attention_indexed): the
        // same launches on the same inputs, so the same bits.
        let (iq, iw) = (g.upload(n, cols, q_host.clone()).unwrap(), g.upload(n, ix.heads, w_host.clone()).unwrap());
        let index = IndexQuery { q: &iq, w: &iw, dims: &ix };
        let joined = g.mla_attention_indexed(&gc, &gq, &gkv, &d, &step, index).expect("gpu indexed attention");
        let (a, b) = (g.download(&gpu_out).unwrap(), g.download(&joined).unwrap());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{act:?} {ix:?}: indexed attention differs");
        // bf16: the default flash kernel's bound (the tiled test's module note).
        let tol = if act == ActDtype::F32 { 1e-4 } else { 7.5e-3 };
        let (heads, dim) = (ix.heads, ix.head_dim);
        eprintln!(
            "indexer {act:?}/{kv:?}, {heads} heads × {dim}: selections equal; attention over them rel L2 {err:.2e}"
        );
        assert!(err <= tol, "attention over the selection, {act:?}: {err:e}");
    }
}

/// `mla_prep_write` (one launch: the prep and the cache write) leaves what `mla_prep` then `cache_write` leave:
/// the same parts, and the same cached bytes and scales for every dtype — the fused kernel's store is
/// cache_store's, reading back the very values the prep wrote.
#[test]
fn mla_prep_write_stores_what_cache_write_stores() {
    if no_gpu() {
        return;
    }
    let (d, ix) = (SMALL, IndexerDims { heads: 16, head_dim: 32, topk: 8 });
    let (q_a, lora, rope, idx, iw) = (24usize, d.kv_lora, d.qk_rope, ix.head_dim, ix.heads);
    let total = q_a + lora + rope + idx + iw;
    let inv_freq: Vec<f32> = (0..rope / 2).map(|i| 10000f32.powf(-2.0 * i as f32 / rope as f32)).collect();
    for (act, kv) in [(ActDtype::F32, KvDtype::F32), (ActDtype::Bf16, KvDtype::Bf16), (ActDtype::Bf16, KvDtype::Fp8)] {
        let g = gpu(act, kv);
        let mut rng = Rng::new(37);
        let [qn, kvn, kw, kb] = [q_a, lora, idx, idx].map(|n| g.load_vector(uniform(&mut rng, n, 1.0)).unwrap());
        let p = MlaPrep {
            q_a: Some((q_a, &qn)),
            latent: (lora, &kvn),
            rope,
            index_key: Some((idx, &kw, &kb)),
            index_weights: Some((iw, 0.25)),
            eps: 1e-6,
        };
        let (mut apart, mut fused) = (g.new_layer_cache(&d, Some(&ix)), g.new_layer_cache(&d, Some(&ix)));
        for (seq, range) in [(0u64, 0..5usize), (1, 0..3), (0, 5..6)] {
            let rows = rows_of(seq, range);
            let proj = g.upload(rows.len(), total, uniform(&mut rng, rows.len() * total, 2.0)).unwrap();
            let a = g.mla_prep(&proj, &p, &inv_freq, &rows).expect("prep");
            g.cache_write(&mut apart, &rows, &a.latent, &a.k_pe, a.index_key.as_ref()).expect("write");
            let f = g.mla_prep_write(&proj, &p, &inv_freq, &rows, &mut fused).expect("prep and write");
            let parts = |m: &MlaPrepped<<CudaBackend as Backend>::Tensor>| {
                let dl = |t: &<CudaBackend as Backend>::Tensor| g.download(t).unwrap();
                [m.q_a.as_ref().map(dl), Some(dl(&m.latent)), Some(dl(&m.k_pe)), m.index_key.as_ref().map(dl)]
                    .into_iter()
                    .chain([m.index_weights.as_ref().map(dl)])
                    .collect::<Vec<_>>()
            };
            assert_eq!(parts(&f), parts(&a), "{act:?}/{kv:?}: the prepared parts");
        }
        for seq in [0u64, 1] {
            let (a, f) = (apart.read(&g.gpu, seq).unwrap(), fused.read(&g.gpu, seq).unwrap());
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (what, x, y) in
                [("latent", &a.latent, &f.latent), ("k_pe", &a.k_pe, &f.k_pe), ("key", &a.index_k, &f.index_k)]
            {
                assert!(!x.is_empty(), "{act:?}/{kv:?}: sequence {seq} has no {what}");
                assert_eq!(bits(y), bits(x), "{act:?}/{kv:?}: sequence {seq}'s cached {what}");
            }
        }
    }
}
