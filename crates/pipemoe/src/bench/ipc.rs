//! The activation hand-off between two worker processes, measured: this process exports a decode step's hidden
//! state (`[1, hidden]` bf16) through CUDA IPC as a worker does, a child process (this binary, `bench-ipc-peer`)
//! imports it as the next worker does and answers; the round trip is timed, and apart from it the export (this
//! process's host time), the import (the child's, reported in its answer: open handles, wait on the event, copy,
//! synchronize) and a bare message round trip over the same pipes (what waking two processes costs). CUDA refuses to
//! open an IPC handle in the process that made it, hence the child. The gRPC call that carries the handles in
//! serving is not included.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use pipemoe_cuda::CudaBackend;
use pipemoe_model::Backend;

use super::stage::Times;

#[derive(Debug, Args)]
pub struct PeerArgs {
    /// CUDA device ordinal to import on.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("odd-length hex");
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("bad hex")).collect()
}

/// The child: reads `rows cols mem_hex event_hex` lines, imports each, answers `ok <seconds the import took>` (or
/// the error) per line; a `ping` line is answered `pong`.
pub fn peer(args: &PeerArgs) -> Result<()> {
    let b = CudaBackend::new(args.device).context("opening the GPU")?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim() == "ping" {
            writeln!(out, "pong")?;
            out.flush()?;
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [rows, cols, mem, event] = f[..] else { bail!("bad request line {line:?}") };
        let t0 = Instant::now();
        let reply = unhex(mem)
            .and_then(|m| Ok((m, unhex(event)?)))
            .and_then(|(m, e)| Ok(b.import(rows.parse()?, cols.parse()?, &m, &e)?))
            .map_or_else(|e| format!("error {e:#}"), |_| format!("ok {:e}", t0.elapsed().as_secs_f64()));
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

/// The hand-off's times ([`measure`]), seconds.
#[derive(Clone, Debug)]
pub struct IpcTimes {
    /// Export, message, import, answer.
    pub round_trip: Times,
    /// The sender's host time in `export` (copy into the shared buffer, event record).
    pub export: Times,
    /// The receiver's host time in `import`, as it reports.
    pub import: Times,
    /// A message and its answer over the same pipes, no CUDA.
    pub pipe: Times,
}

/// `iters` hand-offs of a `[1, hidden]` tensor to a child process on `device`, and as many bare messages.
pub fn measure(b: &CudaBackend, device: usize, hidden: usize, iters: usize) -> Result<IpcTimes> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut child = Command::new(exe)
        .args(["bench-ipc-peer", "--device", &device.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the IPC peer")?;
    let result = (|| -> Result<IpcTimes> {
        let mut to = child.stdin.take().context("peer stdin")?;
        let mut from = BufReader::new(child.stdout.take().context("peer stdout")?);
        let mut line = String::new();
        from.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("the IPC peer did not start: {line:?}");
        }
        let x = b.upload(1, hidden, vec![0.5; hidden])?;
        let (mut round, mut export, mut import, mut pipe) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..iters + 5 {
            b.gpu.stream.synchronize()?;
            let t0 = Instant::now();
            let shared = b.export(&x)?.context("this backend cannot export")?;
            let exported = t0.elapsed().as_secs_f64();
            writeln!(to, "1 {hidden} {} {}", hex(&shared.mem_handle), hex(&shared.event_handle))?;
            to.flush()?;
            line.clear();
            from.read_line(&mut line)?;
            let dt = t0.elapsed().as_secs_f64();
            let imported = match line.trim().strip_prefix("ok ") {
                Some(secs) => secs.parse::<f64>().context("the IPC peer's import time")?,
                None => bail!("the IPC peer: {}", line.trim()),
            };
            drop(shared);
            let t1 = Instant::now();
            writeln!(to, "ping")?;
            to.flush()?;
            line.clear();
            from.read_line(&mut line)?;
            if line.trim() != "pong" {
                bail!("the IPC peer answered {:?} to ping", line.trim());
            }
            if i >= 5 {
                round.push(dt);
                export.push(exported);
                import.push(imported);
                pipe.push(t1.elapsed().as_secs_f64());
            }
        }
        Ok(IpcTimes {
            round_trip: Times::of(round),
            export: Times::of(export),
            import: Times::of(import),
            pipe: Times::of(pipe),
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
