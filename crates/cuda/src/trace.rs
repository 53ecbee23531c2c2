//! Per-block kernel timelines (`pipemoe bench --trace`). With `PIPEMOE_TRACE=1` every kernel source is compiled
//! with kernels/trace.cuh pasted before it and a scope opening each kernel's body ([`instrument`]), which records
//! each block's SM, start and end on the GPU's global timer into its module's array; [`Gpu::trace_clear`] and
//! [`Gpu::trace_take`] empty and read them. It shows what ncu, which runs one kernel at a time, cannot: where a
//! step's kernels start after one another, overlap on a branch, or wait for an SM. The records cost a timer read
//! per thread and an atomic per block: for finding where time goes, not for timing figures. Off, the kernels are
//! compiled as they are (the instrumented source is another cache entry).

use std::sync::OnceLock;

use crate::error::{Error, Result, drv};
use crate::gpu::Gpu;

const PRELUDE: &str = include_str!("../kernels/trace.cuh");
const SCOPE: &str = " PIPEMOE_TRACE_KERNEL();";
/// Records each module holds (`PIPEMOE_TRACE_CAP` in trace.cuh).
const CAP: usize = 65536;

/// Whether this process compiles its kernels with the records (`PIPEMOE_TRACE=1`, read once).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("PIPEMOE_TRACE").is_ok_and(|v| v == "1"))
}

