"""Training on the tiny model: LoRA/full runs, label masking, CLI, config validation, MLflow."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sft_pipeline.training import TrainingConfig, build_trainer, train

REPO = Path(__file__).resolve().parents[1]

_PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Write a short poem about the sea.", "The sea is wide and grey and calm."),
    ("Classify the sentiment: I love it.", "positive"),
    ("List three ideas for a birthday party.", "a picnic, a treasure hunt, a movie night"),
    ("Answer with a letter. A B C D", "Answer: B"),
    ("Extract the names of all people mentioned in the text.", "Paris"),
]


def write_tiny_sft_dataset(model_dir, out_dir, n_train: int = 24, n_val: int = 8, n_test: int = 4) -> Path:
    """Write {train,validation,test}.parquet in the tokenization-stage contract from the tiny tokenizer.

    Labels are -100 on the system/user turns and the assistant header, the token ids elsewhere.
    """
    import pandas as pd
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def row(i: int) -> dict:
        prompt, answer = _PAIRS[i % len(_PAIRS)]
        msgs = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"{prompt} ({i})"}]
        prefix = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = prefix + answer + "<|im_end|>\n"
        prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"]
        assert ids[: len(prefix_ids)] == prefix_ids
        labels = [-100] * len(prefix_ids) + ids[len(prefix_ids):]
        return {"id": f"row{i:04d}", "input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": labels, "length": len(ids)}

    start = 0
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        pd.DataFrame([row(start + i) for i in range(n)]).to_parquet(out_dir / f"{split}.parquet", index=False)
        start += n
    return out_dir


@pytest.fixture(scope="module")
def tiny_dataset_dir(tiny_model_dir, tmp_path_factory):
    return write_tiny_sft_dataset(tiny_model_dir, tmp_path_factory.mktemp("sft_dataset"))


def _cfg(tiny_model_dir, dataset_dir, out, **kw) -> TrainingConfig:
    base = dict(model_dir=str(tiny_model_dir), dataset_dir=str(dataset_dir), output_dir=str(out),
                max_steps=5, eval_steps=2, per_device_train_batch_size=4, learning_rate=1e-3)
    base.update(kw)
    return TrainingConfig(**base)


@pytest.fixture(scope="module")
def lora_result(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    return train(_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path_factory.mktemp("lora_run")))


def test_lora_training_produces_adapter_and_history(lora_result):
    r = lora_result
    assert math.isfinite(r.train_loss) and r.train_loss > 0
    assert r.eval_loss is not None and math.isfinite(r.eval_loss)
    adapter = Path(r.adapter_dir)
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer_config.json").is_file()  # the folder loads on its own
    assert r.model_dir is None
    steps = [h["step"] for h in r.history if "loss" in h]
    assert steps == [1, 2, 3, 4, 5]  # logging_steps=1: one loss per optimizer step
    assert all("learning_rate" in h for h in r.history if "loss" in h)
    assert [h["step"] for h in r.history if "eval_loss" in h] == [2, 4, 5]  # every eval_steps + final
    assert 0 < r.trainable_parameters < r.total_parameters
    assert r.global_step == 5
    assert r.tokens_seen > 0 and r.tokens_per_second > 0
    assert r.mlflow_run_id is None

    record = json.loads((Path(r.output_dir) / "training_record.json").read_text())
    assert record["train_loss"] == r.train_loss
    assert record["config"]["method"] == "lora"


def test_tokens_seen_counts_non_pad_tokens(lora_result, tiny_dataset_dir):
    import pandas as pd

    lengths = pd.read_parquet(tiny_dataset_dir / "train.parquet")["length"]
    # 5 steps x 4 rows out of 24: some rows, never padding (that would exceed the longest rows).
    assert lengths.min() * 20 <= lora_result.tokens_seen <= lengths.max() * 20


def test_collator_keeps_provided_labels(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """The batch the model sees has the Parquet input_ids unchanged and -100 where labels were masked."""
    import pandas as pd
    import torch

    trainer, tok, _ = build_trainer(_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, seed=0))
    df = pd.read_parquet(tiny_dataset_dir / "train.parquet")
    rows = {tuple(r.input_ids): list(r.labels) for r in df.itertuples()}
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) >= {"input_ids", "labels", "attention_mask"}
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        key = tuple(ids[:n].tolist())
        assert key in rows, "TRL re-tokenized or altered input_ids"
        assert labels[:n].tolist() == rows[key]  # masked prompt tokens stay -100
        assert (labels[n:] == -100).all()  # padding is never trained on
        assert (ids[n:] == tok.pad_token_id).all()
    # Loss equals a manual mean over supervised (shifted) tokens only.
    model = trainer.model.eval()
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    logits = out.logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                               ignore_index=-100)
    assert torch.isclose(out.loss, manual, atol=1e-5)


def test_full_finetune_saves_model(tiny_model_dir, tiny_dataset_dir, tmp_path):
    r = train(_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, method="full", max_steps=2, learning_rate=1e-4))
    assert r.adapter_dir is None
    assert (Path(r.model_dir) / "model.safetensors").is_file()
    assert r.trainable_parameters == r.total_parameters
    assert math.isfinite(r.train_loss)


def test_empty_validation_skips_eval(tiny_model_dir, tmp_path):
    data = write_tiny_sft_dataset(tiny_model_dir, tmp_path / "data", n_train=8, n_val=0, n_test=0)
    r = train(_cfg(tiny_model_dir, data, tmp_path / "out", max_steps=2))
    assert r.eval_loss is None and r.validation_rows == 0
    assert not any("eval_loss" in h for h in r.history)


@pytest.mark.parametrize(
    "override, field_name",
    [
        ({"method": "qlora"}, "method"),
        ({"method": "dpo"}, "method"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"lr_scheduler_type": "zigzag"}, "lr_scheduler_type"),
        ({"lora_target_modules": []}, "lora_target_modules"),
        ({"max_steps": 0, "num_train_epochs": 0.0}, "num_train_epochs"),
    ],
)
def test_bad_config_names_the_field(override, field_name, tmp_path):
    kw = dict(model_dir="m", dataset_dir="d", output_dir=str(tmp_path)) | override
    with pytest.raises(ValueError, match=field_name):
        TrainingConfig(**kw)


def test_config_json_roundtrip_and_unknown_field(tmp_path):
    cfg = TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", mlflow_tags={"a": "1"})
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(cfg.to_dict()))
    assert TrainingConfig.from_json(p) == cfg
    p.write_text(json.dumps(cfg.to_dict() | {"lerning_rate": 1e-3}))
    with pytest.raises(ValueError, match="lerning_rate"):
        TrainingConfig.from_json(p)
    assert set(TrainingConfig.help()) == {f for f in cfg.to_dict()} and all(TrainingConfig.help().values())


def test_missing_dataset_names_the_field(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset_dir"):
        train(_cfg(tiny_model_dir, tmp_path / "nowhere", tmp_path / "out"))


def test_cli_runs_in_subprocess(tiny_model_dir, tiny_dataset_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", max_steps=2)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    result_path = tmp_path / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "sft_pipeline.training", "--config", str(cfg_path), "--output-json", str(result_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["global_step"] == 2 and math.isfinite(result["train_loss"])
    assert (Path(result["adapter_dir"]) / "adapter_model.safetensors").is_file()


def test_mlflow_logs_per_step_metrics(tiny_model_dir, tiny_dataset_dir, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _cfg(tiny_model_dir, tiny_dataset_dir, tmp_path / "out", max_steps=4,
               mlflow_tracking_uri=uri, mlflow_run_name="tiny", mlflow_tags={"dagster_run_id": "abc123"})
    r = train(cfg)
    assert r.mlflow_run_id
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(r.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny"
    assert run.data.tags["dagster_run_id"] == "abc123"
    assert run.data.params["method"] == "lora" and run.data.params["max_steps"] == "4"
    train_loss = client.get_metric_history(r.mlflow_run_id, "train_loss")
    assert sorted(m.step for m in train_loss) == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(r.mlflow_run_id, "learning_rate")] == [1, 2, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(r.mlflow_run_id, "eval_loss")) == [2, 4]
    assert run.data.metrics["final_train_loss"] == pytest.approx(r.train_loss)
    # artifacts live beside the DB, not in the current directory
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert "training_record.json" in [f.path for f in client.list_artifacts(r.mlflow_run_id)]


def test_import_needs_neither_mlflow_nor_dagster():
    """Importing and configuring pulls in neither mlflow/dagster (absent on a GPU box) nor torch (slow)."""
    code = ("import sys, sft_pipeline.training as t; t.TrainingConfig(model_dir='m', dataset_dir='d', output_dir='o');"
            "print(sorted(m for m in ('mlflow', 'dagster', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
