"""Training data that trains: TRL's SFTTrainer fine-tunes the embedded SmolLM2 for two steps, on
CPU, on the conversations ``critloop synth`` wrote (the `train` extra). Proof that the file is
consumable as it is, not a training recipe."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors import safe_open
from synth_script import write_training_file

from critloop.tools.embedded import CachedModel

if TYPE_CHECKING:
    from trl import SFTTrainer


def fine_tune_two_steps(model_dir: Path, data_file: Path, out_dir: Path) -> SFTTrainer:
    """Fine-tune the model in ``model_dir`` for two steps (batch 2) on the chats in ``data_file``, on
    CPU, in float32, saving nothing; returns the trainer.

    The loss covers the whole rendered chat: ``assistant_only_loss=True`` needs ``{% generation %}``
    markers, which SmolLM2's template lacks and TRL cannot patch in (it raises ValueError)."""
    from datasets import load_dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    dataset = load_dataset("json", data_files=str(data_file), split="train")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # Folders converted before critloop dropped it keep the GGUF `quantization_config` in their
    # config.json: loaded with it, the model counts as quantized and the Trainer refuses it.
    model_config = AutoConfig.from_pretrained(str(model_dir))
    if hasattr(model_config, "quantization_config"):
        del model_config.quantization_config
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), config=model_config, dtype=torch.float32)
    config = SFTConfig(
        output_dir=str(out_dir),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        max_length=256,
        report_to=[],
        save_strategy="no",
        dataset_num_proc=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer


@pytest.mark.slow
def test_sft_trains_two_steps_on_synthesized_conversations(embedded: CachedModel, tmp_path: Path) -> None:
    data_file = tmp_path / "train.jsonl"
    assert write_training_file(data_file)["conversations"] == 2
    # One weight to compare, read from disk (the model is loaded inside fine_tune_two_steps).
    name = "model.layers.0.mlp.down_proj.weight"
    with safe_open(str(embedded.path / "model.safetensors"), framework="pt") as weights:
        before = weights.get_tensor(name)

    trainer = fine_tune_two_steps(embedded.path, data_file, tmp_path / "out")

    assert trainer.state.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses, trainer.state.log_history
    assert all(math.isfinite(loss) and loss > 0 for loss in losses), losses
    train_loss = trainer.state.log_history[-1]["train_loss"]
    assert math.isfinite(train_loss) and train_loss > 0
    after = trainer.model.get_parameter(name).detach().cpu()
    assert not torch.equal(before, after)
