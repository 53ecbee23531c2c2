//! Random-weight DeepSeek V3.2 checkpoints at any dimensions, for benchmarks: the real model's dims
//! (MODEL_SPEC §1, §6) or tiny ones for tests. Names, dtypes, shapes and the GPTQ packing are those of the
//! AutoRound W3A16 checkpoint (§3, §4), so the normal loader reads them; only a chosen slice of the layers (and
//! optionally the embeddings and head) is written, as one worker would hold it.
//!
//! Values: `qweight` words are uniform random (every bit pattern is a valid set of 3-bit fields); `qzeros` hold
//! 3 in every field, the v1 convention for AutoRound's sym zero point 4 (§4.3); `scales` are `±s·(0.75..1.25)`
//! with `s = 1/√(5.5·in)`, so a unit-RMS input gives a unit-RMS output (the fields `q − 4` have mean −½ and
//! mean square 5.5) and activations stay finite through many layers. Norms are 1, routers and embeddings small
//! random values. Generation is parallel, in 48 MiB pieces written in place (`pwrite`), from a counter-based
//! PRNG, so the 17 GB of an 8-layer slice is disk-bound.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use pipemoe_quant::Dtype;
use serde_json::{Value, json};

use crate::checkpoint::INDEX_FILE;
use crate::synthetic::TensorSpec;
use crate::{Error, Result};

/// Bumped whenever the bytes written for a spec change, so cached directories are regenerated.
const GENERATOR_VERSION: u32 = 1;
/// Marker written last: a directory without it is incomplete.
const COMPLETE: &str = "GENERATED";
/// Bytes generated and written per work item (a multiple of 12, the qzeros pattern, and of every dtype size).
const PIECE: usize = 48 << 20;

/// Model dimensions (config.json field names in the comments).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dims {
    pub hidden: usize,           // hidden_size
    pub layers: usize,           // num_hidden_layers
    pub first_dense: usize,      // first_k_dense_replace
    pub intermediate: usize,     // intermediate_size
    pub moe_intermediate: usize, // moe_intermediate_size
    pub experts: usize,          // n_routed_experts
    pub top_k: usize,            // num_experts_per_tok
    pub n_group: usize,          // n_group
    pub topk_group: usize,       // topk_group
    pub q_lora: usize,           // q_lora_rank
    pub kv_lora: usize,          // kv_lora_rank
    pub nope: usize,             // qk_nope_head_dim
    pub rope: usize,             // qk_rope_head_dim
    pub v_head: usize,           // v_head_dim
    pub heads: usize,            // num_attention_heads
    pub vocab: usize,            // vocab_size
    pub index_heads: usize,      // index_n_heads
    pub index_dim: usize,        // index_head_dim
    pub index_topk: usize,       // index_topk
    pub max_positions: usize,    // max_position_embeddings
    pub bits: u32,
    pub group_size: usize,
}

impl Dims {
    /// DeepSeek-V3.2-REAP-345B-W3A16 (MODEL_SPEC §1.1, §1.2): 128 routed experts, n_group/topk_group as REAP
    /// leaves them (8/4), 3-bit g128.
    pub fn deepseek_v32_reap() -> Self {
        Self {
            hidden: 7168,
            layers: 61,
            first_dense: 3,
            intermediate: 18432,
            moe_intermediate: 2048,
            experts: 128,
            top_k: 8,
            n_group: 8,
            topk_group: 4,
            q_lora: 1536,
            kv_lora: 512,
            nope: 128,
            rope: 64,
            v_head: 128,
            heads: 128,
            vocab: 129_280,
            index_heads: 64,
            index_dim: 128,
            index_topk: 2048,
            max_positions: 163_840,
            bits: 3,
            group_size: 128,
        }
    }

    /// Small enough for the CPU reference in a unit test, with every structural feature of the real one
    /// (dense and MoE layers, grouped routing, DSA with top-k below the context, an unpackable 2-row linear).
    pub fn tiny() -> Self {
        Self {
            hidden: 128,
            layers: 4,
            first_dense: 1,
            intermediate: 192,
            moe_intermediate: 64,
            experts: 8,
            top_k: 2,
            n_group: 2,
            topk_group: 1,
            q_lora: 64,
            kv_lora: 64,
            nope: 32,
            rope: 32,
            v_head: 32,
            heads: 2,
            vocab: 256,
            index_heads: 2,
            index_dim: 64,
            index_topk: 16,
            max_positions: 4096,
            bits: 3,
            group_size: 64,
        }
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.first_dense
    }

