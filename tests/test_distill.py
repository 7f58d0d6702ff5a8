"""`hf_lara.distill` and `hf-lara distill`: losses fall, errors fall against an independent measurement, the merged
model saves and loads, the time budget holds; `convert(keep_softmax=K)` leaves the worst layers on softmax."""

from __future__ import annotations

import copy
import dataclasses
import json
import time

import pytest
import torch
import transformers

import hf_lara
from hf_lara.distill import (
    DISTILL_KEY,
    DistillConfig,
    attention_transfer,
    capture_attention_inputs,
    captured_transfer_loss,
    end_to_end,
    estimator_parameters,
    layer_loss,
    length_batches,
    register_distillation_attention,
    student_attention_losses,
    transfer_loss,
)
from hf_lara.fidelity import attention_fidelity

from . import tiny

# a longer random vocabulary stream makes inputs where the tiny estimators are far from exact
TRAIN_TEXTS = [" ".join(tiny.WORDS[(i * 7 + j * 3) % len(tiny.WORDS)] for j in range(8 + i % 17)) for i in range(48)]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train much faster on one thread, and far more predictably on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.tokenizer(tmp_path_factory.mktemp("tok"))


def tiny_bert(num_layers: int = 2, seed: int = 0) -> transformers.BertModel:
    """A tiny BERT whose attention is peaked (weights 25x the usual init scale): at the usual scale a random model
    attends almost uniformly, which every estimator reproduces to 1e-6 and leaves nothing to distil."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        **{**tiny.BERT, "num_hidden_layers": num_layers, "max_position_embeddings": 64, "initializer_range": 0.5}
    )
    return transformers.BertModel(config).eval()


def quiet(**kwargs) -> DistillConfig:
    return DistillConfig(progress=False, **kwargs)


def test_distillation_attention_forwards_the_teacher(tok):
    """Under the stage-1 implementation the model computes exactly what the unconverted model computes."""
    original = tiny_bert()
    converted = hf_lara.convert(copy.deepcopy(original), "kernel", feature_map="hedgehog")
    batch = tiny.batch(tok)
    register_distillation_attention()
    converted.set_attn_implementation(DISTILL_KEY)
    with torch.no_grad():
        out = converted(**batch).last_hidden_state
        ref = original(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(out[mask], ref[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "method,hparams",
    [
        ("kernel", {"feature_map": "hedgehog"}),
        ("kernel", {"feature_map": "hedgehog", "window_size": 2}),
        ("rfa", {"num_features": 8, "window_size": 2, "learn_features": True}),
        ("eva", tiny.HPARAMS["eva"]),
    ],
    ids=["kernel", "kernel-window2", "rfa-window2", "eva"],
)
def test_attention_transfer_lowers_loss_and_measured_error(tok, method, hparams):
    model = hf_lara.convert(tiny_bert(), method, **hparams)
    frozen = {n: p.clone() for n, p in model.named_parameters() if "lara_attention" not in n}
    batches = length_batches(tok, TRAIN_TEXTS, max_length=64, batch_tokens=256)
    before = attention_fidelity(model, batches).mean_attention_error
    stats = attention_transfer(model, batches, quiet(max_steps=60, stage1_lr=2e-2), seconds=60)
    after = attention_fidelity(model, batches).mean_attention_error
    assert stats["steps"] == 60
    assert stats["loss_last"] < 0.7 * stats["loss_first"], stats
    # the independent teacher-forced measurement (hf_lara.fidelity) agrees that the estimators got closer
    assert after < 0.7 * before, (before, after)
    # only estimator parameters moved
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert model.config._attn_implementation == hf_lara.integration.ATTENTION_KEY


def test_captured_stage1_loss_is_the_measured_attention_error(tok):
    """Stage 1 trains on tensors captured from one teacher pass: each layer's loss on them equals the teacher-forced
    attention error that `hf_lara.fidelity` measures independently (module hooks, exact model), padding included."""
    model = hf_lara.convert(tiny_bert(num_layers=3), "kernel", feature_map="hedgehog", window_size=2)
    batch = length_batches(tok, TRAIN_TEXTS[:12], max_length=64, batch_tokens=4096)[0]
    assert not batch["attention_mask"].all(), "the batch must hold padding"
    calls = capture_attention_inputs(model, batch)
    assert [m for m, _ in calls] == hf_lara.distill.attention_modules(model)
    measured = attention_fidelity(model, batch).attention_error
    with torch.no_grad():
        losses = [captured_transfer_loss(module, call).item() for module, call in calls]
    assert min(measured) > 1e-3  # far from exact, so the comparison means something
    assert losses == pytest.approx(measured, rel=1e-4)
    # the captured teacher output is softmax attention on the captured inputs
    module, call = calls[1]
    mask = call.padding_mask[:, None, None, :]
    scores = (call.query @ call.key.transpose(-1, -2) * call.scale).masked_fill(~mask, float("-inf"))
    rows = call.padding_mask[:, None, :, None]
    torch.testing.assert_close((scores.softmax(-1) @ call.value) * rows, call.teacher * rows, rtol=1e-5, atol=1e-5)


def test_stage1_reuse_takes_several_steps_per_teacher_pass(tok, monkeypatch):
    model = hf_lara.convert(tiny_bert(), "kernel", feature_map="hedgehog")
    batches = length_batches(tok, TRAIN_TEXTS, max_length=64, batch_tokens=256)
    passes = []
    original = hf_lara.distill.capture_attention_inputs
    monkeypatch.setattr(
        hf_lara.distill, "capture_attention_inputs", lambda *a, **k: passes.append(1) or original(*a, **k)
    )
    stats = attention_transfer(model, batches, quiet(max_steps=12, stage1_reuse=4, stage1_lr=2e-2), seconds=60)
    assert stats["steps"] == 12 and len(passes) == 3
    assert stats["loss_last"] < stats["loss_first"]


def test_layer_loss_is_the_relative_error_over_real_tokens():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 5, 4) for _ in range(3)]
    student = [t + 0.1 * torch.randn_like(t) for t in teacher]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    # padded positions are ignored whatever they hold
    student[0][0, 3:] = 1e3
    expected = (
        sum(
            ((s - t)[mask.bool()].square().sum() / t[mask.bool()].square().sum()).item()
            for s, t in zip(student, teacher)
        )
        / 3
    )
    assert layer_loss(student, teacher, mask).item() == pytest.approx(expected, rel=1e-5)


def test_row_cross_entropy_is_trained_too(tok):
    model = hf_lara.convert(tiny_bert(), "kernel", feature_map="hedgehog")
    batches = length_batches(tok, TRAIN_TEXTS, max_length=64, batch_tokens=256)
    stats = attention_transfer(model, batches, quiet(max_steps=20, rows_weight=0.5), seconds=60)
    assert stats["loss_last"] < stats["loss_first"]


def test_end_to_end_merges_and_reloads(tok, tmp_path):
    original = tiny_bert()
    model = hf_lara.convert(copy.deepcopy(original), "eva", **tiny.HPARAMS["eva"])
    batches = length_batches(tok, TRAIN_TEXTS, max_length=64, batch_tokens=256)

    def cosine(m):
        with torch.no_grad():
            return sum(
                torch.nn.functional.cosine_similarity(
                    hf_lara.distill.mean_pooler(m(**b).last_hidden_state, b["attention_mask"]),
                    hf_lara.distill.mean_pooler(original(**b).last_hidden_state, b["attention_mask"]),
                ).mean()
                for b in batches
            ) / len(batches)

    fresh = cosine(model)
    trained, stats = end_to_end(model, batches, quiet(max_steps=40, stage2_lr=5e-3, lora_rank=4), seconds=60)
    assert trained is model and type(model).__name__ == "LaraBertModel"
    assert stats["loss_last"] < stats["loss_first"]
    assert not any("lora_" in n for n, _ in model.named_parameters()), "adapters must be merged away"
    assert cosine(model) > fresh
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    batch = tiny.batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state)


def test_end_to_end_layer_matching_brings_every_layer_closer(tok):
    """`layer_weight`: the intermediate hidden states of the student move towards the unconverted model's."""
    original = tiny_bert(num_layers=3)
    model = hf_lara.convert(copy.deepcopy(original), "kernel", feature_map="hedgehog", window_size=2)
    batches = length_batches(tok, TRAIN_TEXTS, max_length=64, batch_tokens=256)

    def layer_errors(m):
        errors = torch.zeros(2)
        with torch.no_grad():
            for b in batches:
                mask = b["attention_mask"].bool()
                ours = m(**b, output_hidden_states=True).hidden_states[1:-1]
                ref = original(**b, output_hidden_states=True).hidden_states[1:-1]
                errors += torch.stack(
                    [(o - r)[mask].square().sum() / r[mask].square().sum() for o, r in zip(ours, ref)]
                )
        return errors / len(batches)

    before = layer_errors(model)
    config = quiet(max_steps=40, stage2_lr=5e-3, lora_rank=4, layer_weight=1.0)
    _, stats = end_to_end(model, batches, config, seconds=60)
    after = layer_errors(model)
    assert stats["loss_last"] < stats["loss_first"]
    assert (after < 0.8 * before).all(), (before, after)


