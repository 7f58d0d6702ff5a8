"""`hf_lara.fidelity`: the report's numbers against an independent computation on tiny models."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import transformers

import hf_lara
from hf_lara.fidelity import FidelityReport, attention_fidelity, encode_texts, plot_attention_error, relative_mse

from . import tiny


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.tokenizer(tmp_path_factory.mktemp("tok"))


def bert_pair(method="rfa", layers=None, **hparams):
    """(original BertModel, converted copy)."""
    torch.manual_seed(0)
    original = transformers.BertModel(transformers.BertConfig(**tiny.BERT)).eval()
    converted = hf_lara.convert(copy.deepcopy(original), method, layers=layers, **hparams)
    return original, converted


def eager_self_attention(layer, hidden, mask):
    """BertSelfAttention by hand: softmax(QK^T / sqrt(D) + mask) V, heads merged -> (B, N, hidden)."""
    B, N, _ = hidden.shape
    H = layer.config.num_attention_heads
    D = layer.config.hidden_size // H

    def split(x):
        return x.view(B, N, H, D).transpose(1, 2)

    q, k, v = split(layer.query(hidden)), split(layer.key(hidden)), split(layer.value(hidden))
    logits = q @ k.transpose(-1, -2) / math.sqrt(D)
    logits = logits.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, H * D)


def test_encoder_numbers_match_hand_computation(tok):
    original, converted = bert_pair("rfa", num_features=8)
    batch = tiny.batch(tok)
    mask = batch["attention_mask"].bool()
    assert not mask.all(), "the batch must contain padding"
    report = attention_fidelity(converted, batch)

    with torch.no_grad():
        teacher = original(**batch, output_hidden_states=True)
        student = converted(**batch).last_hidden_state
        estimators = converted.lara_estimators()
        for i, layer in enumerate(original.encoder.layer):
            hidden = teacher.hidden_states[i]  # the input of layer i in the original model
            ref = eager_self_attention(layer.attention.self, hidden, mask)
            self_attn = converted.encoder.layer[i].attention.self
            B, N, _ = hidden.shape
            q, k, v = (
                lin(hidden).view(B, N, 2, 8).transpose(1, 2)
                for lin in (self_attn.query, self_attn.key, self_attn.value)
            )
            out = estimators[i](q, k, v, padding_mask=mask, scale=8**-0.5).transpose(1, 2).reshape(B, N, 16)
            expected = ((out - ref)[mask].double().square().sum() / ref[mask].double().square().sum()).item()
            assert report.attention_error[i] == pytest.approx(expected, rel=1e-4), i
            assert expected > 1e-4  # rfa with 8 features is not exact

    hidden_t, hidden_s = teacher.last_hidden_state.double(), student.double()
    token_cos = torch.nn.functional.cosine_similarity(hidden_s[mask], hidden_t[mask], dim=-1).mean().item()
    w = mask[..., None].double()
    pooled = [(h * w).sum(1) / w.sum(1) for h in (hidden_t, hidden_s)]
    embed_cos = torch.nn.functional.cosine_similarity(pooled[1], pooled[0], dim=-1).mean().item()
    assert report.metrics["hidden_cosine"] == pytest.approx(token_cos, rel=1e-6)
    assert report.metrics["embedding_cosine"] == pytest.approx(embed_cos, rel=1e-6)
    assert report.num_sequences == 3 and report.num_tokens == int(mask.sum())
    assert report.mean_attention_error == pytest.approx(sum(report.attention_error) / 2)
    # end to end, layer 0 sees the same input as under teacher forcing
    assert report.attention_error_end_to_end[0] == pytest.approx(report.attention_error[0], rel=1e-6)


def test_decoder_perplexity_and_kl_match_hand_computation(tok):
    torch.manual_seed(0)
    original = transformers.GPT2LMHeadModel(transformers.GPT2Config(**tiny.GPT2)).eval()
    converted = hf_lara.convert(copy.deepcopy(original), "lara", num_landmarks=2)
    batch = {k: v for k, v in tiny.batch(tok).items() if k != "token_type_ids"}
    report = attention_fidelity(converted, batch)

    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out_t, out_s = original(**batch, labels=labels), converted(**batch, labels=labels)
    assert report.metrics["teacher_perplexity"] == pytest.approx(math.exp(out_t.loss.item()), rel=1e-5)
    assert report.metrics["perplexity"] == pytest.approx(math.exp(out_s.loss.item()), rel=1e-5)
    assert report.metrics["perplexity_ratio"] == pytest.approx(
        math.exp(out_s.loss.item() - out_t.loss.item()), rel=1e-5
    )
    mask = batch["attention_mask"].bool()
    logp_t, logp_s = out_t.logits.double().log_softmax(-1), out_s.logits.double().log_softmax(-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)[mask].mean().item()
    assert report.metrics["logits_kl"] == pytest.approx(kl, rel=1e-5) and kl > 0
    assert "embedding_cosine" not in report.metrics  # decoders get perplexity instead


def test_softmax_conversion_is_exact(tok):
    _, converted = bert_pair("softmax")
    report = attention_fidelity(converted, tiny.batch(tok))
    assert max(report.attention_error + report.attention_error_end_to_end) < 1e-10
    assert report.metrics["embedding_cosine"] == pytest.approx(1.0, abs=1e-9)


def test_layer_subset_and_model_state_restored(tok):
    _, converted = bert_pair("rfa", layers=[1], num_features=8)
    converted.train()
    report = attention_fidelity(converted, [tiny.batch(tok, tiny.TEXTS[:2]), tiny.batch(tok, tiny.TEXTS[2:])])
    assert report.converted_layers == [1]
    assert report.attention_error[0] < 1e-12 < report.attention_error[1]
    assert report.mean_attention_error == report.attention_error[1]
    assert report.num_sequences == 3
    assert converted.training and converted.config._attn_implementation == hf_lara.integration.ATTENTION_KEY


def test_separate_teacher_gives_the_same_report(tok):
    original, converted = bert_pair("rfa", num_features=8)
    batch = tiny.batch(tok)
    separate, itself = attention_fidelity(converted, batch, teacher=original), attention_fidelity(converted, batch)
    assert separate.attention_error == pytest.approx(itself.attention_error, rel=1e-5)
    assert separate.attention_error_end_to_end == pytest.approx(itself.attention_error_end_to_end, rel=1e-5)
    assert separate.metrics == pytest.approx(itself.metrics, rel=1e-6)


def test_report_json_round_trip_and_plot(tok, tmp_path):
    _, converted = bert_pair("rfa", num_features=8)
    report = attention_fidelity(converted, encode_texts(tok, tiny.TEXTS, batch_size=2))
    text = report.to_json(tmp_path / "r.json")
    assert json.loads(text)["mean_attention_error"] == report.mean_attention_error
    assert FidelityReport.from_json(tmp_path / "r.json") == report
    exact = FidelityReport("softmax", {}, [0, 1], [0.0, 0.0], [0.0, 0.0])
    png = plot_attention_error({"rfa": report, "softmax": exact}, tmp_path / "fig" / "e.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_relative_mse():
    ref = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert relative_mse(ref, ref) == 0.0
    assert relative_mse(torch.zeros(2, 2), ref) == 1.0
    assert relative_mse(ref + 1, ref) == pytest.approx(4 / 5)


def test_errors(tok):
    original, converted = bert_pair("rfa", num_features=8)
    with pytest.raises(ValueError, match="converted model"):
        attention_fidelity(original, tiny.batch(tok))
    with pytest.raises(ValueError, match="empty"):
        attention_fidelity(converted, [])
    with pytest.raises(ValueError, match="no non-empty text"):
        encode_texts(tok, ["", "  "])
