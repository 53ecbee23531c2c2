#!/usr/bin/env python3
"""SASS of one kernel source, here, without a GPU: NVRTC (the CI venv's nvidia-cuda-nvrtc wheel) compiles a file of
crates/cuda/kernels to a cubin as the backend does (its headers pasted in), and nvdisasm prints it.

nvdisasm is not in the CI venv: `pip download --no-deps nvidia-cuda-nvdisasm -d /tmp/nvd && unzip -o -q
/tmp/nvd/*.whl -d /tmp/nvd/x` puts it at /tmp/nvd/x/nvidia/cu13/bin/nvdisasm (a CUDA 13 disassembler reads
sm_86/sm_90 cubins); point NVDISASM at it.

Usage: tools/sass.py gptq_mma.cu [--arch sm_90] [--kernel REGEX] [--loops] [--inflight] [-D NAME=VALUE ...]
  --kernel   only functions whose name matches REGEX
  --loops    per function (with its registers), each backward branch's loop (nested ones indented): its own
             instructions by opcode and their fixed stall cycles — the stall counts the compiler put in the control
             bits (cycles before the warp's next issue: latencies it knows, e.g. a dependent mma's, and the 2 cycles
             of each ALU-pipe instruction); a lone warp's chunk takes at least that long
  --inflight per function, its global loads and how many more are issued before each one's value is first read
             in the same basic block (registers read as a multi-register operand's first only): loads read before
             the next is issued wait one after another — session 7 found four kernels doing that
"""
import argparse, collections, ctypes, glob, os, re, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "crates", "cuda", "kernels")


def nvrtc():
    sp = glob.glob(os.path.expanduser("~/.cache/pipemoe/venv/lib/python3*/site-packages"))
    if not sp:
        sys.exit("no ~/.cache/pipemoe/venv: run .ci/run once (it installs NVRTC and the CUDA headers there)")
    lib = ctypes.CDLL(glob.glob(sp[0] + "/nvidia/cuda_nvrtc/lib/libnvrtc.so*")[0])
    return lib, sp[0] + "/nvidia/cuda_runtime/include"


def source(name):
    src = open(os.path.join(KERNELS, name)).read()
    for h in sorted(glob.glob(os.path.join(KERNELS, "*.cuh"))):
        text = open(h).read().replace("#pragma once", "")
        src = src.replace('#include "%s"' % os.path.basename(h), text)
    return src


def cubin(name, arch, defines=()):
    lib, inc = nvrtc()
    prog = ctypes.c_void_p()
    lib.nvrtcCreateProgram(ctypes.byref(prog), source(name).encode(), name.encode(), 0, None, None)
    opts = [b"--gpu-architecture=" + arch.encode(), b"-I" + inc.encode(), b"--std=c++17", b"-default-device",
            b"--use_fast_math"] + [d.encode() for d in defines]
    r = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if r != 0:
        sys.exit(log.value.decode())
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, buf)
    return buf.raw


def functions(sass):
    """{name: ([(offset, text)], {label: offset}, {offset: stall cycles})} from nvdisasm's output (with -hex: an
    instruction's second 64-bit word, on the line after it, holds its control bits; the stall count is bits 41..44
    of that word)."""
    out, cur, pending, last = {}, None, [], None
    for line in sass.splitlines():
        m = re.match(r"\s*\.text\.(\S+):", line)
        if m:
            cur = out.setdefault(m.group(1), ([], {}, {}))
            continue
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and cur is not None:
            off = int(m.group(1), 16)
            cur[0].append((off, m.group(2).strip()))
            for label in pending:
                cur[1][label] = off
            pending, last = [], off
            continue
        m = re.match(r"\s*/\* (0x[0-9a-f]{16}) \*/\s*$", line)
        if m and cur is not None and last is not None:
            cur[2][last] = (int(m.group(1), 16) >> 41) & 0xF
            last = None
    return out


