"""llm-compressor's side of bench_deploy_ct.py, run with the Python of a venv that has llmcompressor.

    VENV/bin/python benchmarks/peer_llmcompressor_deploy.py MODEL_DIR OUT_DIR [--scheme W4A16]

oneshot with QuantizationModifier (round to nearest, weight-only: no calibration data), the scheme on every
Linear layer but lm_head, saved compressed (save_pretrained(save_compressed=True)) into OUT_DIR. Prints one
JSON line: {"safetensors_bytes": N, "format": ...}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--scheme", default="W4A16")
    a = p.parse_args()
    torch.set_num_threads(1)
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=a.scheme, ignore=["lm_head"]))
    model.save_pretrained(a.out, save_compressed=True)
    out = Path(a.out)
    config = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(json.dumps({"safetensors_bytes": size, "format": config.get("format")}))


if __name__ == "__main__":
    main()