    /// config.json: the real model's fields, with these dims.
    pub fn config_json(&self) -> Value {
        let mut c = json!({
            "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
            "hidden_size": self.hidden, "num_hidden_layers": self.layers, "first_k_dense_replace": self.first_dense,
            "intermediate_size": self.intermediate, "moe_intermediate_size": self.moe_intermediate,
            "n_routed_experts": self.experts, "n_shared_experts": 1, "num_experts_per_tok": self.top_k,
            "n_group": self.n_group, "topk_group": self.topk_group, "routed_scaling_factor": 2.5,
            "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": true,
            "q_lora_rank": self.q_lora, "kv_lora_rank": self.kv_lora,
            "qk_nope_head_dim": self.nope, "qk_rope_head_dim": self.rope, "v_head_dim": self.v_head,
            "num_attention_heads": self.heads, "num_key_value_heads": self.heads, "rope_theta": 10000.0,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
            "vocab_size": self.vocab, "rms_norm_eps": 1e-6, "max_position_embeddings": self.max_positions,
            "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": false, "num_nextn_predict_layers": 1,
        });
        let extra = json!({
            "index_n_heads": self.index_heads, "index_head_dim": self.index_dim, "index_topk": self.index_topk,
            "quantization_config": {"quant_method": "auto-round", "bits": self.bits, "group_size": self.group_size,
                                    "sym": true, "data_type": "int", "packing_format": "auto_round:auto_gptq",
                                    "autoround_version": "0.9.4"},
        });
        if let (Some(c), Value::Object(e)) = (c.as_object_mut(), extra) {
            c.extend(e);
        }
        c
    }
}

/// What to write: `dims`, the decoder layers `layers` of it, and the embeddings / final norm + lm_head.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RandomSpec {
    pub dims: Dims,
    pub layers: Range<usize>,
    pub embed: bool,
    pub head: bool,
    pub seed: u64,
}

impl RandomSpec {
    /// A name for the directory that changes with anything that changes the bytes (FNV-1a of the spec).
    pub fn dir_name(&self) -> String {
        let text = format!("{GENERATOR_VERSION} {self:?}");
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        format!("dsv32-random-l{}-{}-{h:016x}", self.layers.start, self.layers.end)
    }
}

/// How one tensor's bytes are made.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fill {
    /// Uniform random 32-bit words (qweight).
    Words,
    /// Every 3-bit field 3 (qzeros, v1 convention of zero point 4).
    Zeros3,
    /// f16 `±s·(0.75..1.25)`, `s = 1/√(5.5·in)` (scales).
    Scales { in_features: usize },
    /// Every value `v` (norm weights 1, LayerNorm bias 0).
    Const(f32),
    /// Uniform in `±amp` (routers, embeddings, unquantized linears).
    Uniform(f32),
}

struct Planned {
    spec: TensorSpec,
    fill: Fill,
}

fn push(out: &mut Vec<Planned>, name: String, dtype: Dtype, shape: &[usize], fill: Fill) {
    out.push(Planned { spec: TensorSpec { name, dtype, shape: shape.to_vec() }, fill });
}

/// A linear `[out, in]`: GPTQ parts when the format can pack it, else BF16 (as AutoRound leaves such a module).
fn linear(out: &mut Vec<Planned>, d: &Dims, prefix: String, n_out: usize, n_in: usize) {
    let packable = n_in.is_multiple_of(32) && n_out.is_multiple_of(32) && d.bits == 3;
    if packable {
        let groups = n_in.div_ceil(d.group_size);
        push(out, format!("{prefix}.qweight"), Dtype::I32, &[n_in * 3 / 32, n_out], Fill::Words);
        push(out, format!("{prefix}.qzeros"), Dtype::I32, &[groups, n_out * 3 / 32], Fill::Zeros3);
        push(out, format!("{prefix}.scales"), Dtype::F16, &[groups, n_out], Fill::Scales { in_features: n_in });
    } else {
        let amp = (3.0 / n_in as f32).sqrt();
        push(out, format!("{prefix}.weight"), Dtype::BF16, &[n_out, n_in], Fill::Uniform(amp));
    }
}

