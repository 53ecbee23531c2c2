"""The issue-6 reference: HF transformers' own DeepSeek-V3.2 modelling code (eager attention, bf16, the 3-bit
weights dequantized) decoding on the same slice `pipemoe bench` times — the seed's serving path without its
slower 3-bit kernels. Runs on the GPU machine, whose preinstalled torch + transformers have the deepseek_v32 model
(tools/fixtures/README.md).

    ./.device/pipemoe bench --layers 4 --generate-only --cache-dir /tmp/pipemoe-bench   # prints the model dir
    python3 tools/device/hf_baseline.py --model <dir> --layers 3 7 --context 1024 --steps 8 \
        [--pipemoe-json $OUT/bench.json] --json $OUT/hf.json

The slice's decoder layers `start..end` of the checkpoint become HF layers 0..: every quantized linear is
unpacked (GPTQ: MODEL_SPEC.md section 4, 32 values per `bits` words, little-endian, v1 zeros stored minus one)
and dequantized on the GPU, everything else copied. Hidden states go in as `inputs_embeds` (a middle slice has no
embeddings or head). Decode is timed with CUDA events per step after a prefill of `--context` positions into
HF's own cache; with `--pipemoe-json` the pipemoe figure of the same run shape is printed next to it as a ratio.
"""

import argparse
import json
import os
import sys
import time

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "fixtures"))
from fx.hf import build_model, linear_shapes, set_linear, unquantized_names  # noqa: E402


def unpack_rows(packed, bits):
    """int32 [n·bits/32, m] → int64 [n, m]: every `bits` words hold 32 values, value k at bit bits·k."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    blocks = words.reshape(-1, bits, words.shape[-1])
    mask = (1 << bits) - 1
    out = []
    for k in range(32):
        bit = k * bits
        w, sh = bit // 32, bit % 32
        v = blocks[:, w] >> sh
        if sh + bits > 32:
            v = v | (blocks[:, w + 1] << (32 - sh))
        out.append(v & mask)
    return torch.stack(out, dim=1).reshape(-1, words.shape[-1])


def dequantize(t, prefix, bits, group_size, v1, device):
    """W [out, in] in bf16 from qweight [in·bits/32, out], qzeros [groups, out·bits/32], scales [groups, out]."""
    q = unpack_rows(t(f"{prefix}.qweight").to(device), bits)  # [in, out]
    zeros = unpack_rows(t(f"{prefix}.qzeros").to(device).t().contiguous(), bits).t()  # [groups, out]
    if v1:
        zeros = zeros + 1
    scales = t(f"{prefix}.scales").to(device).float()
    n_in = q.shape[0]
    g_idx = t(f"{prefix}.g_idx").to(device).long() if has(t, f"{prefix}.g_idx") else None
    if g_idx is None:
        g_idx = torch.arange(n_in, device=device) // group_size
    w = scales[g_idx] * (q.float() - zeros[g_idx].float())  # [in, out]
    return w.t().to(torch.bfloat16)


def has(t, name):
    return name in t.names


class Tensors:
    """Every tensor of a checkpoint directory by name, read on demand."""

    def __init__(self, d):
        index = os.path.join(d, "model.safetensors.index.json")
        if os.path.exists(index):
            files = sorted(set(json.load(open(index))["weight_map"].values()))
        else:
            files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
        self.where = {}
        self.files = [safe_open(os.path.join(d, f), framework="pt") for f in files]
        for f in self.files:
            for k in f.keys():
                self.where[k] = f
        self.names = set(self.where)

    def __call__(self, name):
        if name not in self.where:
            sys.exit(f"the checkpoint has no tensor {name} (HF's model needs it)")
        return self.where[name].get_tensor(name)


def layer_name(name, start):
    """HF layer i's name → the checkpoint's layer start + i."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        parts[2] = str(int(parts[2]) + start)
    return ".".join(parts)