/// `src` (a kernel file with its headers pasted in) with trace.cuh before it and the scope first in the body of
/// every `__global__` function: the first `{` after the parentheses that close its parameters (those of a
/// `__launch_bounds__` before the name close earlier and are followed by the name, not a brace). A declaration
/// without a body (`;` there) is left alone.
pub fn instrument(src: &str) -> String {
    let mut out = String::with_capacity(PRELUDE.len() + src.len() + 4096);
    out.push_str(&PRELUDE.replace("#pragma once", ""));
    out.push_str("\n#line 1\n");
    let bytes = src.as_bytes();
    let mut copied = 0;
    let mut at = 0;
    while let Some(found) = src[at..].find("__global__") {
        let mut i = at + found + "__global__".len();
        let mut depth = 0usize;
        let mut body = None;
        while i < bytes.len() {
            match bytes[i] {
                b'(' => depth += 1,
                b')' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        // What follows the closing parenthesis, past blanks and macro line continuations.
                        let mut j = i + 1;
                        while j < bytes.len() && matches!(bytes[j], b' ' | b'\t' | b'\r' | b'\n' | b'\\') {
                            j += 1;
                        }
                        match bytes.get(j) {
                            Some(b'{') => {
                                body = Some(j + 1);
                                break;
                            }
                            Some(b';') => break,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
            i += 1;
        }
        match body {
            Some(open) => {
                out.push_str(&src[copied..open]);
                out.push_str(SCOPE);
                copied = open;
                at = open;
            }
            None => at = i.min(bytes.len()),
        }
    }
    out.push_str(&src[copied..]);
    out
}

/// FNV-1a (32 bits) of a kernel's name, as trace.cuh hashes `__func__`.
fn name_hash(name: &str) -> u32 {
    name.bytes().fold(2_166_136_261u32, |h, b| (h ^ u32::from(b)).wrapping_mul(16_777_619))
}

/// One block of one launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The kernel's symbol, or `#` and its name's hash when no kernel of this `Gpu` was asked for by that name.
    pub kernel: String,
    pub sm: u32,
    /// On the GPU's global timer, ns.
    pub start_ns: u64,
    pub end_ns: u64,
    /// The block's linear index (x fastest) and the launch's blocks.
    pub block: u32,
    pub blocks: u32,
}

/// What [`Gpu::trace_take`] read: the records, and how many blocks found their module's array full.
pub struct Trace {
    pub records: Vec<Record>,
    pub dropped: usize,
}

impl Trace {
    /// The records as CSV (a header, then one line a block in start order).
    pub fn csv(&self) -> String {
        let mut out = String::from("kernel,blocks,block,sm,start_ns,end_ns\n");
        for r in &self.records {
            out.push_str(&format!("{},{},{},{},{},{}\n", r.kernel, r.blocks, r.block, r.sm, r.start_ns, r.end_ns));
        }
        out
    }
}

impl Gpu {
    /// Empties every module's records (their counts to 0).
    pub fn trace_clear(&self) -> Result<()> {
        require()?;
        for (module, _) in &self.modules {
            let mut count = module.get_global("pipemoe_trace_n", &self.stream).map_err(drv("cuModuleGetGlobal"))?;
            self.stream.memcpy_htod(&[0u8; 4], &mut count).map_err(drv("cuMemcpyHtoD"))?;
        }
        self.stream.synchronize().map_err(drv("cuStreamSynchronize"))
    }

    /// Every module's records since [`Gpu::trace_clear`], in start order, after the device is done with its
    /// work; the counts are left as they were.
    pub fn trace_take(&self) -> Result<Trace> {
        require()?;
        self.ctx.synchronize().map_err(drv("cuCtxSynchronize"))?;
        let names: std::collections::HashMap<u32, String> = {
            let found = self.functions.lock().unwrap_or_else(|e| e.into_inner());
            found.keys().map(|k| (name_hash(k), k.clone())).collect()
        };
        let (mut records, mut dropped) = (Vec::new(), 0);
        for (module, _) in &self.modules {
            let count = module.get_global("pipemoe_trace_n", &self.stream).map_err(drv("cuModuleGetGlobal"))?;
            let n = self.stream.clone_dtoh(&count).map_err(drv("cuMemcpyDtoH"))?;
            let n = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize;
            dropped += n.saturating_sub(CAP);
            let n = n.min(CAP);
            if n == 0 {
                continue;
            }
            let all = module.get_global("pipemoe_trace", &self.stream).map_err(drv("cuModuleGetGlobal"))?;
            let raw = self.stream.clone_dtoh(&all.slice(0..n * 32)).map_err(drv("cuMemcpyDtoH"))?;
            for r in raw.chunks_exact(32) {
                let word = |i: usize| u64::from_le_bytes(r[8 * i..8 * i + 8].try_into().expect("8 bytes"));
                let (head, tail) = (word(0), word(3));
                let hash = (head >> 32) as u32;
                records.push(Record {
                    kernel: names.get(&hash).cloned().unwrap_or_else(|| format!("#{hash:08x}")),
                    sm: head as u32,
                    start_ns: word(1),
                    end_ns: word(2),
                    block: tail as u32,
                    blocks: (tail >> 32) as u32,
                });
            }
        }
        records.sort_by_key(|r| (r.start_ns, r.end_ns));
        Ok(Trace { records, dropped })
    }
}

fn require() -> Result<()> {
    match enabled() {
        true => Ok(()),
        false => Err(Error::Shape {
            what: "trace",
            reason: "the kernels were built without their records: set PIPEMOE_TRACE=1".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_body_opens_with_the_scope() {
        let src = "extern \"C\" __global__ void __launch_bounds__(256, 2) a(int x) { x++; }\n\
                   #define K(S) \\\n    extern \"C\" __global__ void b_##S(const T* y) \\\n    { y++; }\n\
                   extern \"C\" __global__ void c(int);\n\
                   extern \"C\" __global__ void MMA_BOUNDS(8) d(int (*f)(int)) {}\n";
        let out = instrument(src);
        let body = &out[out.find("#line 1\n").unwrap()..];
        assert!(body.contains("a(int x) { PIPEMOE_TRACE_KERNEL(); x++; }"), "{body}");
        assert!(body.contains("{ PIPEMOE_TRACE_KERNEL(); y++; }"), "{body}");
        assert!(body.contains("void c(int);\n"), "{body}");
        assert!(body.contains("d(int (*f)(int)) { PIPEMOE_TRACE_KERNEL();}"), "{body}");
        assert_eq!(body.matches("PIPEMOE_TRACE_KERNEL").count(), 3);
        assert!(out.starts_with(&PRELUDE[..40]));
    }

    #[test]
    fn names_hash_as_the_kernels_do() {
        // FNV-1a 32 of "a" and of the empty name, the published test values.
        assert_eq!(name_hash(""), 0x811c_9dc5);
        assert_eq!(name_hash("a"), 0xe40c_292c);
    }
}