def test_distill_config_rejects_bad_values():
    with pytest.raises(ValueError, match="stages"):
        DistillConfig(stages=(3,))
    with pytest.raises(ValueError, match="max_minutes"):
        DistillConfig(max_minutes=0)
    with pytest.raises(ValueError, match="stage1_reuse"):
        DistillConfig(stage1_reuse=0)
    with pytest.raises(ValueError, match="layer_weight"):
        DistillConfig(layer_weight=-1)
    with pytest.raises(ValueError, match="mixed_precision"):
        DistillConfig(mixed_precision="fp8")


def save_sentence_transformer(folder):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    bert = folder / "bert"
    tiny_bert().save_pretrained(bert)
    tiny.tokenizer(bert).save_pretrained(bert)
    transformer = Transformer(str(bert), max_seq_length=64)
    st = SentenceTransformer(modules=[transformer, Pooling(tiny.BERT["hidden_size"], pooling_mode="mean")])
    st.save(str(folder / "st"))
    return folder / "st"


def test_cli_distill_respects_budget_and_stays_a_sentence_transformer(tmp_path):
    from sentence_transformers import SentenceTransformer

    from hf_lara.cli import main

    src = save_sentence_transformer(tmp_path)
    train = tmp_path / "train.txt"
    train.write_text("\n".join(TRAIN_TEXTS * 20) + "\n")
    out = tmp_path / "out"
    budget = 0.05  # minutes: 3 s for both stages
    start = time.monotonic()
    code = main(["distill", str(src), str(out), "--method", "eva", "--hparam", "window_size=2", "--hparam",
                 "chunk_size=1", "--layer-hparam", "1:window_size=4", "--train_file", str(train), "--max_minutes",
                 str(budget), "--max_length", "64", "--batch_tokens", "64", "--no-progress"])  # fmt: skip
    wall = time.monotonic() - start
    assert code == 0
    results = json.loads((out / "distill_results.json").read_text())
    steps = {name: stage["steps"] for name, stage in results["stages"].items()}
    assert set(steps) == {"attention_transfer", "end_to_end"} and min(steps.values()) >= 1
    assert json.loads((out / "config.json").read_text())["lara_layer_hparams"] == {"1": {"window_size": 4}}
    # an option left out takes the `DistillConfig` default: the command trains as the Python API does
    given = {"max_minutes": budget, "max_length": 64, "batch_tokens": 64, "progress": False}
    expected = {**json.loads(json.dumps(dataclasses.asdict(DistillConfig()))), **given}
    assert results["config"] == expected
    # each stage stops at the first step past its budget: one tiny step (well under a second) of slack
    assert results["minutes"] < budget + 1.0 / 60, results["minutes"]
    assert wall < budget * 60 + 30  # loading, converting and saving included
    assert not list(tmp_path.glob(".out.tmp-*")), "the temporary folder must be renamed"
    st = SentenceTransformer(str(out), device="cpu")
    assert st[0].auto_model.config.lara_method == "eva"
    emb = st.encode(TRAIN_TEXTS[:3], convert_to_tensor=True)
    assert emb.shape == (3, tiny.BERT["hidden_size"]) and torch.isfinite(emb).all()


