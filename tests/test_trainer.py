"""The transformers Trainer drives peft_sparse tuners unchanged: training, checkpoints, resume, callback."""

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from peft_sparse import BitFitConfig, LayerSelectConfig, SparseTrainerCallback, calibrate

from tiny_models import VOCAB, logits, make_batch, make_model


def dataset(n=32, seq=6):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)
    labels = (ids[:, 0] > VOCAB // 2).long()  # a learnable rule
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def args(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-2, report_to="none",
                    use_cpu=True, logging_steps=1, save_strategy="no", seed=0)
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


class SpyTuner:
    """Records the calls SparseTrainerCallback makes on a scheduled tuner."""

    def __init__(self):
        self.total, self.steps = None, []


def test_trainer_trains_bitfit_saves_checkpoints_and_resumes(tmp_path):
    model = get_peft_model(make_model("bert"), BitFitConfig(task_type="SEQ_CLS"))
    before = logits(model, make_batch("bert"))
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
                      train_dataset=dataset(), callbacks=[SparseTrainerCallback()])
    trainer.train()
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").exists()
    after = logits(model, make_batch("bert"))
    assert not torch.allclose(before, after)
    # Resuming from a checkpoint goes through PeftModel.load_adapter.
    resumed = get_peft_model(make_model("bert"), BitFitConfig(task_type="SEQ_CLS"))
    trainer = Trainer(model=resumed, args=args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
                      train_dataset=dataset(), callbacks=[SparseTrainerCallback()])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.state.global_step == 4
    loaded = PeftModel.from_pretrained(make_model("bert"), tmp_path / "checkpoint-4")
    torch.testing.assert_close(logits(loaded, make_batch("bert")), logits(resumed, make_batch("bert")))


def test_callback_drives_scheduled_tuners_once_per_optimizer_step(tmp_path):
    model = get_peft_model(make_model("bert"), BitFitConfig(task_type="SEQ_CLS"))
    tuner = model.base_model
    calls = SpyTuner()
    tuner.set_total_steps = lambda total: setattr(calls, "total", total)
    tuner.update_and_allocate = lambda step: calls.steps.append(step)
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=5, gradient_accumulation_steps=2),
                      train_dataset=dataset(), callbacks=[SparseTrainerCallback()])
    trainer.train()
    assert calls.total == 5
    assert calls.steps == [0, 1, 2, 3, 4]


def test_layerselect_calibrate_then_train_with_trainer(tmp_path):
    model = get_peft_model(make_model("bert"), LayerSelectConfig(task_type="SEQ_CLS", num_layers=1))
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=3), train_dataset=dataset(),
                      callbacks=[SparseTrainerCallback()])
    calibrate(model, trainer.get_train_dataloader(), num_batches=2)
    chosen = model.peft_config["default"].layers
    trainer.train()
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "layerselect_delta" in n}
    assert trained and all(f"encoder.layer.{chosen[0]}." in n for n in trained)
