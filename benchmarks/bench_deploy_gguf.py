"""Q4_0 GGUF of a small Llama from GPTQ's levels: bits per weight vs the nominal 4.5, and read-back exactness.

    python benchmarks/bench_deploy_gguf.py [--hidden 256]

Runs `lwpipe recipe=gptq_w4 model.path=LLAMA ... pipeline=[quantize,export] stages.quantize.group_size=32
++stages.export.format=gguf ++stages.export.gguf_type=q4_0` on a random Llama built from a config, reads
export/model.gguf back with gguf.GGUFReader and prints one JSON line: bits per weight of the Q4_0 tensors
(their bytes x 8 / their weights; target within 2% of 4.5), of the whole file over all parameters, and
whether every Q4_0 tensor dequantizes to exactly the pipeline's levels x the float16 block scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.deploy_models import lwpipe_run, save_llama, write_texts  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    a = p.parse_args()
    torch.set_num_threads(1)
    import gguf

    import lwpipe
    from lwpipe.deploy.gguf import permute
    from lwpipe.deploy.levels import layer_grid

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model = save_llama(root / "llama", a.hidden)
        calib, test = write_texts(root)
        extra = ["stages.quantize.group_size=32", "++stages.export.format=gguf", "++stages.export.gguf_type=q4_0"]
        lwpipe_run(model, calib, test, root / "run", *extra)
        info = json.loads((root / "run" / "export.json").read_text())["gguf"]
        loaded = lwpipe.load(root / "run" / "model.lwp", constrained=True)
        mods, c = dict(loaded.named_modules()), loaded.config
        reader = gguf.GGUFReader(str(root / "run" / "export" / "model.gguf"))
        q_bytes = q_weights = 0
        exact = True
        for t in reader.tensors:
            if t.tensor_type != gguf.GGMLQuantizationType.Q4_0:
                continue
            q_bytes += int(t.n_bytes)
            q_weights += int(t.n_elements)
            entry = info["layers"][t.name]
            _, levels, scale, _ = layer_grid(mods[entry["hf_name"].removesuffix(".weight")])
            expected = levels * scale.half().float()
            proj = entry["hf_name"].split(".")[-2]
            if proj in ("q_proj", "k_proj"):
                expected = permute(expected, c.num_attention_heads if proj == "q_proj" else c.num_key_value_heads)
            back = np.array(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)
            exact &= bool(np.array_equal(back.reshape(expected.shape), expected.numpy()))
        params = sum(p.numel() for p in loaded.parameters())
        bpw = 8 * q_bytes / q_weights
        out = {
            "q4_0_bits_per_weight": round(bpw, 4),
            "vs_nominal_4.5": round(bpw / 4.5 - 1, 4),
            "within_2pct": abs(bpw / 4.5 - 1) <= 0.02,
            "q4_0_weights": q_weights,
            "file_bytes": info["bytes"],
            "file_bits_per_parameter": round(8 * info["bytes"] / params, 3),
            "read_back_exact": exact,
            "max_scale_rounding_rel_error": max(e.get("rel_error", 0) for e in info["layers"].values()),
        }
        print(json.dumps(out))


if __name__ == "__main__":
    main()