def test_cli_distill_refuses_bad_input_before_loading(tmp_path, capsys):
    from hf_lara.cli import main

    src = tmp_path / "bert"
    tiny.save_bert(src)
    train = tmp_path / "train.txt"
    train.write_text("a text\n")
    assert main(["distill", str(src), str(tmp_path / "o"), "--method", "nope", "--train_file", str(train)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["distill", str(src), str(tmp_path / "o"), "--method", "eva", "--train_file", "missing.txt"]) == 2
    assert main(["distill", str(src), str(tmp_path / "o"), "--method", "eva", "--stages", "3",
                 "--train_file", str(train)]) == 2  # fmt: skip
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ keep_softmax
def test_keep_softmax_leaves_the_worst_measured_layers_exact(tok, tmp_path):
    original = tiny_bert(num_layers=5)
    batch = length_batches(tok, TRAIN_TEXTS[:16], max_length=64, batch_tokens=4096)[0]
    torch.manual_seed(1)
    reference = hf_lara.convert(copy.deepcopy(original), "rfa", num_features=8)
    # independent measurement: hf_lara.fidelity feeds each layer the teacher's hidden states through module hooks
    errors = attention_fidelity(reference, batch).attention_error
    worst = sorted(range(5), key=lambda i: errors[i], reverse=True)[:2]

    torch.manual_seed(1)  # the same random features as `reference`
    model = hf_lara.convert(copy.deepcopy(original), "rfa", num_features=8, keep_softmax=2, calibration=batch)
    report = model.lara_calibration
    assert report.kept_softmax == worst
    for layer, error in report.errors.items():
        assert error == pytest.approx(errors[layer], rel=1e-4)
    assert sorted(model.lara_estimators()) == sorted(set(range(5)) - set(worst))
    assert model.config.lara_layers == sorted(set(range(5)) - set(worst))
    # the kept layers are exact: their teacher-forced error is zero; the saved model keeps the choice
    after = attention_fidelity(model, batch).attention_error
    assert all(after[i] == 0 for i in worst)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert sorted(loaded.lara_estimators()) == sorted(model.lara_estimators())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state)


