//! Run-time compilation of the `.cu` kernels with NVRTC, for the device's own architecture (CUBIN, `sm_XX`),
//! cached on disk by a hash of source, architecture and NVRTC version (STYLE.md §12). Development and CI
//! machines have no nvcc: NVRTC comes from the driver's toolkit or the `nvidia-cuda-nvrtc` wheel.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result, sys};

use crate::error::{Error, Result};

/// Every kernel source, by file name; the headers they include are pasted in by [`expand`], since NVRTC sees no
/// files of ours.
pub const HEADERS: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../kernels/common.cuh")),
    ("attention.cuh", include_str!("../kernels/attention.cuh")),
    ("mma_pack.cuh", include_str!("../kernels/mma_pack.cuh")),
    ("experts.cuh", include_str!("../kernels/experts.cuh")),
    ("mma.cuh", include_str!("../kernels/mma.cuh")),
    ("mma_gemv.cuh", include_str!("../kernels/mma_gemv.cuh")),
    ("route.cuh", include_str!("../kernels/route.cuh")),
    ("rows.cuh", include_str!("../kernels/rows.cuh")),
];
pub const KERNELS: &[(&str, &str)] = &[
    ("attention.cu", include_str!("../kernels/attention.cu")),
    ("flash_mma.cu", include_str!("../kernels/flash_mma.cu")),
    ("gemv_wide.cu", include_str!("../kernels/gemv_wide.cu")),
    ("gptq_gemm.cu", include_str!("../kernels/gptq_gemm.cu")),
    ("gptq_gemv.cu", include_str!("../kernels/gptq_gemv.cu")),
    ("gptq_mma.cu", include_str!("../kernels/gptq_mma.cu")),
    ("gptq_rope.cu", include_str!("../kernels/gptq_rope.cu")),
    ("indexer.cu", include_str!("../kernels/indexer.cu")),
    ("topk.cu", include_str!("../kernels/topk.cu")),
    ("mla_absorb_mma.cu", include_str!("../kernels/mla_absorb_mma.cu")),
    ("mla_q.cu", include_str!("../kernels/mla_q.cu")),
    ("ops.cu", include_str!("../kernels/ops.cu")),
    ("route.cu", include_str!("../kernels/route.cu")),
    ("sample.cu", include_str!("../kernels/sample.cu")),
    ("stream_read.cu", include_str!("../kernels/stream_read.cu")),
];