@torch.no_grad()
def load_slice(model_dir, start, end, device):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    qc = cfg.get("quantization_config", {})
    bits, group_size = qc["bits"], qc["group_size"]
    v1 = qc.get("checkpoint_format", "gptq") != "gptq_v2"
    n = end - start
    small = dict(cfg)
    small["num_hidden_layers"] = n
    small["first_k_dense_replace"] = min(n, max(0, cfg["first_k_dense_replace"] - start))
    small["vocab_size"] = 256  # no embeddings or head in a middle slice: keep them small
    small["num_nextn_predict_layers"] = 0
    rs = dict(small["rope_scaling"])
    rs.setdefault("rope_type", rs.get("type", "yarn"))
    small["rope_scaling"] = rs
    t = Tensors(model_dir)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = build_model(small, dtype=torch.bfloat16)
    torch.set_default_dtype(torch.float32)
    sd = model.state_dict()
    for name in unquantized_names(model):
        if not name.startswith("model.layers."):
            continue  # embeddings, final norm, head: not in the slice, not run
        sd[name].copy_(t(layer_name(name, start)).to(device=device, dtype=sd[name].dtype))
    for prefix, _, _ in linear_shapes(small):
        ck = layer_name(prefix, start)
        if has(t, f"{ck}.qweight"):
            set_linear(model, prefix, dequantize(t, ck, bits, group_size, v1, device))
        else:
            set_linear(model, prefix, t(f"{ck}.weight").to(device))
    model.eval()
    return model, small


@torch.no_grad()
def time_decode(model, cfg, context, steps, chunk, device):
    from transformers import DynamicCache

    h = cfg["hidden_size"]
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older signatures take no config
        cache = DynamicCache()
    inner = model.model
    t0 = time.time()
    for s in range(0, context, chunk):
        e = min(context, s + chunk)
        x = torch.randn(1, e - s, h, device=device, dtype=torch.bfloat16, generator=gen)
        pos = torch.arange(s, e, device=device)
        inner(inputs_embeds=x, past_key_values=cache, use_cache=True, position_ids=pos[None], cache_position=pos)
    torch.cuda.synchronize()
    prefill_s = time.time() - t0
    times = []
    for i in range(steps + 2):
        x = torch.randn(1, 1, h, device=device, dtype=torch.bfloat16, generator=gen)
        pos = torch.tensor([context + i], device=device)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        inner(inputs_embeds=x, past_key_values=cache, use_cache=True, position_ids=pos[None], cache_position=pos)
        b.record()
        b.synchronize()
        if i >= 2:
            times.append(a.elapsed_time(b) * 1e-3)
    times.sort()
    return prefill_s, times[len(times) // 2], times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a checkpoint directory (pipemoe bench --generate-only)")
    ap.add_argument("--layers", nargs=2, type=int, required=True, metavar=("START", "END"))
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--pipemoe-json", help="pipemoe bench's JSON of the same slice and context, for the ratio")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("hf_baseline.py times HF transformers on a CUDA GPU; torch sees none here")
    device = "cuda"
    t0 = time.time()
    model, cfg = load_slice(args.model, args.layers[0], args.layers[1], device)
    load_s = time.time() - t0
    prefill_s, decode_s, all_s = time_decode(model, cfg, args.context, args.steps, args.chunk, device)
    out = {
        "reference": "HF transformers deepseek_v32, eager, bf16, dequantized weights",
        "torch": torch.__version__,
        "layers": args.layers,
        "context": args.context,
        "load_s": load_s,
        "prefill_s": prefill_s,
        "decode_median_s": decode_s,
        "decode_steps_s": all_s,
    }
    line = (
        f"HF transformers, layers {args.layers[0]}..{args.layers[1]} @ {args.context} ctx: "
        f"decode {decode_s * 1e3:.2f} ms/step, prefill {prefill_s:.2f} s"
    )
    if args.pipemoe_json:
        ours = json.load(open(args.pipemoe_json))
        mine = ours["decode"]["median_s"]
        out["pipemoe_decode_median_s"] = mine
        out["speedup"] = decode_s / mine
        line += f"; pipemoe {mine * 1e3:.2f} ms/step: {decode_s / mine:.1f}x faster (target >= 20x)"
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print(line)


if __name__ == "__main__":
    main()