/// Every tensor of decoder layer `l` (MODEL_SPEC §3.1).
fn layer_tensors(out: &mut Vec<Planned>, d: &Dims, l: usize) {
    let (bf, h) = (Dtype::BF16, d.hidden);
    let p = format!("model.layers.{l}");
    push(out, format!("{p}.input_layernorm.weight"), bf, &[h], Fill::Const(1.0));
    push(out, format!("{p}.post_attention_layernorm.weight"), bf, &[h], Fill::Const(1.0));
    let a = format!("{p}.self_attn");
    linear(out, d, format!("{a}.q_a_proj"), d.q_lora, h);
    push(out, format!("{a}.q_a_layernorm.weight"), bf, &[d.q_lora], Fill::Const(1.0));
    linear(out, d, format!("{a}.q_b_proj"), d.heads * (d.nope + d.rope), d.q_lora);
    linear(out, d, format!("{a}.kv_a_proj_with_mqa"), d.kv_lora + d.rope, h);
    push(out, format!("{a}.kv_a_layernorm.weight"), bf, &[d.kv_lora], Fill::Const(1.0));
    linear(out, d, format!("{a}.kv_b_proj"), d.heads * (d.nope + d.v_head), d.kv_lora);
    linear(out, d, format!("{a}.o_proj"), h, d.heads * d.v_head);
    let i = format!("{a}.indexer");
    linear(out, d, format!("{i}.wq_b"), d.index_heads * d.index_dim, d.q_lora);
    linear(out, d, format!("{i}.wk"), d.index_dim, h);
    push(out, format!("{i}.k_norm.weight"), Dtype::F32, &[d.index_dim], Fill::Const(1.0));
    push(out, format!("{i}.k_norm.bias"), Dtype::F32, &[d.index_dim], Fill::Const(0.0));
    linear(out, d, format!("{i}.weights_proj"), d.index_heads, h);
    let m = format!("{p}.mlp");
    let mlp = |out: &mut Vec<Planned>, base: String, inter: usize| {
        linear(out, d, format!("{base}.gate_proj"), inter, h);
        linear(out, d, format!("{base}.up_proj"), inter, h);
        linear(out, d, format!("{base}.down_proj"), h, inter);
    };
    if d.is_moe_layer(l) {
        push(out, format!("{m}.gate.weight"), bf, &[d.experts, h], Fill::Uniform((3.0 / h as f32).sqrt()));
        push(out, format!("{m}.gate.e_score_correction_bias"), Dtype::F32, &[d.experts], Fill::Uniform(0.01));
        for e in 0..d.experts {
            mlp(out, format!("{m}.experts.{e}"), d.moe_intermediate);
        }
        mlp(out, format!("{m}.shared_experts"), d.moe_intermediate);
    } else {
        mlp(out, m, d.intermediate);
    }
}

/// The shards of `spec`: one per layer (`layer-NNN`), and `head` for the embeddings / final norm / lm_head.
fn plan(spec: &RandomSpec) -> Vec<(String, Vec<Planned>)> {
    let d = &spec.dims;
    let mut shards = Vec::new();
    let mut head = Vec::new();
    if spec.embed {
        push(&mut head, "model.embed_tokens.weight".into(), Dtype::BF16, &[d.vocab, d.hidden], Fill::Uniform(1.0));
    }
    if spec.head {
        push(&mut head, "model.norm.weight".into(), Dtype::BF16, &[d.hidden], Fill::Const(1.0));
        // AutoRound never quantizes lm_head (MODEL_SPEC §3.2).
        let amp = (3.0 / d.hidden as f32).sqrt();
        push(&mut head, "lm_head.weight".into(), Dtype::BF16, &[d.vocab, d.hidden], Fill::Uniform(amp));
    }
    for l in spec.layers.clone() {
        let mut t = Vec::new();
        layer_tensors(&mut t, d, l);
        shards.push((format!("layer-{l:03}.safetensors"), t));
    }
    if !head.is_empty() {
        shards.push(("head.safetensors".into(), head));
    }
    shards
}

/// Every tensor `spec` writes, in file order.
pub fn tensors(spec: &RandomSpec) -> Vec<TensorSpec> {
    plan(spec).into_iter().flat_map(|(_, t)| t.into_iter().map(|p| p.spec)).collect()
}

fn byte_len(t: &TensorSpec) -> usize {
    t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::I32 => "I32",
        Dtype::F16 => "F16",
        Dtype::BF16 => "BF16",
        _ => "F32",
    }
}

/// The safetensors header of one shard (8-byte length, JSON padded with spaces to a multiple of 8).
fn header(tensors: &[Planned]) -> Vec<u8> {
    let mut obj = serde_json::Map::new();
    obj.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut at = 0usize;
    for t in tensors {
        let end = at + byte_len(&t.spec);
        obj.insert(
            t.spec.name.clone(),
            json!({"dtype": dtype_name(t.spec.dtype), "shape": t.spec.shape, "data_offsets": [at, end]}),
        );
        at = end;
    }
    let mut text = Value::Object(obj).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out
}

/// splitmix64: a counter-based generator, so any piece of any tensor is made independently.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) from the top 24 bits.
fn unit(r: u64) -> f32 {
    (r >> 40) as f32 / (1u64 << 24) as f32
}

/// The three words of a 32-field, 3-bit block holding 3 in every field (MODEL_SPEC §4.2).
fn zeros3_words() -> [u32; 3] {
    let block: u128 = (0..32).fold(0, |b, k| b | (3u128 << (3 * k)));
    [block as u32, (block >> 32) as u32, (block >> 64) as u32]
}

