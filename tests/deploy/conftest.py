"""Tiny GPT-2 and Llama causal LMs built from configs, with text files, for the deployable formats."""

import pytest

from tests.hf_helpers import make_texts, save_bert, save_gpt2, save_llama, write_csv, write_txt

SMALL = [
    "logger.console=null",
    "data.batch_size=8",
    "data.max_length=16",
    "eval.batch_size=16",
    "calibration.samples=16",
]


@pytest.fixture(scope="session")
def lm_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    rows = make_texts(64)
    return {
        "gpt2": save_gpt2(root / "gpt2"),
        "llama": save_llama(root / "llama"),
        "bert": save_bert(root / "bert"),
        "train": write_txt(root / "train.txt", rows[:40]),
        "test": write_txt(root / "test.txt", rows[40:]),
        "csv_train": write_csv(root / "train.csv", rows[:40]),
        "csv_test": write_csv(root / "test.csv", rows[40:]),
    }


def lm_args(files, model, *extra):
    return [
        "recipe=gptq_w4",
        "model=hf",
        "task=causal_lm",
        f"model.path={files[model]}",
        f"data.train={files['train']}",
        f"data.test={files['test']}",
        "pipeline=[quantize,export]",
        *SMALL,
        *extra,
    ]


def bert_args(files, *extra):
    args = lm_args(files, "bert", *extra)
    swap = {"task=causal_lm": "task=text_classification"}
    swap[f"data.train={files['train']}"] = f"data.train={files['csv_train']}"
    swap[f"data.test={files['test']}"] = f"data.test={files['csv_test']}"
    return [swap.get(a, a) for a in args]
