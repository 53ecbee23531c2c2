//! A sharded safetensors checkpoint, memory-mapped: `model.safetensors.index.json` (HF sharding) or a single
//! `model.safetensors`. Opening reads only the headers; tensor bytes are paged in when first touched, so a
//! worker that reads only its layers never faults in the rest of a 130 GiB checkpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use pipemoe_quant::{Dtype, RawTensor};
use safetensors::SafeTensors;
use serde::Deserialize;

use crate::{Error, Result};

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

/// Where one tensor lives and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Index into [`Checkpoint::shard_paths`].
    pub shard: usize,
    /// Byte range within the shard file.
    pub start: usize,
    pub end: usize,
}

impl TensorMeta {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn byte_len(&self) -> usize {
        self.end - self.start
    }
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// The checkpoint of one model directory.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorMeta>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Maps one shard and reads its header. `read_metadata` also checks that the file is exactly as long as the
/// header says, which is how a truncated download is caught here and not at the first read of a tensor.
fn open_shard(path: &Path, shard: usize) -> Result<(Shard, Vec<TensorMeta>)> {
    let file = File::open(path).map_err(io_err(path))?;
    // SAFETY: the mapping is read-only and checkpoints are not rewritten while a server reads them; a file
    // changed under us could show torn data but not break memory safety of our own code paths beyond that
    // (the same contract safetensors, candle and vLLM rely on).
    let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&mmap).map_err(|source| Error::SafeTensors { file: path.to_path_buf(), source })?;
    let data_start = 8 + header_len;
    let entries = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let (s, e) = info.data_offsets;
            TensorMeta {
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                shard,
                start: data_start + s,
                end: data_start + e,
            }
        })
        .collect();
    Ok((Shard { path: path.to_path_buf(), mmap }, entries))
}

impl Checkpoint {
    /// Opens every shard of the checkpoint in `dir` and checks it against the index.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let (files, weight_map) = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(io_err(&index_path))?;
            let index: IndexFile =
                serde_json::from_str(&text).map_err(|source| Error::Json { file: index_path.clone(), source })?;
            let files: BTreeSet<String> = index.weight_map.values().cloned().collect();
            for f in &files {
                // A shard must sit in the model directory itself; a path is either a mistake or an escape.
                if f.is_empty() || f.contains('/') || f.contains('\\') || f == "." || f == ".." {
                    return Err(Error::Index {
                        file: index_path,
                        reason: format!("shard name {f:?} is not a file name"),
                    });
                }
            }
            (files.into_iter().collect::<Vec<_>>(), Some(index.weight_map))
        } else if single_path.is_file() {
            (vec![SINGLE_FILE.to_string()], None)
        } else {
            return Err(Error::NoCheckpoint { dir });
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut tensors: BTreeMap<String, TensorMeta> = BTreeMap::new();
        for (shard, file) in files.iter().enumerate() {
            let (s, entries) = open_shard(&dir.join(file), shard)?;
            for meta in entries {
                if let Some(prev) = tensors.get(&meta.name) {
                    return Err(Error::DuplicateTensor {
                        tensor: meta.name,
                        first: shards.get(prev.shard).map(|p: &Shard| p.path.clone()).unwrap_or_default(),
                        second: s.path.clone(),
                    });
                }
                tensors.insert(meta.name.clone(), meta);
            }
            shards.push(s);
        }

        if let Some(map) = weight_map {
            for (name, file) in &map {
                let found = tensors.get(name).and_then(|t| files.get(t.shard));
                if found != Some(file) {
                    return Err(Error::Index {
                        file: dir.join(INDEX_FILE),
                        reason: format!("{name} is mapped to {file} but that shard does not contain it"),
                    });
                }
            }
        }
        Ok(Self { dir, shards, tensors })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn shard_paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Every tensor, ordered by name.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorMeta> {
        self.tensors.values()
    }

    pub fn meta(&self, name: &str) -> Option<&TensorMeta> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The shard file holding `name`.
    pub fn shard_of(&self, name: &str) -> Option<&Path> {
        self.tensors.get(name).and_then(|t| self.shards.get(t.shard)).map(|s| s.path.as_path())
    }

    /// A tensor's raw little-endian bytes, borrowed from the mapping (no copy, no alignment guarantee).
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor { tensor: name.to_string() })?;
        let shard = &self.shards[t.shard];
        // Offsets were checked against the file length when the header was read.
        shard.mmap.get(t.start..t.end).ok_or_else(|| Error::Index {
            file: shard.path.clone(),
            reason: format!("{name}: bytes {}..{} outside the file", t.start, t.end),
        })
    }

    /// A tensor as the quant crate reads it.
    pub fn tensor(&self, name: &str) -> Result<RawTensor<'_>> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor { tensor: name.to_string() })?;
        Ok(RawTensor { name: &t.name, dtype: t.dtype, shape: &t.shape, data: self.bytes(name)? })
    }

    /// Sum of all tensors' data bytes.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.byte_len() as u64).sum()
    }
}
