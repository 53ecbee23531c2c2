//! Every kernel compiles with NVRTC for the production GPU (sm_86, RTX 3090) and the test GPU (sm_90, H200).
//! Needs only NVRTC and the CUDA headers, no GPU: CI installs them from the `nvidia-cuda-nvrtc` and
//! `nvidia-cuda-runtime` wheels. Elsewhere the test says why it skipped.

use pipemoe_cuda::nvrtc;

fn toolchain() -> Option<String> {
    if !nvrtc::nvrtc_present() {
        return Some(pipemoe_cuda::Error::NoNvrtc.to_string());
    }
    nvrtc::include_dir().err().map(|e| e.to_string())
}

fn skip(why: &str) -> bool {
    assert!(std::env::var("CI").map_or(true, |v| v != "true"), "under CI the kernels must compile: {why}");
    eprintln!("SKIPPED: {why}");
    true
}

#[test]
fn every_kernel_compiles_for_sm86_and_sm90() {
    if let Some(why) = toolchain() {
        skip(&why);
        return;
    }
    let (major, minor) = nvrtc::version().expect("version");
    eprintln!("NVRTC {major}.{minor}");
    for arch in ["sm_86", "sm_90"] {
        for (name, src) in nvrtc::KERNELS {
            let bin = nvrtc::compile(name, &nvrtc::expand(name, src), arch).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&bin[..4], b"\x7fELF", "{name} for {arch} is not a CUBIN");
            for entry in symmetric_entries(name) {
                let found =
                    bin.windows(entry.len() + 1).any(|w| w[..entry.len()] == *entry.as_bytes() && w[entry.len()] == 0);
                assert!(found, "{name} for {arch} has no entry point {entry}");
            }
        }
    }
}

/// With their timeline records (`PIPEMOE_TRACE=1`, src/trace.rs: a scope opens every kernel's body), every kernel
/// still compiles, for the GPU that traces are taken on (sm_90), and keeps its entry points.
#[test]
fn every_kernel_compiles_with_its_trace_records() {
    if let Some(why) = toolchain() {
        skip(&why);
        return;
    }
    for (name, src) in nvrtc::KERNELS {
        let plain = nvrtc::expand(name, src);
        let traced = pipemoe_cuda::trace::instrument(&plain);
        assert_eq!(
            traced.matches("{ PIPEMOE_TRACE_KERNEL();").count(),
            plain.matches("__global__").count(),
            "{name}: a scope for every kernel"
        );
        let bin = nvrtc::compile(name, &traced, "sm_90").unwrap_or_else(|e| panic!("{e}"));
        assert!(bin.windows(14).any(|w| w == b"pipemoe_trace\0"), "{name} has no record array");
    }
}

/// The symmetric weights' GEMV entry points the host asks for by name (src/mma.rs `variant`): every bit width's
/// plain (8 and 16 rows, bf16 and f32 out), grouped (each layout) and RoPE-storing kernel, built by macros; and
/// the warp-column grouped kernels that read the sums of x (`_xs`, src/experts.rs `launch_shape`); and the one-row
/// MoE block's single launch (`gptq_mma_moe_row_*`, src/experts_launch.rs `moe_row_kernel`).
fn symmetric_entries(file: &str) -> Vec<String> {
    let bits = [2, 3, 4];
    match file {
        "gptq_mma.cu" => bits
            .iter()
            .flat_map(|b| {
                let plain = ["b8", "b16"]
                    .into_iter()
                    .flat_map(move |mb| ["bf16", "f32"].map(|y| format!("gptq_mma_gemv_w{b}_{mb}_sym_to_{y}")));
                let grouped = ["_sym", "_k2_sym", "_cols_sym", "_cols_xs", "_cols_sym_xs"]
                    .map(|l| format!("gptq_mma_gemv_grouped_w{b}_b8{l}_bf16"));
                // One row's MoE block in one launch: every name src/experts_launch.rs `moe_row_kernel` can give.
                let moe_row =
                    ["_g4d2", "_g4d2_sym", "_g2d2", "_g2d2_sym"].map(|l| format!("gptq_mma_moe_row_w{b}{l}_bf16"));
                plain.chain(grouped).chain(moe_row).collect::<Vec<_>>()
            })
            .collect(),
        "gptq_rope.cu" => bits.iter().map(|b| format!("gptq_mma_gemv_rope_w{b}_b8_sym_bf16")).collect(),
        _ => Vec::new(),
    }
}

#[test]
fn a_broken_kernel_is_an_error_with_the_log() {
    if let Some(why) = toolchain() {
        skip(&why);
        return;
    }
    let err = nvrtc::compile("broken.cu", "extern \"C\" __global__ void k() { undefined_fn(); }", "sm_86")
        .expect_err("must not compile");
    assert!(err.to_string().contains("undefined_fn"), "{err}");
}

/// A variant's defines (`PIPEMOE_NVRTC_VARIANT`, `Apart::Variant`) reach the compiler: the same source with and
/// without them compiles to different code, and `cubin_with` keeps the two apart in the cache.
#[test]
fn a_variant_s_defines_reach_the_compiler() {
    if let Some(why) = toolchain() {
        skip(&why);
        return;
    }
    let src = "#ifndef V\n#define V 0\n#endif\nextern \"C\" __global__ void k(int* p) { *p = V + 12345; }";
    let plain = nvrtc::compile("variant.cu", src, "sm_86").expect("compiles");
    let seven = nvrtc::compile_with("variant.cu", src, "sm_86", &["-DV=7".to_string()]).expect("compiles");
    assert_ne!(plain, seven, "the define did not reach the compiler");
    let again = nvrtc::compile_with("variant.cu", src, "sm_86", &[]).expect("compiles");
    assert_eq!(plain, again, "no defines: the usual code");
}