/// Bytes `[start, start + out.len())` of a `dtype` tensor filled by `fill`; `key` seeds its random stream.
fn fill_piece(fill: Fill, dtype: Dtype, key: u64, start: usize, out: &mut [u8]) {
    match fill {
        Fill::Words => {
            for (i, c) in out.chunks_exact_mut(8).enumerate() {
                c.copy_from_slice(&mix(key ^ ((start / 8 + i) as u64)).to_le_bytes());
            }
            let tail = out.len() / 8 * 8;
            let r = mix(key ^ ((start + tail) as u64 / 8)).to_le_bytes();
            let rest = out.len() - tail;
            out[tail..].copy_from_slice(&r[..rest]);
        }
        Fill::Zeros3 => {
            let w = zeros3_words();
            for (i, c) in out.chunks_exact_mut(4).enumerate() {
                c.copy_from_slice(&w[(start / 4 + i) % 3].to_le_bytes());
            }
        }
        Fill::Scales { in_features } => {
            let s = 1.0 / (5.5 * in_features as f32).sqrt();
            for (i, c) in out.chunks_exact_mut(2).enumerate() {
                let r = mix(key ^ ((start / 2 + i) as u64));
                let sign = if r & 1 == 0 { 1.0 } else { -1.0 };
                let v = half::f16::from_f32(sign * s * (0.75 + 0.5 * unit(r)));
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        Fill::Const(v) | Fill::Uniform(v) => {
            let random = matches!(fill, Fill::Uniform(_));
            let value = |idx: usize| {
                if random { v * (2.0 * unit(mix(key ^ idx as u64)) - 1.0) } else { v }
            };
            // These fills go to BF16 and F32 tensors only.
            let size = dtype.bitsize() / 8;
            for (i, c) in out.chunks_exact_mut(size).enumerate() {
                let x = value(start / size + i);
                if dtype == Dtype::F32 {
                    c.copy_from_slice(&x.to_le_bytes());
                } else {
                    c.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes());
                }
            }
        }
    }
}

/// The random stream of tensor `name`.
fn tensor_key(seed: u64, name: &str) -> u64 {
    name.bytes().fold(mix(seed), |h, b| mix(h ^ u64::from(b)))
}

/// Writes `spec` into `dir` (created if needed): config.json, one shard per layer (plus `head`), the index.
pub fn write(dir: &Path, spec: &RandomSpec) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&spec.dims.config_json())
        .map_err(|source| Error::Json { file: cfg_path.clone(), source })?;
    std::fs::write(&cfg_path, text).map_err(io(&cfg_path))?;

    let shards = plan(spec);
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    // (file, tensor index within the shard's list, byte offset in the file, piece start, piece length)
    let mut files = Vec::new();
    let mut work = Vec::new();
    for (k, (name, tensors)) in shards.iter().enumerate() {
        let path = dir.join(name);
        let head = header(tensors);
        let data_len: usize = tensors.iter().map(|t| byte_len(&t.spec)).sum();
        let file = File::create(&path).map_err(io(&path))?;
        file.set_len((head.len() + data_len) as u64).map_err(io(&path))?;
        file.write_all_at(&head, 0).map_err(io(&path))?;
        let mut at = head.len();
        for (i, t) in tensors.iter().enumerate() {
            let len = byte_len(&t.spec);
            for s in (0..len).step_by(PIECE) {
                work.push((k, i, at + s, s, PIECE.min(len - s)));
            }
            at += len;
            weight_map.insert(t.spec.name.clone(), name.clone());
        }
        total += data_len;
        files.push((path, file));
    }
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut buf = vec![0u8; PIECE];
                    loop {
                        let w = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(k, i, offset, start, len)) = work.get(w) else { return Ok(()) };
                        let t = &shards[k].1[i];
                        let key = tensor_key(spec.seed, &t.spec.name);
                        fill_piece(t.fill, t.spec.dtype, key, start, &mut buf[..len]);
                        let (path, file) = &files[k];
                        file.write_all_at(&buf[..len], offset as u64).map_err(io(path))?;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::backend("a generator thread panicked"))))
            .collect()
    });
    results.into_iter().collect::<Result<Vec<()>>>()?;
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let path = dir.join(INDEX_FILE);
    std::fs::write(&path, index.to_string()).map_err(io(&path))?;
    Ok(())
}

/// The checkpoint for `spec` under `root`, generated unless a complete copy is there already. Returns its
/// directory and whether it was generated now.
pub fn cached(root: &Path, spec: &RandomSpec) -> Result<(PathBuf, bool)> {
    let dir = root.join(spec.dir_name());
    let marker = dir.join(COMPLETE);
    let described = format!("{spec:?}\n");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == described) {
        return Ok((dir, false));
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
    }
    write(&dir, spec)?;
    std::fs::write(&marker, described).map_err(|source| Error::Io { path: marker.clone(), source })?;
    Ok((dir, true))
}

#[cfg(test)]
#[path = "random_checkpoint_tests.rs"]
mod tests;
