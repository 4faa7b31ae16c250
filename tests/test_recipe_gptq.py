"""recipe=gptq_w4 and recipe=sparsegpt_24_w4 end to end on tiny transformers models built from configs."""

import pytest
import torch

import lwpipe
from lwpipe.constraints import compressible_layers, constraint
from tests.helpers import run_recipe
from tests.hf_helpers import make_texts, save_gpt2, save_llama, word_tokenizer, write_txt

pytestmark = pytest.mark.slow
SMALL = [
    "cache=false",
    "logger.console=null",
    "data.batch_size=8",
    "data.max_length=16",
    "eval.batch_size=16",
    "stages.quantize.group_size=16",
    "calibration.samples=32",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    rows = make_texts(96)
    return {
        "gpt2": save_gpt2(root / "gpt2"),
        "llama": save_llama(root / "llama"),
        "train": write_txt(root / "train.txt", rows[:64]),
        "test": write_txt(root / "test.txt", rows[64:]),
    }


def args(files, recipe, model):
    return [
        f"recipe={recipe}",
        "model=hf",
        "task=causal_lm",
        f"model.path={files[model]}",
        f"data.train={files['train']}",
        f"data.test={files['test']}",
        *SMALL,
    ]


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_gptq_w4_quantizes_the_linear_layers_in_groups_and_keeps_embeddings_and_head(files, tmp_path, model):
    final, records = run_recipe(args(files, "gptq_w4", model), tmp_path)
    end = [r for r in records if r.get("event") == "stage_end" and r["stage"] == "quantize"][0]
    assert end["gptq_error"] and end["gptq_rounded_layers"] == []
    loaded = lwpipe.load(tmp_path / "model.lwp", constrained=True)
    kinds = {}
    for name, m in compressible_layers(loaded):
        c = constraint(m)
        kinds[name] = None if c is None or not c.quantized else (c.qmin, c.qmax, c.group)
    embeddings = [n for n, m in compressible_layers(loaded) if isinstance(m, torch.nn.Embedding)]
    assert embeddings and all(kinds[n] is None for n in embeddings)
    quantized = [k for k in kinds.values() if k is not None]
    assert quantized and set(quantized) == {(-8, 7, 16)}
    if model == "llama":
        assert kinds["lm_head"] is None  # the output head stays as it is
    assert 1 < records[0]["perplexity"] and final["perplexity"] < 10 * records[0]["perplexity"]


@pytest.mark.parametrize("sequential", ["true", "false"])
def test_sparsegpt_24_w4_keeps_two_of_every_four_and_quantizes_them(files, tmp_path, sequential):
    final, records = run_recipe(
        [*args(files, "sparsegpt_24_w4", "llama"), f"calibration.sequential={sequential}"], tmp_path
    )
    loaded = lwpipe.load(tmp_path / "model.lwp", constrained=True)  # the runner verified it against the model
    blocks = [(n, m) for n, m in compressible_layers(loaded) if n.startswith("model.layers.")]
    assert len(blocks) == 14  # 2 blocks of q, k, v, o, gate, up, down
    for name, proj in blocks:
        w = proj.weight.detach()
        assert ((w != 0).view(w.shape[0], -1, 4).sum(2) <= 2).all(), name
        assert constraint(proj).group == 16 and constraint(proj).quantized
    assert constraint(dict(loaded.named_modules())["model.embed_tokens"]) is None
    assert final["sparsity"] > 0.3 and final["perplexity"] < 10 * records[0]["perplexity"]


def test_a_bf16_checkpoint_stays_bf16_through_gptq_w4_and_its_file(files, tmp_path):
    from transformers import LlamaForCausalLM

    bf16 = tmp_path / "llama-bf16"
    LlamaForCausalLM.from_pretrained(str(files["llama"])).to(torch.bfloat16).save_pretrained(str(bf16))

    word_tokenizer().save_pretrained(str(bf16))
    final, records = run_recipe(
        [*args(files, "gptq_w4", "llama")[:3], f"model.path={bf16}", *args(files, "gptq_w4", "llama")[4:]],
        tmp_path / "run",
    )
    assert final["perplexity"] > 1  # the run verified its own model.lwp before reporting
    loaded = lwpipe.load(tmp_path / "run" / "model.lwp")
    proj = dict(loaded.named_modules())["model.layers.1.mlp.up_proj"]
    assert proj.weight.dtype == torch.bfloat16
    batch = {"input_ids": torch.tensor([[2, 5, 7, 9]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        assert torch.isfinite(loaded(**batch).logits.float()).all()


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_a_group_wider_than_a_layers_inputs_is_one_group_and_the_file_loads(files, tmp_path, method):
    """The tiny GPT-2's layers have 32 or 128 inputs: group_size=64 is one group of 32 on the former (the
    file once stored 64 there, and its own decode refused it)."""
    rtn = ["stages.quantize.method=rtn", "~stages.quantize.act_order", "~stages.quantize.damp"]
    extra = [] if method == "gptq" else rtn
    cli = [a for a in args(files, "gptq_w4", "gpt2") if not a.startswith("stages.quantize.group_size")]
    run_recipe([*cli, "stages.quantize.group_size=64", *extra], tmp_path)
    loaded = lwpipe.load(tmp_path / "model.lwp", constrained=True)
    groups = {}
    for name, m in compressible_layers(loaded):
        c = constraint(m)
        if c is not None and c.quantized:
            groups[name] = (c.group, m.weight.shape)
    assert groups and {g for g, _ in groups.values()} == {32, 64}
