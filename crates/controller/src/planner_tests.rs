use super::*;

const GIB: u64 = 1 << 30;

fn gibf(x: f64) -> u64 {
    (x * GIB as f64) as u64
}

/// MODEL_SPEC §6: DeepSeek-V3.2-REAP-345B-W3A16 on the GPU (packed weights, bf16 latent cache + indexer key).
fn real_model() -> ModelCost {
    let mut layers = vec![LayerCost { weight_bytes: gibf(0.219) }; 3];
    layers.extend(vec![LayerCost { weight_bytes: gibf(2.158) }; 58]);
    ModelCost {
        embed_bytes: gibf(1.726),
        head_bytes: gibf(1.726),
        layers,
        kv_bytes_per_token_layer: (512 + 64 + 128) * 2,
    }
}

/// `n` RTX 3090s: 24 GiB each, the recipe's weight budget `gib_each`.
fn devices(n: usize, gib_each: f64) -> Vec<DeviceBudget> {
    (0..n)
        .map(|i| DeviceBudget { device: format!("cuda:{i}"), budget_bytes: gibf(gib_each), capacity_bytes: 24 * GIB })
        .collect()
}

fn check_plan(plan: &[StagePlan], layers: usize) {
    assert_eq!(plan.first().map(|p| p.layers.start), Some(0));
    assert_eq!(plan.last().map(|p| p.layers.end), Some(layers));
    for w in plan.windows(2) {
        assert_eq!(w[0].layers.end, w[1].layers.start);
    }
    for p in plan {
        assert!(!p.layers.is_empty());
        assert!(p.fits(), "{p:?}");
        assert_eq!(p.embed, p.rank == 0);
        assert_eq!(p.head, p.rank + 1 == plan.len());
    }
}

#[test]
fn the_real_model_fits_eight_3090s_at_18_gib_with_64k_context() {
    let cost = real_model();
    let devs = devices(8, 18.0);
    let input = PlanInput { cost: &cost, devices: &devs, context_tokens: 65536, workspace_bytes: gibf(0.5) };
    let plan = plan(&input).expect("fits");
    check_plan(&plan, 61);
    // 58 MoE layers over 8 devices: 7 or 8 each; the largest slice is within ~one layer of the average.
    let max = plan.iter().map(StagePlan::total_bytes).max().expect("stages");
    let avg = plan.iter().map(StagePlan::total_bytes).sum::<u64>() / 8;
    assert!(max - avg <= gibf(2.3), "max {} avg {}", gib(max), gib(avg));
    let kv: u64 = plan.iter().map(|p| p.kv_bytes).sum();
    assert!((kv as f64 / GIB as f64 - 5.24).abs() < 0.2 * 5.24 / 5.0 + 0.5, "KV for 64K = {}", gib(kv));
    eprintln!("{}", describe(&plan));
}

#[test]
fn the_real_model_does_not_fit_seven() {
    let cost = real_model();
    let devs = devices(7, 18.0);
    let input = PlanInput { cost: &cost, devices: &devs, context_tokens: 65536, workspace_bytes: gibf(0.5) };
    let err = plan(&input).expect_err("126 GiB is not enough");
    let msg = err.to_string();
    assert!(msg.contains("does not fit") && msg.contains("budgets give 126.00 GiB"), "{msg}");
}

#[test]
fn uneven_budgets_get_uneven_shares() {
    let cost = ModelCost {
        embed_bytes: 0,
        head_bytes: 0,
        layers: vec![LayerCost { weight_bytes: GIB }; 12],
        kv_bytes_per_token_layer: 0,
    };
    let devs = vec![
        DeviceBudget { device: "cuda:0".into(), budget_bytes: 9 * GIB, capacity_bytes: 9 * GIB },
        DeviceBudget { device: "cuda:1".into(), budget_bytes: 3 * GIB, capacity_bytes: 3 * GIB },
    ];
    let input = PlanInput { cost: &cost, devices: &devs, context_tokens: 0, workspace_bytes: 0 };
    let p = plan(&input).expect("fits");
    check_plan(&p, 12);
    assert_eq!(p[0].layers, 0..9);
    // Even budgets split evenly.
    let devs = devices(3, 10.0);
    let input = PlanInput { cost: &cost, devices: &devs, context_tokens: 0, workspace_bytes: 0 };
    let p = plan(&input).expect("fits");
    assert!(p.iter().all(|s| s.layers.len() == 4), "{p:?}");
}

