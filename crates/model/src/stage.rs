//! A stage: the contiguous slice of the model one worker runs (ARCHITECTURE.md "Placement"). The first stage
//! embeds token ids, every stage runs its layers over the residual stream, the last applies the final norm and
//! `lm_head`. One stage holding everything is the whole model.

use std::collections::HashMap;
use std::path::Path;

use crate::backend::{Backend, Row, SeqId};
use crate::layer::Layer;
use crate::rope;
use crate::sampling::{SampleRow, SampledToken};
use crate::weights::{Loader, SliceSpec};
use crate::{Checkpoint, Error, ModelConfig, Result};

/// What a stage consumes: token ids (first stage) or the previous stage's residual stream `[rows, hidden]`.
pub enum StageInput<'a, B: Backend> {
    Tokens(&'a [u32]),
    Hidden(B::Tensor),
}

pub struct Stage<B: Backend> {
    backend: B,
    cfg: ModelConfig,
    slice: SliceSpec,
    embed: Option<B::Weight>,
    layers: Vec<Layer<B>>,
    caches: Vec<B::LayerCache>,
    head: Option<(B::Vector, B::Weight)>,
    inv_freq: Vec<f32>,
}

impl<B: Backend> Stage<B> {
    /// Opens the checkpoint in `dir` and loads `slice` of it.
    pub fn open(backend: B, dir: &Path, slice: SliceSpec) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        Self::load(backend, &cfg, &ckpt, slice)
    }

    pub fn load(backend: B, cfg: &ModelConfig, ckpt: &Checkpoint, slice: SliceSpec) -> Result<Self> {
        slice.check(cfg)?;
        let ld = Loader { cfg, ckpt };
        let b = &backend;
        let h = cfg.hidden_size;
        let dense = |name: &str, rows: usize| -> Result<B::Weight> {
            let data = ld.floats(name, &[rows, h])?;
            b.load_linear(crate::backend::HostLinear::Dense { out_features: rows, in_features: h, data })
        };
        let embed = slice.embed.then(|| dense("model.embed_tokens.weight", cfg.vocab_size)).transpose()?;
        let mut layers = Vec::new();
        let mut caches = Vec::new();
        for l in slice.layers.clone() {
            // MODEL_SPEC §1.2: DSA exactly when the checkpoint has the layer's indexer tensors.
            let wk = format!("model.layers.{l}.self_attn.indexer.wk");
            let with_indexer = cfg.indexer.is_some()
                && (ckpt.contains(&format!("{wk}.qweight")) || ckpt.contains(&format!("{wk}.weight")));
            let layer = Layer::load(b, &ld, l, &slice, with_indexer)?;
            caches.push(b.new_layer_cache(&layer.attn.dims, layer.attn.indexer.as_ref().map(|i| &i.dims)));
            layers.push(layer);
        }
        let head = if slice.head {
            let norm = b.load_vector(ld.floats("model.norm.weight", &[h])?)?;
            let name = if cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
            Some((norm, dense(name, cfg.vocab_size)?))
        } else {
            None
        };
        let inv_freq = rope::inv_freq(&cfg.rope, cfg.qk_rope_head_dim);
        Ok(Self { backend, cfg: cfg.clone(), slice, embed, layers, caches, head, inv_freq })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn slice(&self) -> &SliceSpec {
        &self.slice
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Every layer's cache, in layer order (a worker reports their size and use).
    pub fn caches(&self) -> &[B::LayerCache] {
        &self.caches
    }

    /// Changes the backend's settings (the KV cache's memory budget, once the weights' real size is known) and
    /// makes every layer's cache anew under them. Anything cached is dropped: call it before the first step.
    pub fn renew_caches(&mut self, configure: impl FnOnce(&mut B)) {
        configure(&mut self.backend);
        let b = &self.backend;
        self.caches = self
            .layers
            .iter()
            .map(|layer| b.new_layer_cache(&layer.attn.dims, layer.attn.indexer.as_ref().map(|i| &i.dims)))
            .collect();
    }

    /// Positions cached for `seq` (0 for an unknown sequence).
    pub fn cache_len(&self, seq: SeqId) -> usize {
        self.caches.first().map_or(0, |c| self.backend.cache_len(c, seq))
    }

    pub fn free(&mut self, seq: SeqId) {
        for c in &mut self.caches {
            self.backend.cache_free(c, seq);
        }
    }

    /// Checks that every sequence's rows are contiguous and continue its cache, before anything is written.
    fn check_rows(&self, rows: &[Row]) -> Result<()> {
        let mut next: HashMap<SeqId, usize> = HashMap::new();
        let mut last: Option<SeqId> = None;
        for row in rows {
            let expected = match next.get(&row.seq) {
                Some(&n) if last == Some(row.seq) => n,
                Some(_) => {
                    return Err(Error::Slice { reason: format!("rows of sequence {} are not contiguous", row.seq) });
                }
                None => self.cache_len(row.seq),
            };
            if row.pos != expected {
                return Err(Error::CachePosition { seq: row.seq, expected, found: row.pos });
            }
            let limit = self.cfg.max_position_embeddings;
            if row.pos >= limit {
                return Err(Error::Slice {
                    reason: format!("position {} is past max_position_embeddings {limit}", row.pos),
                });
            }
            next.insert(row.seq, row.pos + 1);
            last = Some(row.seq);
        }
        Ok(())
    }

    /// Runs this stage's layers for one step and returns the residual stream `[rows, hidden]`.
    pub fn forward(&mut self, rows: &[Row], input: StageInput<'_, B>) -> Result<B::Tensor> {
        self.check_rows(rows)?;
        let b = &self.backend;
        let h = match (input, &self.embed) {
            (StageInput::Tokens(ids), Some(table)) => {
                if ids.len() != rows.len() {
                    return Err(Error::Slice { reason: format!("{} token ids for {} rows", ids.len(), rows.len()) });
                }
                b.embed(table, ids)?
            }
            (StageInput::Tokens(_), None) => {
                return Err(Error::Slice { reason: "token ids given to a stage without embeddings".into() });
            }
            (StageInput::Hidden(h), _) => {
                if b.shape(&h) != (rows.len(), self.cfg.hidden_size) {
                    return Err(Error::Slice {
                        reason: format!("hidden state {:?} for {} rows", b.shape(&h), rows.len()),
                    });
                }
                h
            }
        };
        let (layers, inv_freq) = (&self.layers, &self.inv_freq);
        let selecting = layers.iter().filter(|l| l.attn.indexer.as_ref().is_some_and(|ix| ix.selects(rows))).count();
        let mut body = |h: &mut B::Tensor, caches: &mut [B::LayerCache]| -> Result<()> {
            let mut pending = None;
            for (layer, cache) in layers.iter().zip(caches.iter_mut()) {
                pending = layer.forward(b, h, pending.take(), cache, inv_freq, rows)?;
            }
            if let Some(f) = pending {
                b.add_assign(h, &f)?;
            }
            Ok(())
        };
        b.run_layers(&mut self.caches, rows, selecting as u64, h, &mut body)
    }

    /// Final norm and `lm_head` on the rows `which` of `hidden`: logits `[which.len(), vocab]` on the host.
    pub fn logits(&self, hidden: &B::Tensor, which: &[usize]) -> Result<Vec<f32>> {
        self.backend.download(&self.head_logits(hidden, which)?)
    }

    /// One token for each of the rows `which` of `hidden`, from `samplers[k]` for `which[k]`: final norm and
    /// `lm_head`, then `Backend::sample` where the logits are (on a GPU, only a reduced view of them comes back).
    pub fn sample(
        &self,
        hidden: &B::Tensor,
        which: &[usize],
        samplers: &mut [SampleRow<'_>],
    ) -> Result<Vec<SampledToken>> {
        if which.len() != samplers.len() {
            return Err(Error::Slice {
                reason: format!("{} rows to sample with {} samplers", which.len(), samplers.len()),
            });
        }
        if which.is_empty() {
            return Ok(Vec::new());
        }
        self.backend.sample(&self.head_logits(hidden, which)?, samplers)
    }

    /// Logits `[which.len(), vocab]` where the backend keeps them.
    fn head_logits(&self, hidden: &B::Tensor, which: &[usize]) -> Result<B::Tensor> {
        let (norm, lm_head) = self
            .head
            .as_ref()
            .ok_or_else(|| Error::Slice { reason: "logits asked of a stage without lm_head".into() })?;
        let b = &self.backend;
        let eps = self.cfg.rms_norm_eps as f32;
        // Every row in order (a decode step's): the norm reads them where they are, without a gather's copy and
        // its index upload (a launch and ~5 µs on the GPU path).
        let x = if which.iter().copied().eq(0..b.shape(hidden).0) {
            b.rms_norm(hidden, norm, eps)?
        } else {
            b.rms_norm(&b.gather_rows(hidden, which)?, norm, eps)?
        };
        b.linear(&x, lm_head)
    }
}