def register_counts(cubin_bytes):
    """{function: registers} from the cubin's .nv.info (EIATTR_REGCOUNT, attribute 0x2f: symbol index, count)."""
    import struct
    d = cubin_bytes
    shoff = struct.unpack_from("<Q", d, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", d, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", d, shoff + i * shentsize) for i in range(shnum)]

    def cstr(at):
        return d[at:d.index(b"\0", at)].decode()

    name = lambda sec: cstr(secs[shstrndx][4] + sec[0])
    symtab = next(sec for sec in secs if sec[1] == 2)
    strtab = secs[symtab[6]][4]
    syms = [cstr(strtab + struct.unpack_from("<I", d, symtab[4] + 24 * i)[0]) for i in range(symtab[5] // 24)]
    out = {}
    for sec in secs:
        if name(sec) != ".nv.info":
            continue
        at, end = sec[4], sec[4] + sec[5]
        while at < end:
            fmt, attr, size = struct.unpack_from("<BBH", d, at)
            if fmt != 4:  # an attribute without a sized payload
                at += 4
                continue
            if attr == 0x2F:
                sym, count = struct.unpack_from("<II", d, at + 4)
                out[syms[sym]] = count
            at += 4 + size
    return out


def opcode(text):
    t = text.split()
    if t and t[0].startswith("@"):
        t = t[1:]
    return t[0].split(".")[0] if t else ""


def loops(insts, labels):
    """Loops: spans [target, branch] of backward branches, outermost first, each with its own instructions (those
    in no loop nested inside it) as (offset, text)."""
    spans = set()
    for off, text in insts:
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if opcode(text) == "BRA" and m and m.group(1) in labels and labels[m.group(1)] <= off:
            spans.add((labels[m.group(1)], off))
    spans = sorted(spans, key=lambda s: (s[0], -s[1]))
    out = []
    for lo, hi in spans:
        inner = [o for o in spans if o != (lo, hi) and lo <= o[0] and o[1] <= hi]
        own = [(o, t) for o, t in insts if lo <= o <= hi and not any(a <= o <= b for a, b in inner)]
        depth = sum(1 for o in spans if o != (lo, hi) and o[0] <= lo and hi <= o[1])
        out.append((lo, hi, depth, own))
    return out


LOADS = ("LDG", "LD")
NO_DEST = ("ST", "STG", "STS", "STL", "RED", "BRA", "BAR", "EXIT", "RET", "CALL", "MEMBAR", "DEPBAR", "NOP",
           "WARPSYNC", "BSYNC", "BSSY", "LDGSTS", "LDGDEPBAR", "ERRBAR", "CCTL")


def registers(operand):
    """General registers an operand names: R12 → {12}; R12.64 (an address pair) → {12, 13}."""
    out = set()
    for m in re.finditer(r"\bR(\d+)(\.64)?", operand):
        r = int(m.group(1))
        out |= {r, r + 1} if m.group(2) else {r}
    return out


def inflight(insts, labels):
    """[(offset, loads issued before this load's value was first read, read in its basic block, bytes)] for each
    global load. A branch or a branch target ends a block: what the other path issues is not counted."""
    out, pending = [], []  # pending: [offset, destination registers, loads issued since]
    starts = set(labels.values())
    for off, text in insts:
        if off in starts:
            out += [(p[0], p[2], False, p[3]) for p in pending]
            pending = []
        body = text.split(None, 1)[1] if text.startswith("@") else text
        parts = body.split(None, 1)
        op = opcode(body)
        operands = [o.strip() for o in parts[1].split(",")] if len(parts) > 1 else []
        reads = set()
        for o in operands[0 if op in NO_DEST else 1:]:
            reads |= registers(o)
        for p in [p for p in pending if p[1] & reads]:
            out.append((p[0], p[2], True, p[3]))
            pending.remove(p)
        if op in LOADS and operands:
            for p in pending:
                p[2] += 1
            width = 4 if ".128" in parts[0] else 2 if ".64" in parts[0] else 1
            first = min(registers(operands[0]) or {-1})
            size = 16 if ".128" in parts[0] else 8 if ".64" in parts[0] else 2 if "16" in parts[0] else 1 if "8" in \
                parts[0] else 4
            pending.append([off, set(range(first, first + width)), 0, size])
        if op == "BRA":
            out += [(p[0], p[2], False, p[3]) for p in pending]
            pending = []
    out += [(p[0], p[2], False, p[3]) for p in pending]
    return sorted(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--kernel", default=".")
    ap.add_argument("--loops", action="store_true")
    ap.add_argument("--inflight", action="store_true")
    ap.add_argument("-D", dest="defines", action="append", default=[], help="a macro, as -DNAME=VALUE would")
    a = ap.parse_args()
    nvd = os.environ.get("NVDISASM", "/tmp/nvd/x/nvidia/cu13/bin/nvdisasm")
    if not os.path.exists(nvd):
        sys.exit(f"no nvdisasm at {nvd} (see this file's docstring)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        binary = cubin(a.file, a.arch, ["-D" + d for d in a.defines])
        f.write(binary)
        f.flush()
        sass = subprocess.run([nvd, "-c", "-hex", f.name], check=True, capture_output=True, text=True).stdout
    regs = register_counts(binary)
    for name, (insts, labels, stalls) in functions(sass).items():
        if not re.search(a.kernel, name):
            continue
        if a.inflight:
            loads = inflight(insts, labels)
            alone = [o for o, n, read, _ in loads if read and n == 0]
            print(f"{name}: {len(loads)} global loads, {len(alone)} read before another load is issued")
            for lo, hi, depth, _ in loops(insts, labels):
                # By width: a kernel's wide and narrow paths are usually alternatives, not issued together.
                for size in sorted({b for o, _, r, b in loads if lo <= o <= hi and r}, reverse=True):
                    inner = [n for o, n, read, b in loads if lo <= o <= hi and read and b == size]
                    # One load an iteration, read in it, is as serial as several read one by one: the next
                    # iteration's load waits behind this one's use (a staging loop's store to shared memory).
                    if inner:
                        flag = "  <- one in flight" if max(inner) == 0 else ""
                        print(f"  {'  ' * depth}loop {lo:#x}..{hi:#x}: {len(inner)} loads of {size} bytes, issued "
                              f"with {sorted(inner)} others in flight{flag}")
            continue
        if not a.loops:
            print(f"// {name}: {len(insts)} instructions")
            for off, text in insts:
                print(f"/*{off:04x}*/ {text}")
            continue
        print(f"{name}: {len(insts)} instructions, {regs.get(name, '?')} registers")
        for lo, hi, depth, own in loops(insts, labels):
            mix = collections.Counter(opcode(t) for _, t in own)
            stall = sum(stalls.get(o, 0) for o, _ in own)
            print(f"  {'  ' * depth}loop {lo:#x}..{hi:#x}: {len(own)} own instructions, {stall} fixed stall cycles  " +
                  ", ".join(f"{k} {v}" for k, v in mix.most_common(14)))


if __name__ == "__main__":
    main()
