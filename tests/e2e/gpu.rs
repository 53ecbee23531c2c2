//! GPU workers end to end (skipped without a GPU): three worker processes sharing cuda:0 answer as the CPU
//! workers do, with activations handed over by CUDA IPC and with the inline-bytes fallback forced.

use crate::support::*;

fn has_gpu() -> bool {
    // The driver library is what a worker needs first; without it there is nothing to test here.
    let found =
        ["/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/local/nvidia/lib64/libcuda.so.1", "/usr/lib64/libcuda.so.1"]
            .iter()
            .any(|p| std::path::Path::new(p).exists());
    if !found {
        eprintln!("SKIPPED (no GPU): libcuda.so.1 not found");
    }
    found
}

#[test]
fn gpu_workers_answer_through_cuda_ipc_and_through_the_fallback() {
    if !has_gpu() {
        return;
    }
    let questions = ["What is 12 + 30?", "Reverse the word apple", "what's 45 plus 38", "Spell tiger backwards."];
    let cpu = Server::start();
    let want: Vec<String> = questions.iter().map(|q| content(&cpu.chat(q))).collect();
    drop(cpu);
    for env in [vec![], vec![("PIPEMOE_IPC", "0")]] {
        let s = Server::start_on("cuda:0,cuda:0,cuda:0", &env);
        let got: Vec<String> = questions.iter().map(|q| content(&s.chat(q))).collect();
        assert_eq!(got, want, "{env:?}");
        let ipc_lines = s.log().matches("CUDA IPC handles").count();
        assert_eq!(ipc_lines > 0, env.is_empty(), "{env:?}: {}", s.log());
    }
}
