//! The activation hand-off between two worker processes, measured: this process exports a decode step's hidden
//! state (`[1, hidden]` bf16) through CUDA IPC as a worker does, a child process (this binary, `bench-ipc-peer`)
//! imports it as the next worker does and answers at once, as a worker goes on to queue its layers; the round trip
//! is timed, and apart from it the export (this process's host time), the import (the child's host time: open
//! handles, queue the event wait and the copy), when the data had landed on the child's device (it synchronizes
//! after answering and reports it with its next answer: the hand-off's latency on the device) and a bare message
//! round trip over the same pipes (what waking two processes costs). A second run has the sender synchronize its
//! stream before it sends, so the receiver's event wait is already met: the difference in landing says what
//! the interprocess event costs. On one GPU the two processes' contexts take turns on it, which two GPUs do not.
//! CUDA refuses to open an IPC handle in the process that made it, hence the child. The gRPC call that carries
//! the handles in serving is not included. `pipemoe bench-ipc` runs this alone (`--peer-device` for two GPUs).

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

#[derive(Debug, Args)]
pub struct IpcArgs {
    /// CUDA device ordinal of the sender.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// CUDA device ordinal of the receiver (default: the sender's).
    #[arg(long)]
    pub peer_device: Option<usize>,
    /// Values in the hand-off's one row (the real model's hidden size).
    #[arg(long, default_value_t = 7168)]
    pub hidden: usize,
    /// Hand-offs timed (after 5 untimed ones).
    #[arg(long, default_value_t = 200)]
    pub iters: usize,
}

/// `pipemoe bench-ipc`: the hand-off alone, a short table.
pub fn run(args: &IpcArgs) -> Result<()> {
    let b = CudaBackend::new(args.device).context("opening the GPU")?;
    let peer = args.peer_device.unwrap_or(args.device);
    let t = measure(&b, peer, args.hidden, args.iters)?;
    println!(
        "IPC hand-off [1, {}] bf16, device {} -> {peer}, {} iterations (medians, us)",
        args.hidden, args.device, args.iters
    );
    print!("{}", t.table());
    Ok(())
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

/// The child: reads `rows cols mem_hex event_hex` lines, imports each and answers `ok <seconds the import took>`
/// (or the error) at once, then synchronizes; a `landed` line is answered with the seconds from the last import's
/// start until its data had landed, a `ping` line `pong`.
pub fn peer(args: &PeerArgs) -> Result<()> {
    let b = CudaBackend::new(args.device).context("opening the GPU")?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let mut landed = 0.0;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let answer = match line.trim() {
            "ping" => Some("pong".to_string()),
            "landed" => Some(format!("{landed:e}")),
            _ => None,
        };
        if let Some(a) = answer {
            writeln!(out, "{a}")?;
            out.flush()?;
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [rows, cols, mem, event] = f[..] else { bail!("bad request line {line:?}") };
        let t0 = Instant::now();
        let imported = unhex(mem)
            .and_then(|m| Ok((m, unhex(event)?)))
            .and_then(|(m, e)| Ok(b.import(rows.parse()?, cols.parse()?, &m, &e)?));
        let reply = match &imported {
            Ok(_) => format!("ok {:e}", t0.elapsed().as_secs_f64()),
            Err(e) => format!("error {e:#}"),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
        b.gpu.stream.synchronize()?;
        landed = t0.elapsed().as_secs_f64();
        drop(imported);
    }
    Ok(())
}

/// The hand-off's times ([`measure`]), seconds.
#[derive(Clone, Debug)]
pub struct IpcTimes {
    /// Export, message, import (queued), answer.
    pub round_trip: Times,
    /// The sender's host time in `export` (copy into the shared buffer, event record).
    pub export: Times,
    /// The receiver's host time in `import` (handles, event wait and copy queued).
    pub import: Times,
    /// From the receiver's import until its synchronize returned: the data on its device.
    pub landed: Times,
    /// A message and its answer over the same pipes, no CUDA.
    pub pipe: Times,
    /// With the sender synchronizing its stream before it sends: round trip (its synchronize included) and landing.
    pub settled_round_trip: Times,
    pub settled_landed: Times,
    /// The receiver's device ordinal.
    pub receiver: usize,
}

/// One mode's samples.
#[derive(Default)]
struct Samples {
    round: Vec<f64>,
    export: Vec<f64>,
    import: Vec<f64>,
    landed: Vec<f64>,
    pipe: Vec<f64>,
}

impl IpcTimes {
    /// Lines of `label  value` (µs), for `pipemoe bench-ipc`.
    pub fn table(&self) -> String {
        let rows = [
            ("round trip (export, message, import queued, answer)", &self.round_trip),
            ("  sender's export (copy, event record)", &self.export),
            ("  receiver's import (handles, queue wait and copy)", &self.import),
            ("  bare message round trip", &self.pipe),
            ("data landed on the receiver's device, from its import", &self.landed),
            ("sender synchronizes before sending: round trip", &self.settled_round_trip),
            ("  data landed, from the receiver's import", &self.settled_landed),
        ];
        rows.iter().map(|(what, t)| format!("{what:<55} {:>9.1}\n", t.median * 1e6)).collect()
    }
}

/// `iters` hand-offs of a `[1, hidden]` tensor to a child process on `device` (as a worker sends them, then with
/// the sender synchronizing first), and as many bare messages.
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
        // One line to the peer, its answer back.
        let mut ask = |msg: &str| -> Result<String> {
            writeln!(to, "{msg}")?;
            to.flush()?;
            line.clear();
            from.read_line(&mut line)?;
            Ok(line.trim().to_string())
        };
        let x = b.upload(1, hidden, vec![0.5; hidden])?;
        let mut modes = [Samples::default(), Samples::default()];
        for (settle, got) in modes.iter_mut().enumerate() {
            for i in 0..iters + 5 {
                b.gpu.stream.synchronize()?;
                let t0 = Instant::now();
                let shared = b.export(&x)?.context("this backend cannot export")?;
                if settle == 1 {
                    b.gpu.stream.synchronize()?;
                }
                let exported = t0.elapsed().as_secs_f64();
                let answer = ask(&format!("1 {hidden} {} {}", hex(&shared.mem_handle), hex(&shared.event_handle)))?;
                let dt = t0.elapsed().as_secs_f64();
                let imported = match answer.strip_prefix("ok ") {
                    Some(secs) => secs.parse::<f64>().context("the IPC peer's import time")?,
                    None => bail!("the IPC peer: {answer}"),
                };
                let answer = ask("landed")?;
                let landed = answer.parse::<f64>().with_context(|| format!("the IPC peer's landing {answer:?}"))?;
                drop(shared);
                let t1 = Instant::now();
                let answer = ask("ping")?;
                let pipe = t1.elapsed().as_secs_f64();
                if answer != "pong" {
                    bail!("the IPC peer answered {answer:?} to ping");
                }
                if i >= 5 {
                    got.round.push(dt);
                    got.export.push(exported);
                    got.import.push(imported);
                    got.landed.push(landed);
                    got.pipe.push(pipe);
                }
            }
        }
        let [plain, settled] = modes;
        Ok(IpcTimes {
            round_trip: Times::of(plain.round),
            export: Times::of(plain.export),
            import: Times::of(plain.import),
            landed: Times::of(plain.landed),
            pipe: Times::of(plain.pipe),
            settled_round_trip: Times::of(settled.round),
            settled_landed: Times::of(settled.landed),
            receiver: device,
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