def test_keep_softmax_checks_its_arguments(tok):
    with pytest.raises(ValueError, match="calibration"):
        hf_lara.convert(tiny_bert(), "rfa", keep_softmax=1)
    with pytest.raises(ValueError, match="keep_softmax"):
        hf_lara.convert(tiny_bert(), "rfa", keep_softmax=2, calibration=tiny.batch(tok))


def test_cli_convert_keep_softmax(tmp_path, capsys):
    from hf_lara.cli import main

    src = tiny.save_bert(tmp_path / "bert")
    assert main(["convert", str(src), str(tmp_path / "out"), "--method", "rfa", "--hparam", "num_features=8",
                 "--keep-softmax", "1"]) == 0  # fmt: skip
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert len(config["lara_layers"]) == 1 and config["lara_layers"][0] in (0, 1)
    kept = 1 - config["lara_layers"][0]
    printed = capsys.readouterr().out
    assert f"layer {kept:3d}: " in printed and "-> kept on softmax (largest errors)" in printed
    # `hf-lara fidelity` names the exact layer and the card's record of why
    assert main(["fidelity", str(tmp_path / "out"), "--num-samples", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"layers on exact softmax: [{kept}] (`keep_softmax=1` chose the layers with the largest `rfa`" in printed


def test_decoder_distillation_lowers_logits_kl(tok):
    """GPT-2 (Conv1D layers, causal): both stages run, LoRA merges, KL to the teacher's next-token law falls."""
    torch.manual_seed(0)
    original = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**tiny.GPT2, "initializer_range": 0.5})).eval()
    model = hf_lara.convert(copy.deepcopy(original), "kernel", feature_map="hedgehog")
    batches = length_batches(tok, TRAIN_TEXTS, max_length=64, batch_tokens=256)
    before = attention_fidelity(model, batches, teacher=original).metrics["logits_kl"]
    result = hf_lara.distill.distill(model, tok, TRAIN_TEXTS, quiet(max_steps=30, max_length=64, batch_tokens=256))
    after = attention_fidelity(model, batches, teacher=original).metrics["logits_kl"]
    assert set(result.stages) == {"attention_transfer", "end_to_end"}
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert after < 0.6 * before, (before, after)


