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

    trainer, tok, _ = build_trainer(_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, seed=0, batching="padded"))
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
        ({"method": "8bit"}, "method"),
        ({"method": "dpo"}, "method"),
        ({"batching": "zigzag"}, "batching"),
        ({"launcher": "torchrun"}, "launcher"),
        ({"launcher": "python", "num_processes": 2}, "num_processes"),
        ({"load_best_model_at_end": False, "early_stopping_patience": 2}, "early_stopping_patience"),
        ({"freeze_trainable_layers": 0}, "freeze_trainable_layers"),
        ({"save_steps": 0}, "save_steps"),
        ({"peak_tflops": -1.0}, "peak_tflops"),
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


def test_checkpoints_must_line_up_with_evaluations(tiny_model_dir, tiny_dataset_dir, tmp_path):
    with pytest.raises(ValueError, match="save_steps"):
        build_trainer(_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, eval_steps=3, save_steps=10))


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
    assert run.data.tags["sft_pipeline.training_fingerprint"] == r.fingerprint
    # throughput and memory per logged step (step 1 has no previous log to measure from on a resume only)
    assert [m.step for m in client.get_metric_history(r.mlflow_run_id, "peak_memory_mib")][:4] == [1, 2, 3, 4]
    assert all(m.value > 0 for m in client.get_metric_history(r.mlflow_run_id, "tokens_per_second"))
    assert run.data.metrics["trainable_share"] == pytest.approx(r.trainable_parameters / r.total_parameters)
    # the training data as mlflow.data dataset inputs, with their split as context
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"sft_dataset_train", "sft_dataset_validation"}
    assert {t.value for t in inputs["sft_dataset_train"].tags} == {"train"}
    assert json.loads(inputs["sft_dataset_train"].dataset.profile)["num_rows"] == 24
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


# --------------------------------------------------------------------------------------------
# methods, batching, early stopping, launching


def test_padding_free_batch_is_one_row_and_gives_the_padded_loss(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """Padding-free batches concatenate rows (no pad token) and SDPA keeps them apart: same loss as padded."""
    import torch

    padded, tok, _ = build_trainer(_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path / "a", batching="padded"))
    free, _, _ = build_trainer(_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path / "b", batching="padding_free"))
    pb = next(iter(padded.get_train_dataloader()))
    fb = next(iter(free.get_train_dataloader()))
    assert "attention_mask" not in fb and fb["input_ids"].shape[0] == 1
    lengths = pb["attention_mask"].sum(1)
    assert fb["input_ids"].shape[1] == int(lengths.sum())  # not one pad token
    assert (fb["position_ids"][0] == 0).sum() == len(lengths)  # positions restart at every row
    rows = [ids[:n] for ids, n in zip(pb["input_ids"], lengths)]
    assert torch.equal(fb["input_ids"][0], torch.cat(rows))  # same rows, same order (same seed)
    model = padded.model.eval()
    with torch.no_grad():
        loss_padded = model(input_ids=pb["input_ids"], attention_mask=pb["attention_mask"], labels=pb["labels"]).loss
        loss_free = model(input_ids=fb["input_ids"], position_ids=fb["position_ids"], labels=fb["labels"]).loss
        # Without position_ids the rows would attend to each other: a different loss.
        leaky = model(input_ids=fb["input_ids"], labels=fb["labels"]).loss
    assert torch.isclose(loss_padded, loss_free, atol=1e-5)
    assert not torch.isclose(loss_padded, leaky, atol=1e-5)


def test_packed_batching_trains(tiny_model_dir, tiny_dataset_dir, tmp_path):
    r = train(_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, batching="packed", packing_length=128, max_steps=2))
    assert r.batching == "packed" and r.global_step == 2 and math.isfinite(r.train_loss)
    # rows are packed into 128-token blocks: each step sees more than 4 conversations' worth of tokens
    assert r.tokens_seen > 2 * 4 * 20


