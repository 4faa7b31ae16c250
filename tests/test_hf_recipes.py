"""The text recipes end to end on tiny random transformers built in-process, and their bad inputs."""

import json
import sys

import pytest
import torch

import lwpipe
from lwpipe import checkpoint
from lwpipe.config import validate
from lwpipe.errors import ConfigError, LwpipeError
from lwpipe.runner import run
from tests.helpers import compose_recipe, run_recipe
from tests.hf_helpers import make_texts, save_bert, save_gpt2, save_sentence_model, write_csv, write_txt

pytestmark = pytest.mark.slow
SMALL = ["cache=false", "logger.console=null", "data.batch_size=8", "data.max_length=16", "eval.batch_size=16"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    rows = make_texts(96)
    return {
        "bert": save_bert(root / "bert"),
        "encoder": save_bert(root / "encoder", "encoder"),
        "gpt2": save_gpt2(root / "gpt2", tied=False),
        "st": save_sentence_model(root / "st"),
        "train.csv": write_csv(root / "train.csv", rows[:64]),
        "test.csv": write_csv(root / "test.csv", rows[64:]),
        "train.txt": write_txt(root / "train.txt", rows[:64]),
        "test.txt": write_txt(root / "test.txt", rows[64:]),
        "root": root,
    }


def args(files, recipe, model, train, test):
    return [
        f"recipe={recipe}",
        f"model.path={files[model]}",
        f"data.train={files[train]}",
        f"data.test={files[test]}",
        *SMALL,
    ]


def assert_artifact_is_the_final_model(run_dir, model, batch, last: str):
    loaded = lwpipe.load(run_dir / "model.lwp")  # rebuilt from the stored transformers config: no model dir
    final = checkpoint.load_state(model, run_dir / "checkpoints" / last).eval()
    with torch.no_grad():
        a, b = loaded(**batch), final(**batch)
    a, b = (getattr(a, "logits", a), getattr(b, "logits", b))
    assert torch.equal(a, b)


def test_bert_text_classification(files, tmp_path):
    from transformers import AutoTokenizer

    from lwpipe.models.hf import load_hf

    final, records = run_recipe(
        args(files, "bert_text_classification", "bert", "train.csv", "test.csv")
        + ["stages.train.lr=3e-3", "stages.train.epochs=4", "stages.prune.criterion=taylor"],
        tmp_path,
    )
    ends = [r for r in records if r["event"] != "epoch"]
    assert [r["stage"] for r in ends] == ["input", "train", "prune", "share", "quantize", "distill"]
    for r in records:
        assert r["metric"] == "accuracy" and r["quality"] == r["accuracy"]
        assert {"accuracy", "loss", "teacher_agreement", "sparsity", "params"} <= set(r)
    assert ends[1]["accuracy"] > 0.7  # the generated word families are learnable: the task's loss trains
    assert ends[2]["sparsity"] > 0.2 and ends[-1]["compression_ratio"] > ends[1]["compression_ratio"]
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))  # the documented sidecar
    batch = dict(tok(["apple pear the", "gear clutch"], padding=True, return_tensors="pt"))
    assert_artifact_is_the_final_model(tmp_path, load_hf(str(files["bert"]))[0], batch, "05_distill.safetensors")


