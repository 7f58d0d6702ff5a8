"""Converted models inside the Transformers tools people already use: `Trainer` and `pipeline`."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments, pipeline

import hf_lara

from .tiny import GPT2, TEXTS, save_bert, tokenizer


def tiny_classifier(folder, method: str, **hparams) -> torch.nn.Module:
    save_bert(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    return hf_lara.convert(model, method, **hparams)


def test_trainer_trains_the_estimator_and_the_saved_model_reloads(tmp_path):
    model = tiny_classifier(tmp_path / "base", "kernel", num_features=8)
    tok = tokenizer(tmp_path / "base")
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if "lara_attention" in n}
    assert initial, "a kernel estimator has trainable parameters"
    rows = [dict(tok(text), labels=i % 2) for i, text in enumerate(TEXTS * 4)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        eval_dataset=rows,
        data_collator=transformers.DataCollatorWithPadding(tok),
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    moved = [n for n, p in model.named_parameters() if n in initial and not torch.equal(p, initial[n])]
    assert moved, "Trainer must update the estimator's parameters"

    trainer.save_model(str(tmp_path / "out"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "LaraBertForSequenceClassification"
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_feature_extraction_pipeline_runs_the_converted_model(tmp_path):
    save_bert(tmp_path / "base")
    tok = tokenizer(tmp_path / "base")
    original = transformers.BertModel.from_pretrained(tmp_path / "base").eval()
    converted = hf_lara.convert(transformers.BertModel.from_pretrained(tmp_path / "base"), "rfa", num_features=8)
    converted.eval()
    extract = pipeline("feature-extraction", model=converted, tokenizer=tok, device="cpu")
    text = TEXTS[1]
    features = torch.tensor(extract(text))[0]  # (N, hidden)
    with torch.no_grad():
        direct = converted(**tok(text, return_tensors="pt")).last_hidden_state[0]
        exact = original(**tok(text, return_tensors="pt")).last_hidden_state[0]
    torch.testing.assert_close(features, direct, rtol=0, atol=1e-6)
    # the pipeline ran the estimator, not softmax (a tiny random model's attention is near uniform, hence the scale)
    assert (features - exact).abs().max() > 1e-5


def generated_ids(model, tok, prompt: str) -> list[int]:
    generate = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    out = generate(prompt, max_new_tokens=8, do_sample=False, return_tensors=True, add_special_tokens=False)
    return out[0]["generated_token_ids"]


# hf_lara's own calls must not trigger Transformers' deprecation warnings (e.g. the 5.24 `cache` keyword)
@pytest.mark.filterwarnings("error::FutureWarning")
def test_text_generation_pipeline_runs_the_converted_decoder(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).save_pretrained(folder)
    tok = tokenizer(folder)
    prompt = "the big red dog ran"
    original = generated_ids(transformers.GPT2LMHeadModel.from_pretrained(folder).eval(), tok, prompt)
    exact = hf_lara.convert(transformers.GPT2LMHeadModel.from_pretrained(folder), "softmax").eval()
    assert generated_ids(exact, tok, prompt) == original

    recurrent = hf_lara.convert(transformers.GPT2LMHeadModel.from_pretrained(folder), "rfa", num_features=8).eval()
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert original[: ids.shape[1]] == ids[0].tolist() and len(original) > ids.shape[1]
    with torch.no_grad():
        expected = recurrent.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert generated_ids(recurrent, tok, prompt) == expected[0].tolist()
