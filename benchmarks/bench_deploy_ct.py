"""compressed_tensors export of a small Llama vs what llm-compressor writes for the same scheme (W4A16).

    python benchmarks/bench_deploy_ct.py --peer-python /work/venv-llmc/bin/python [--hidden 256]

lwpipe: `lwpipe recipe=gptq_w4 model.path=LLAMA ... pipeline=[quantize,export]
++stages.export.format=compressed_tensors` (4-bit symmetric levels -8..7, groups of 128, lm_head and
embeddings kept); llm-compressor: QuantizationModifier scheme W4A16 (the same grid) on every Linear but
lm_head, saved compressed (benchmarks/peer_llmcompressor_deploy.py, in its own venv). Prints one JSON line:
the safetensors bytes of both (target: lwpipe's <= 1.1x the peer's) and the largest logits difference,
relative to the largest logit, between transformers' load of lwpipe's directory and lwpipe.load(model.lwp)
on the held-out texts (target <= 1e-4).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchmarks.deploy_models import lwpipe_run, save_llama, texts, write_texts  # noqa: E402


def logits_diff(run: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lwpipe

    out = run / "export" / "compressed_tensors"
    deployed = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    model = lwpipe.load(run / "model.lwp").eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok(texts(32, 2), return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = model(**ids).logits, deployed(**ids).logits
    return float((a - b).abs().max() / a.abs().max())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--peer-python", required=True, help="python of a venv with llmcompressor")
    p.add_argument("--hidden", type=int, default=256)
    a = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model = save_llama(root / "llama", a.hidden)
        calib, test = write_texts(root)
        lwpipe_run(model, calib, test, root / "run", "++stages.export.format=compressed_tensors")
        info = json.loads((root / "run" / "export.json").read_text())["compressed_tensors"]
        peer_cmd = [a.peer_python, str(HERE / "peer_llmcompressor_deploy.py"), str(model), str(root / "peer")]
        peer = json.loads(subprocess.run(peer_cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        ratio = info["safetensors_bytes"] / peer["safetensors_bytes"]
        diff = logits_diff(root / "run")
        print(
            json.dumps(
                {
                    "lwpipe_safetensors_bytes": info["safetensors_bytes"],
                    "llmcompressor_safetensors_bytes": peer["safetensors_bytes"],
                    "ratio": round(ratio, 4),
                    "ratio_within_1.1": ratio <= 1.1,
                    "formats": [info["quantization_format"], peer["format"]],
                    "logits_max_rel_diff": diff,
                    "logits_within_1e-4": diff <= 1e-4,
                }
            )
        )


if __name__ == "__main__":
    main()
