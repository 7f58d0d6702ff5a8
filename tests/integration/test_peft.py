"""LoRA with the real peft on converted models: train, save the adapter, reload it with `AutoPeftModel*`, merge.

The reference is the trained `PeftModel` itself: the reloaded adapter and the merged model must give its outputs.
A model whose estimators were drawn in memory (not loaded from `name_or_path`) cannot be rebuilt by peft, which
reloads the base from that path: saving its adapter must fail loudly rather than reload an unconverted base.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    LoraConfig,
    get_peft_model,
)

import hf_lara

from .utils import SETUPS, assert_close, hparams, make_inputs, run

CASES = {
    # family: base class, its Auto class, peft's Auto class, task type, LoRA targets, method
    "bert": (
        transformers.BertForSequenceClassification,
        transformers.AutoModelForSequenceClassification,
        AutoPeftModelForSequenceClassification,
        "SEQ_CLS",
        ["query", "value"],
        "lara",
    ),
    "llama": (
        transformers.LlamaForCausalLM,
        transformers.AutoModelForCausalLM,
        AutoPeftModelForCausalLM,
        "CAUSAL_LM",
        ["q_proj", "v_proj"],
        "rfa",
    ),
}


def save_base(family: str, folder) -> str:
    torch.manual_seed(0)
    base_class = CASES[family][0]
    base_class(SETUPS[family].config_class(**SETUPS[family].config_kwargs, num_labels=2)).save_pretrained(folder)
    return str(folder)


def lora(model, family: str, task_type: str | None = "default"):
    _, _, _, task, targets, _ = CASES[family]
    config = LoraConfig(
        task_type=task if task_type == "default" else task_type,
        r=4,
        target_modules=targets,
        init_lora_weights=False,  # non-zero B: the adapter changes the outputs from the start
    )
    return get_peft_model(model, config)


def train_step(peft_model, inputs: dict[str, torch.Tensor], family: str) -> None:
    peft_model.train()
    labels = {"labels": torch.tensor([0, 1])} if family == "bert" else {"labels": inputs["input_ids"]}
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    peft_model(**inputs, **labels).loss.backward()
    optimizer.step()
    peft_model.eval()


@pytest.mark.parametrize("family", list(CASES))
def test_lora_on_a_converted_checkpoint_saves_reloads_and_merges(family, tmp_path):
    base_class, auto_class, auto_peft, _, _, method = CASES[family]
    base = save_base(family, tmp_path / "base")
    inputs = make_inputs(SETUPS[family])
    # convert, save the converted model, start from it (its estimators now live in a checkpoint)
    hf_lara.convert(base_class.from_pretrained(base), method, **hparams(method)).save_pretrained(tmp_path / "conv")
    model = auto_class.from_pretrained(tmp_path / "conv").eval()
    assert type(model).__name__ == f"Lara{base_class.__name__}"
    unadapted = run(model, inputs)
    peft_model = lora(model, family)
    train_step(peft_model, inputs, family)
    expected = run(peft_model, inputs)
    assert (expected - unadapted).abs().max() > 1e-4  # the adapter matters
    peft_model.save_pretrained(tmp_path / "adapter")

    reloaded = auto_peft.from_pretrained(tmp_path / "adapter").eval()
    assert type(reloaded.get_base_model()) is type(model)
    assert_close(run(reloaded, inputs), expected, msg="AutoPeftModel reload")
    merged = reloaded.merge_and_unload()
    assert type(merged) is type(model)
    assert_close(run(merged, inputs), expected, atol=1e-5, msg="merged")


@pytest.mark.parametrize("save_embedding_layers", ["auto", False], ids=["embeddings-auto", "no-embeddings"])
@pytest.mark.parametrize("how", ["convert", "config"])
def test_adapter_of_a_model_converted_in_memory_fails_loudly(how, save_embedding_layers, tmp_path):
    """Estimators drawn in memory exist in no checkpoint: peft would rebuild the unconverted base from the path.

    With `save_embedding_layers=False` peft never loads the base config, which is where the refusal used to come
    from: the adapter was saved and reloaded silently onto the unconverted model."""
    base_class, auto_class, _, _, _, method = CASES["llama"]
    base = save_base("llama", tmp_path / "base")
    if how == "convert":
        model = hf_lara.convert(base_class.from_pretrained(base), method, **hparams(method))
    else:
        config = hf_lara.LaraConfig.from_pretrained(base, method=method, **hparams(method))
        model = auto_class.from_pretrained(base, config=config)
    peft_model = lora(model, "llama")
    with pytest.raises(ValueError, match=r"not converted.*save_pretrained\(dir\)`, load it back"):
        peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=save_embedding_layers)
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapter" / "adapter_config.json").exists()


def test_adapter_without_task_type_reloads_through_the_auto_mapping(tmp_path):
    """Without a task type peft records the converted class by module and name, behind its import allow-list."""
    base_class, auto_class, _, _, _, method = CASES["llama"]
    base = save_base("llama", tmp_path / "base")
    hf_lara.convert(base_class.from_pretrained(base), method, **hparams(method)).save_pretrained(tmp_path / "conv")
    peft_model = lora(auto_class.from_pretrained(tmp_path / "conv").eval(), "llama", task_type=None)
    inputs = make_inputs(SETUPS["llama"])
    expected = run(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="import allowlist"):
        AutoPeftModel.from_pretrained(tmp_path / "adapter")
    reloaded = AutoPeftModel.from_pretrained(tmp_path / "adapter", import_allowlist=["hf_lara"]).eval()
    assert type(reloaded.get_base_model()) is type(peft_model.get_base_model())
    assert_close(run(reloaded, inputs), expected)