def test_freeze_trains_only_the_last_layers(tiny_model_dir, tiny_dataset_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    r = train(_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, method="freeze", freeze_trainable_layers=1,
                   max_steps=3, warmup_ratio=0.0, weight_decay=0.0))
    assert r.model_dir and r.adapter_dir is None
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    after = load_file(str(Path(r.model_dir) / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing was trained"
    assert all(k.startswith(("model.layers.1.", "model.norm.")) for k in changed), changed
    assert not any(k.startswith(("model.layers.0.", "model.embed_tokens")) for k in changed)
    assert 0 < r.trainable_parameters < r.total_parameters


def test_early_stopping_keeps_the_best_checkpoint(tiny_model_dir, tiny_dataset_dir, tmp_path):
    # No decrease counts as an improvement (threshold 10): patience 2 stops after the 3rd evaluation.
    r = train(_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, max_steps=40, eval_steps=1, save_steps=1,
                   early_stopping_patience=2, early_stopping_threshold=10.0, save_total_limit=1))
    assert r.early_stopped and r.global_step == 3 < r.max_steps == 40
    evals = {h["step"]: h["eval_loss"] for h in r.history if "eval_loss" in h}
    best_step = min(evals, key=evals.get)
    assert r.best_checkpoint.endswith(f"checkpoint-{best_step}")
    assert r.eval_loss == pytest.approx(evals[best_step])
    assert Path(r.best_checkpoint).is_dir()  # save_total_limit never deletes the best one


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU error")
@pytest.mark.parametrize("override, field_name", [
    ({"method": "qlora"}, "method"),
    ({"use_liger_kernel": True}, "use_liger_kernel"),
    ({"attn_implementation": "flash_attention_2"}, "attn_implementation"),
    ({"bf16": True}, "bf16"),
])
def test_gpu_only_settings_fail_clearly_on_cpu(override, field_name, tiny_model_dir, tiny_dataset_dir, tmp_path):
    with pytest.raises((RuntimeError, ValueError), match=field_name) as info:
        train(_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, **override))
    assert "GPU" in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_on_gpu(tiny_model_dir, tiny_dataset_dir, tmp_path):
    r = train(_cfg(tiny_model_dir, tiny_dataset_dir, tmp_path, method="qlora", max_steps=2))
    assert r.adapter_dir and math.isfinite(r.train_loss) and r.mfu is None or r.mfu >= 0


def test_launch_command():
    from sft_pipeline.training import launch_command

    cfg = TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o")
    cmd = launch_command(cfg, "c.json", "r.json", python="py", cuda=False)
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "1" and "--cpu" in cmd
    assert cmd[-6:] == ["-m", "sft_pipeline.training", "--config", "c.json", "--output-json", "r.json"]
    gpu = launch_command(TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", num_processes=4),
                         "c.json", "r.json", cuda=True)
    assert "--multi_gpu" in gpu and "--cpu" not in gpu and gpu[gpu.index("--mixed_precision") + 1] == "bf16"
    plain = launch_command(TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", launcher="python"),
                           "c.json", "r.json", python="py")
    assert plain == ["py", "-m", "sft_pipeline.training", "--config", "c.json", "--output-json", "r.json"]
    with pytest.raises(ValueError, match="num_processes"):
        launch_command(TrainingConfig(model_dir="m", dataset_dir="d", output_dir="o", num_processes=2),
                       "c.json", "r.json", cuda=False)


def test_mfu_estimate():
    from sft_pipeline.training import model_flops_utilization

    # full fine-tuning: 6N FLOPs per token
    assert model_flops_utilization(1000.0, 10**9, 10**9, False, peak_tflops=600.0) == pytest.approx(0.01)
    # LoRA (few trainable): ~4N; recomputed activations add 2N
    assert model_flops_utilization(1000.0, 10**9, 0, False, peak_tflops=400.0) == pytest.approx(0.01)
    assert model_flops_utilization(1000.0, 10**9, 0, True, peak_tflops=600.0) == pytest.approx(0.01)
    assert model_flops_utilization(1000.0, 10**9, 0, False, device_name="NVIDIA H100 80GB HBM3") == \
        pytest.approx(4e12 / 989e12, abs=1e-4)
    assert model_flops_utilization(1000.0, 10**9, 0, False, device_name="cpu") is None


def test_docs_cover_every_field():
    text = (REPO / "docs" / "training.md").read_text()
    missing = [name for name in TrainingConfig.help() if f"`{name}`" not in text]
    assert not missing, f"docs/training.md does not describe {missing}"