pub fn nvrtc_present() -> bool {
    // SAFETY: only dlopens the library and checks a symbol; no CUDA state is touched.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's (major, minor).
pub fn version() -> Result<(i32, i32)> {
    if !nvrtc_present() {
        return Err(Error::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked above); the pointers are valid for the call.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| Error::Compile {
        kernel: "nvrtcVersion".into(),
        arch: String::new(),
        log: e.to_string(),
    })?;
    Ok((major, minor))
}

/// The folder holding `cuda_fp16.h`: `PIPEMOE_CUDA_INCLUDE`, `$CUDA_HOME/include`, `$CUDA_PATH/include`,
/// `/usr/local/cuda/include`.
pub fn include_dir() -> Result<PathBuf> {
    let mut searched = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("PIPEMOE_CUDA_INCLUDE") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = std::env::var_os(var) {
            candidates.push(PathBuf::from(p).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    for c in candidates {
        if c.join("cuda_fp16.h").exists() {
            return Ok(c);
        }
        searched.push(c);
    }
    Err(Error::NoHeaders { searched })
}

/// FNV-1a, 64 bits: a stable cache key (std's hasher may change between Rust releases).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `PIPEMOE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/pipemoe/cubin`, else `~/.cache/pipemoe/cubin`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PIPEMOE_KERNEL_CACHE") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("pipemoe").join("cubin")
}

/// A kernel file with the headers it includes pasted in front (in `HEADERS` order: a header may use the ones
/// before it), their include lines dropped, and `#line` marks so compile errors name the right file and line.
pub fn expand(name: &str, source: &str) -> String {
    let mut out = String::new();
    let mut body = source.to_string();
    for (header, text) in HEADERS {
        let include = format!("#include \"{header}\"");
        if body.contains(&include) {
            out.push_str(&format!("#line 1 \"{header}\"\n{}\n", text.replace("#pragma once", "")));
            body = body.replace(&include, "");
        }
    }
    out + &format!("#line 1 \"{name}\"\n{body}")
}

/// CUBIN of one kernel file for `arch` (`sm_86`), from the cache or freshly compiled (then cached).
pub fn cubin(name: &str, source: &str, arch: &str) -> Result<Vec<u8>> {
    cubin_with(name, source, arch, &[])
}

/// [`cubin`] with `defines` (`-DNAME[=VALUE]` options) after the environment's: a module of
/// `PIPEMOE_NVRTC_VARIANT`'s kernels ([`variant_defines`]), cached apart from the usual one.
pub fn cubin_with(name: &str, source: &str, arch: &str, defines: &[String]) -> Result<Vec<u8>> {
    let (major, minor) = version()?;
    let src = expand(name, source);
    // With PIPEMOE_TRACE=1 each kernel records its blocks' times (trace.rs): another source, so another entry.
    let src = if crate::trace::enabled() { crate::trace::instrument(&src) } else { src };
    let extra = extra_options().iter().chain(defines).cloned().collect::<Vec<_>>().join(" ");
    let key = fnv1a(&[src.as_bytes(), arch.as_bytes(), &major.to_le_bytes(), &minor.to_le_bytes(), extra.as_bytes()]);
    let dir = cache_dir();
    let path = dir.join(format!("{}-{arch}-{key:016x}.cubin", name.trim_end_matches(".cu")));
    if let Ok(bytes) = std::fs::read(&path) {
        return Ok(bytes);
    }
    let bin = compile_with(name, &src, arch, defines)?;
    // A cache that cannot be written only costs a recompile next time.
    if std::fs::create_dir_all(&dir).is_ok() {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &bin).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(bin)
}

fn c_string(s: &str, kernel: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Compile {
        kernel: kernel.into(),
        arch: String::new(),
        log: "NUL in source".into(),
    })
}

/// `PIPEMOE_NVRTC_LINEINFO=1` compiles with `-lineinfo`, so a profiler (ncu's source view) can map samples to
/// lines of the `.cu` files; it changes no code, only the cached CUBIN's debug sections.
/// `PIPEMOE_NVRTC_DEFINES="-DNAME=VALUE ..."` sets a kernel file's tuning macros for an experiment without a
/// rebuild (e.g. `-DMMA_MIN_BLOCKS=5`, gptq_mma.cu); anything but `-D` options is ignored, with a note on stderr.
/// Both are part of the cache key.
fn extra_options() -> Vec<String> {
    let mut out = Vec::new();
    if std::env::var("PIPEMOE_NVRTC_LINEINFO").is_ok_and(|v| v == "1") {
        out.push("-lineinfo".to_string());
    }
    out.extend(env_defines("PIPEMOE_NVRTC_DEFINES"));
    out
}

/// `PIPEMOE_NVRTC_VARIANT="-DNAME=VALUE ..."`: a second set of every kernel, compiled with these defines too, which
/// a step takes under `Apart::Variant` (`Gpu::function`) — so that an experiment's macro can be timed against the
/// usual kernels in one process (`pipemoe bench --ab variant`). Empty when unset.
pub fn variant_defines() -> Vec<String> {
    env_defines("PIPEMOE_NVRTC_VARIANT")
}

/// The `-D` options of the variable `var`; anything else is ignored, with a note on stderr.
fn env_defines(var: &str) -> Vec<String> {
    let Ok(defs) = std::env::var(var) else { return Vec::new() };
    defs.split_whitespace()
        .filter(|d| {
            let ok = d.len() > 2 && d.starts_with("-D");
            if !ok {
                eprintln!("pipemoe: ignoring {d:?} in {var} (only -DNAME[=VALUE])");
            }
            ok
        })
        .map(str::to_string)
        .collect()
}

/// Compiles to CUBIN; a compile error comes back with NVRTC's log.
pub fn compile(name: &str, src: &str, arch: &str) -> Result<Vec<u8>> {
    compile_with(name, src, arch, &[])
}

/// [`compile`] with `defines` after the environment's options.
pub fn compile_with(name: &str, src: &str, arch: &str, defines: &[String]) -> Result<Vec<u8>> {
    if !nvrtc_present() {
        return Err(Error::NoNvrtc);
    }
    let include = include_dir()?;
    let err = |log: String| Error::Compile { kernel: name.to_string(), arch: arch.to_string(), log };
    let csrc = c_string(src, name)?;
    let cname = c_string(name, name)?;
    let prog = result::create_program(&csrc, Some(&cname)).map_err(|e| err(e.to_string()))?;
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        format!("-I{}", path_str(&include)),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
        "--use_fast_math".to_string(),
    ];
    opts.extend(extra_options());
    opts.extend(defines.iter().cloned());
    // SAFETY: `prog` was created above and is destroyed exactly once below; the options hold no NUL.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let out = match compiled {
        Ok(()) => unsafe { get_cubin(prog) }.map_err(|e| err(e.to_string())),
        Err(_) => {
            let log = unsafe { result::get_program_log(prog) }.map(|l| log_text(&l)).unwrap_or_default();
            Err(err(log))
        }
    };
    // SAFETY: as above.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// # Safety
/// `prog` must be a successfully compiled, live program.
unsafe fn get_cubin(prog: sys::nvrtcProgram) -> std::result::Result<Vec<u8>, result::NvrtcError> {
    let mut size = 0usize;
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result()?;
    let mut buf = vec![0u8; size];
    unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) }.result()?;
    Ok(buf)
}

fn log_text(l: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = l.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// `sm_XX` for a compute capability.
pub fn arch(major: i32, minor: i32) -> String {
    format!("sm_{major}{minor}")
}
