"""format: compressed_tensors: loads in transformers without lwpipe, logits equal to model.lwp's."""

import json

import pytest
import torch

import lwpipe
from lwpipe.errors import ConfigError, LwpipeError
from tests.deploy.conftest import lm_args
from tests.helpers import run_recipe
from tests.hf_helpers import save_llama

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.slow
FORMAT = "++stages.export.format=compressed_tensors"


@pytest.mark.parametrize(
    ("bits", "group", "packed"), [(4, 16, "weight_packed"), (8, None, "weight"), (4, 32, "weight_packed")]
)
def test_llama_loads_in_transformers_with_the_pipelines_logits(lm_files, tmp_path, bits, group, packed):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    grid = [f"stages.quantize.group_size={group}"] if group else ["stages.quantize.group_size=null"]
    grid += [] if group else ["stages.quantize.clip_search=false"]
    run_recipe(lm_args(lm_files, "llama", FORMAT, f"stages.quantize.bits={bits}", *grid), tmp_path)
    out = tmp_path / "export" / "compressed_tensors"
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == ("pack-quantized" if bits == 4 else "int-quantized")
    weights = next(iter(config["config_groups"].values()))["weights"]
    assert weights["num_bits"] == bits and weights["group_size"] == group
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        q = f.get_tensor(f"model.layers.0.self_attn.q_proj.{packed}")
        scale = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale")
    assert q.dtype == (torch.int32 if bits == 4 else torch.int8)
    assert scale.shape == (32, 32 // group if group else 1)

    deployed = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    model = lwpipe.load(tmp_path / "model.lwp").eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok(["the red apple and the small engine", "my old gear is very big"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = model(**ids).logits, deployed(**ids).logits
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-4
    info = json.loads((tmp_path / "export.json").read_text())["compressed_tensors"]
    assert info["quantized_layers"] == 14 and info["safetensors_bytes"] > 0
    assert info["check"]["loads"] and info["check"]["weights_exact"]  # the run's own read-back
    assert info["check"]["max_rel_diff"] <= 1e-4


def test_a_bf16_llama_is_served_with_exactly_the_pipelines_logits(lm_files, tmp_path):
    """Scales rounded to the model's dtype by the quantize stage: transformers' bf16 levels x scale equal
    lwpipe.load's weights to the bit (with float32 scales, compressed-tensors' bf16 copy of them differed)."""
    from transformers import AutoModelForCausalLM

    files = {**lm_files, "llama": save_llama(tmp_path / "bf16", torch.bfloat16)}
    run_recipe(lm_args(files, "llama", FORMAT, "stages.quantize.group_size=16", "model.dtype=bfloat16"), tmp_path)
    deployed = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export" / "compressed_tensors")).eval()
    model = lwpipe.load(tmp_path / "model.lwp").eval()
    assert next(deployed.parameters()).dtype == next(model.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([[3, 5, 7, 9, 11, 13], [4, 6, 8, 10, 12, 14]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, deployed(input_ids=ids).logits)
    check = json.loads((tmp_path / "export.json").read_text())["compressed_tensors"]["check"]
    assert check["weights_exact"] and check["max_rel_diff"] == 0.0  # the run's own check saw the same


@pytest.mark.parametrize(
    ("model", "extra", "match"),
    [
        ("gpt2", [], "Conv1D"),
        ("llama", ["stages.quantize.bits=3"], "4-bit or 8-bit"),
        (
            "llama",
            [
                "++stages.quantize.scheme=asymmetric",
                "stages.quantize.clip_search=false",
                "stages.quantize.full_range=false",
            ],
            "scheme=asymmetric",
        ),
    ],
)
def test_bad_inputs_are_refused_before_any_stage(lm_files, tmp_path, model, extra, match):
    with pytest.raises(LwpipeError, match=match):
        run_recipe(lm_args(lm_files, model, FORMAT, *extra), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists() or "stage_end" not in (tmp_path / "metrics.jsonl").read_text()


def test_a_model_that_is_not_transformers_and_codebooks_are_refused(tmp_path):
    args = ["model=lenet5", "data=digits", "task=classification", "pipeline=[quantize,export]", FORMAT]
    with pytest.raises(ConfigError, match="transformers"):
        run_recipe([*args, "logger.console=null"], tmp_path / "lenet")
    for fmt, why in ((FORMAT, "no k-means codebooks"), ("++stages.export.format=gguf", "codebooks are not GGUF")):
        args = ["model=lenet5", "data=digits", "task=classification", "pipeline=[share,quantize,export]", fmt]
        with pytest.raises(LwpipeError, match=why):
            run_recipe([*args, "logger.console=null"], tmp_path / "share")