def test_gpt2_causal_lm(files, tmp_path):
    from lwpipe.models.hf import load_hf

    final, records = run_recipe(args(files, "gpt2_causal_lm", "gpt2", "train.txt", "test.txt"), tmp_path)
    base = records[0]
    assert base["metric"] == "perplexity" and base["quality"] == base["perplexity"] > 1
    assert base["teacher_agreement"] == 1.0 and final["teacher_agreement"] <= 1.0
    assert final["quality"] == final["perplexity"]
    batch = {"input_ids": torch.tensor([[2, 5, 7, 9]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert_artifact_is_the_final_model(
        tmp_path, load_hf(str(files["gpt2"]), "causal_lm")[0], batch, "04_distill.safetensors"
    )


def test_sentence_embedding(files, tmp_path):
    from lwpipe.models.sentence import load_sentence_transformer

    final, records = run_recipe(args(files, "sentence_embedding", "st", "train.txt", "test.txt"), tmp_path)
    assert records[0]["metric"] == "cosine" and records[0]["quality"] == 1.0
    assert 0.5 < final["quality"] == final["cosine"] <= 1.0 and final["accuracy"] is None
    assert final["compression_ratio"] > 2
    batch = {"input_ids": torch.tensor([[2, 5, 7, 9, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    assert_artifact_is_the_final_model(
        tmp_path, load_sentence_transformer(str(files["st"]))[0], batch, "01_quantize.safetensors"
    )


def test_builtin_corpus_without_data_files(files, tmp_path):
    final, records = run_recipe(
        [
            "recipe=bert_text_classification",
            f"model.path={files['bert']}",
            "model.num_labels=4",
            "data.limit_train=24",
            "data.limit_test=12",
            "pipeline=[train,prune]",
            "stages.train.epochs=1",
            *SMALL,
        ],
        tmp_path,
    )
    assert final["metric"] == "accuracy" and 0 <= final["quality"] <= 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["baseline"]["quality"] is not None


def test_custom_model_and_data_need_no_lenet_keys(tmp_path, monkeypatch):
    (tmp_path / "mypkg.py").write_text(
        "import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
        "def build(width=16):\n    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))\n"
        "def data():\n    g = torch.Generator().manual_seed(0)\n    x = torch.randn(96, 6, generator=g)\n"
        "    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()\n"
        "    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mypkg", raising=False)
    final, records = run_recipe(
        [
            "model=custom",
            "model._target_=mypkg.build",
            "+model.width=8",
            "data=custom",
            "data._target_=mypkg.data",
            "stages.train.epochs=2",
            "stages.prune.finetune.epochs=1",
            "stages.share.finetune.epochs=0",
            "stages.quantize.finetune.epochs=0",
            "stages.distill.epochs=1",
            "logger.console=null",
        ],
        tmp_path / "run",
    )
    assert final["metric"] == "accuracy" and final["sparsity"] > 0.5  # the default recipe, no fc3 setting
    assert (tmp_path / "run" / "model.lwp").exists()


def fails(overrides, match):
    with pytest.raises((ConfigError, LwpipeError), match=match) as e:
        run(validate(compose_recipe(overrides)), "unused-run-dir")
    assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line_errors_before_any_work(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = args(files, "bert_text_classification", "bert", "train.csv", "test.csv")
    fails([*base, f"model.path={tmp_path / 'nope'}"], "model.path=.*directory does not exist")
    (tmp_path / "empty").mkdir()
    fails([*base, f"model.path={tmp_path / 'empty'}"], r"config.json is missing")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((files["bert"] / "config.json").read_text())
    fails([*base, f"model.path={tmp_path / 'noweights'}"], r"no weights file \(model.safetensors")
    fails(["recipe=bert_text_classification", *SMALL], r"model.path='\?\?\?': required")
    fails([*args(files, "gpt2_causal_lm", "encoder", "train.txt", "test.txt")], "not a causal")
    fails([*base, "data.text_column=sentence"], "data.text_column='sentence': no such column .*text, label")
    three = write_csv(tmp_path / "three.csv", [("apple pear", 0), ("engine", 2)])
    fails([*base, f"data.test={three}"], "data.label_column=2: label outside the model's 2 classes")
    fails([*args(files, "bert_text_classification", "bert", "train.txt", "test.txt")], "a .txt file has no labels")
    fails([*base, "objective=[perplexity]"], r"objective\[0\]='perplexity': task text_classification does not")


def test_a_tokenizer_that_does_not_match_the_model(files, tmp_path):
    from tests.hf_helpers import bert_tokenizer

    big = tmp_path / "bigtok"
    bert_tokenizer(extra=100).save_pretrained(str(big))
    fails(
        [*args(files, "bert_text_classification", "bert", "train.csv", "test.csv"), f"data.tokenizer={big}"],
        "data.tokenizer=.*has 142 tokens but the model embeds 42",
    )


def test_cli_finds_a_module_in_the_working_directory_and_bad_paths_exit_2(files, tmp_path):
    from tests.test_cli import lwpipe as cli

    (tmp_path / "mypkg.py").write_text(
        "import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
        "def build():\n    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))\n"
        "def data():\n    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))\n"
        "    y = (x[:, 0] > 0).long()\n    return TensorDataset(x[:48], y[:48]), TensorDataset(x[48:], y[48:])\n"
    )
    p = cli(
        [
            "model=custom",
            "model._target_=mypkg.build",
            "data=custom",
            "data._target_=mypkg.data",
            "pipeline=[train,prune]",
            "stages.train.epochs=1",
            "stages.prune.finetune.epochs=0",
            "cache=false",
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    p = cli(["recipe=sentence_embedding", f"model.path={tmp_path / 'missing'}", "cache=false"], tmp_path)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "model.path=" in p.stderr and "directory" in p.stderr


def test_a_decoder_classifies_text_too(files, tmp_path):
    """GPT-2 has no pad token: the classifier head gets end-of-text, as data=text pads with it."""
    final, records = run_recipe(
        [
            *args(files, "bert_text_classification", "gpt2", "train.csv", "test.csv"),
            "pipeline=[prune]",
            "stages.prune.finetune.epochs=0",
        ],
        tmp_path,
    )
    assert final["metric"] == "accuracy" and 0 <= final["quality"] <= 1


FRESH = """
import sys, torch
sys.modules["lwpipe"] = None  # the exported file must not need lwpipe
path, x_path, y_path = sys.argv[1:]
m = torch.export.load(path).module() if path.endswith(".pt2") else torch.jit.load(path)
out = m(**torch.load(x_path))
out = out if isinstance(out, torch.Tensor) else out["logits"] if isinstance(out, dict) else out.logits
torch.save(out, y_path)
"""


@pytest.mark.parametrize(
    "recipe,model,fmt",
    [
        ("bert_text_classification", "bert", "int8"),
        ("bert_text_classification", "bert", "dense"),
        ("sentence_embedding", "st", "int8"),
        ("gpt2_causal_lm", "gpt2", "sparse"),
    ],
)
def test_export_of_transformers_loads_without_lwpipe(files, recipe, model, fmt, tmp_path):
    """A text model's export: traced with its keyword inputs, any batch and sequence length, scored by its task."""
    import subprocess

    from lwpipe import export

    data = ("train.txt", "test.txt") if model != "bert" else ("train.csv", "test.csv")
    final, _ = run_recipe(
        args(files, recipe, model, *data)
        + [
            "pipeline=[quantize,export]",
            "++stages.quantize.bits=8",
            "++stages.quantize.scheme=symmetric",
            "++stages.quantize.finetune.epochs=0",
            f"+stages.export.format={fmt}",
            *(["+stages.export.min_sparsity=0.0"] if fmt == "sparse" else []),
            "measure.latency=true",
            "measure.repeats=3",
            "measure.warmup=1",
        ],
        tmp_path,
    )
    info = json.loads((tmp_path / "export.json").read_text())
    assert info["format"] == fmt and info["metric"] == final["metric"]
    assert info["agreement_with_model"] >= (0.99 if fmt != "int8" else 0.9)  # int8 activations round: a little drift
    assert final["latency_ms"]["1"] > 0  # the runner timed the exported form through the task's forward
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(files[model]))
    batch = dict(
        tok(["the apple is red and very old pear plum", "a gear", "motor"], padding=True, return_tensors="pt")
    )  # 3 rows, a length no test batch had
    torch.save(batch, tmp_path / "x.pt")
    subprocess.run(
        [sys.executable, "-c", FRESH, str(tmp_path / info["file"]), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        check=True,
        cwd=tmp_path,
    )
    with torch.no_grad():
        out = export.load_form(tmp_path / info["file"])(**batch)
    out = out if isinstance(out, torch.Tensor) else out["logits"] if isinstance(out, dict) else out.logits
    assert torch.allclose(torch.load(tmp_path / "y.pt"), out)


def test_static_int8_on_a_text_model_is_refused_before_any_work(files, tmp_path):
    with pytest.raises(ConfigError, match=r"stages.export.activations='static': dynamic or auto for text models"):
        run_recipe(
            args(files, "bert_text_classification", "bert", "train.csv", "test.csv")
            + ["pipeline=[quantize,export]", "+stages.export.format=int8", "+stages.export.activations=static"],
            tmp_path,
        )
    assert not (tmp_path / "checkpoints").exists()


def test_a_tokenizer_that_knows_none_of_the_words_is_refused(files, tmp_path):
    from transformers import BertTokenizer

    from lwpipe.data.text import load_text

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zebra", "quartz"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(str(tmp_path / "tok"))
    with pytest.raises(
        ConfigError,
        match=r"data.tokenizer=.*turns 100% of the tokens of data.train into its "
        r"unknown token '\[UNK\]'",
    ):
        load_text(str(files["train.csv"]), str(files["test.csv"]), str(tmp_path / "tok"))
    load_text(str(files["train.csv"]), str(files["test.csv"]), str(files["bert"]))  # the model's own: fine