#[test]
fn more_devices_than_layers_is_refused() {
    let cost = ModelCost {
        embed_bytes: 0,
        head_bytes: 0,
        layers: vec![LayerCost { weight_bytes: 1 }; 2],
        kv_bytes_per_token_layer: 0,
    };
    let devs = devices(3, 1.0);
    let input = PlanInput { cost: &cost, devices: &devs, context_tokens: 0, workspace_bytes: 0 };
    assert_eq!(plan(&input), Err(PlanError::MoreDevicesThanLayers { devices: 3, layers: 2 }));
}

#[test]
fn overrides_are_checked() {
    let cost = real_model();
    let devs = devices(8, 18.0);
    let input = PlanInput { cost: &cost, devices: &devs, context_tokens: 8192, workspace_bytes: gibf(0.5) };
    let ranges: Vec<Range<usize>> = vec![0..9, 9..17, 17..25, 25..33, 33..41, 41..49, 49..55, 55..61];
    check_plan(&plan_override(&input, &ranges).expect("valid override"), 61);
    let gap: Vec<Range<usize>> = vec![0..9, 10..17, 17..25, 25..33, 33..41, 41..49, 49..55, 55..61];
    assert!(plan_override(&input, &gap).expect_err("gap").to_string().contains("continue at layer 9"));
    let heavy: Vec<Range<usize>> = vec![0..2, 2..12, 12..20, 20..28, 28..36, 36..44, 44..52, 52..61];
    assert!(plan_override(&input, &heavy).expect_err("too big").to_string().contains("over its budget"));
    // The cache counts against the device's memory: 8 MoE layers fit the 18 GiB weight budget but not a
    // 163,840-token context in 24 GiB.
    let long = PlanInput { cost: &cost, devices: &devs, context_tokens: 163_840, workspace_bytes: gibf(0.5) };
    let eight: Vec<Range<usize>> = vec![0..4, 4..12, 12..19, 19..26, 26..33, 33..40, 40..47, 47..61];
    assert!(plan_override(&long, &eight).is_err());
}

#[test]
fn fixture_costs_from_headers() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/models/tiny-dsv32-w3a16");
    let cfg = ModelConfig::from_dir(&dir).expect("config");
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    let packed = model_cost(&cfg, &ckpt, Residency::Packed { kv_elem_bytes: 2 });
    let f32s = model_cost(&cfg, &ckpt, Residency::CpuF32);
    let total = |c: &ModelCost| c.embed_bytes + c.head_bytes + c.layers.iter().map(|l| l.weight_bytes).sum::<u64>();
    // Packed: the file's bytes plus each layer's bf16 copy of kv_b_proj (heads × (nope + v) × kv_lora × 2).
    let kv_b = (cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank * 2) as u64;
    assert_eq!(total(&packed), ckpt.total_bytes() + kv_b * cfg.num_hidden_layers as u64);
    // 3-bit weights widened to f32: roughly 32/3.15 × for the quantized bulk.
    let ratio = total(&f32s) as f64 / ckpt.total_bytes() as f64;
    assert!((6.0..11.0).contains(&ratio), "{ratio}");
    assert_eq!(packed.kv_bytes_per_token_layer, (128 + 32 + 64) * 2 + 12);
    assert_eq!(f32s.kv_bytes_per_token_layer, (128 + 32 + 64) * 4);
    let devs: Vec<DeviceBudget> =
        (0..3).map(|_| DeviceBudget { device: "cpu".into(), budget_bytes: 2 * GIB, capacity_bytes: 2 * GIB }).collect();
    let input = PlanInput { cost: &f32s, devices: &devs, context_tokens: 4096, workspace_bytes: 64 << 20 };
    let p = plan(&input).expect("the demo fits three CPU workers");
    check_plan(&p, 4);
}