def test_llama_distillation_with_window_and_sinks_then_finetune_and_generate(tok):
    """Llama (RoPE, grouped KV heads), causal window + sink tokens: both stages lower the logits KL, the model comes
    back as trainable as it was handed over (fine-tuning next must work), and greedy decoding through the recurrent
    cache equals greedy decoding by full forward passes."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tiny.VOCAB), hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.5, pad_token_id=0, bos_token_id=2,
        eos_token_id=None,  # no stop token: generate exactly max_new_tokens, as the loop below does
    )  # fmt: skip
    original = transformers.LlamaForCausalLM(config).eval()
    model = hf_lara.convert(copy.deepcopy(original), "kernel", feature_map="hedgehog", window_size=4, sink_tokens=1)
    batches = length_batches(tok, TRAIN_TEXTS, max_length=64, batch_tokens=256)
    before = attention_fidelity(model, batches, teacher=original).metrics["logits_kl"]
    hf_lara.distill.distill(model, tok, TRAIN_TEXTS, quiet(max_steps=30, max_length=64, batch_tokens=256))
    after = attention_fidelity(model, batches, teacher=original).metrics["logits_kl"]
    assert after < 0.6 * before, (before, after)
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    model(**batches[0], labels=batches[0]["input_ids"]).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    model.eval()
    prompt = tiny.batch(tok, ["the cat sat on the mat and then a big red dog ran to the park"])["input_ids"]
    with torch.no_grad():
        out = model.generate(prompt, do_sample=False, max_new_tokens=6, pad_token_id=0)
        ids = prompt
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_student_attention_losses_record_the_own_attention_error_and_train_estimators_only(tok):
    """The stage-2 regulariser: the model computes what it computes without it, each converted layer records the
    error of its estimator against softmax on its own queries, keys and values (layer 0 sees the same inputs as the
    teacher, so its loss is the independently measured teacher-forced error), and the loss reaches the estimator
    parameters only."""
    model = hf_lara.convert(tiny_bert(num_layers=2), "kernel", feature_map="hedgehog", window_size=2)
    batch = length_batches(tok, TRAIN_TEXTS[:12], max_length=64, batch_tokens=4096)[0]
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        plain = model(**batch).last_hidden_state
    measured = attention_fidelity(model, batch).attention_error
    model.requires_grad_(True)
    with student_attention_losses(model) as sinks:
        out = model(**batch).last_hidden_state
    assert model.config._attn_implementation == hf_lara.integration.ATTENTION_KEY
    torch.testing.assert_close(out[mask], plain[mask], rtol=1e-4, atol=1e-5)  # autograd vs inference path
    assert sorted(sinks) == [0, 1] and all(len(sink.losses) == 1 for sink in sinks.values())
    assert measured[0] > 1e-3 and sinks[0].losses[0].item() == pytest.approx(measured[0], rel=1e-4)
    estimators = estimator_parameters(model)  # (its probe clears gradients: before the backward pass)
    transfer_loss(model, sinks).backward()
    trained = {id(p) for p in estimators}
    for name, p in model.named_parameters():
        if id(p) not in trained:
            assert p.grad is None or not p.grad.any(), name
    assert any(p.grad is not None and p.grad.any() for p in estimators)


def test_end_to_end_with_transfer_regulariser(tok):
    """`transfer_weight` adds the (positive) attention-transfer loss to the first stage-2 step and still trains and
    merges; a layer kept on softmax keeps its gradient path (its adapters train)."""
    batches = length_batches(tok, TRAIN_TEXTS, max_length=64, batch_tokens=256)
    first = {}
    for weight in (0.0, 1.0):
        model = hf_lara.convert(tiny_bert(num_layers=2), "eva", layers=[1], **tiny.HPARAMS["eva"])
        softmax_layer = model.encoder.layer[0].attention.self.query.weight.clone()
        _, stats = end_to_end(model, batches, quiet(max_steps=6, lora_rank=4, transfer_weight=weight), seconds=60)
        first[weight] = stats["loss_first"]
        assert stats["steps"] == 6 and not any("lora_" in n for n, _ in model.named_parameters())
        assert not torch.equal(model.encoder.layer[0].attention.self.query.weight, softmax_layer)
    assert first[1.0] > first[0.0]
