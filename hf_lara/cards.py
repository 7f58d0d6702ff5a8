"""Model cards of converted models, rendered from the Jinja template `model_cards/hf_lara_model_card.md`.

The card's YAML front matter holds what the Hub indexes (`base_model`, `library_name`, `tags`, `model-index`) and,
under the key `hf_lara`, everything the body is rendered from (method, hyper-parameters, layers, the `keep_softmax`
calibration, fidelity summary, training recipe). `update_card` re-renders a card from its own front matter plus new
facts, so updates are idempotent and never lose what an earlier step recorded.

The template ships inside the package (`hf_lara/templates/`); the top-level `model_cards/` of the repository holds
the canonical copy and a test keeps the two identical.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.models.auto import modeling_auto

from .fidelity import FidelityReport
from .integration.calibration import CalibrationReport

TEMPLATE_NAME = "hf_lara_model_card.md"
#: Front-matter key holding hf_lara's own record.
CARD_KEY = "hf_lara"
#: Placeholder for the repository id in the "How to use" snippet until the card is pushed.
REPO_PLACEHOLDER = "path/to/this/model"

METHOD_INFO = {
    "softmax": ("exact softmax attention", "This is the identity conversion: attention is still exact, quadratic."),
    "rfa": (
        "random feature attention",
        "Positive orthogonal random features approximate the softmax kernel; cost is linear in the length.",
    ),
    "ra": (
        "randomized attention",
        "An unbiased Monte-Carlo estimate of softmax attention (quadratic cost; the reference for LARA).",
    ),
    "lara": (
        "linear randomized attention (LARA)",
        "Multiple-proposal importance sampling of randomized attention; cost is linear in the length.",
    ),
    "eva": (
        "EVA (efficient attention via control variates)",
        "Exact attention inside local windows plus control-variate summaries of distant chunks; linear cost.",
    ),
    "kernel": (
        "trainable kernel attention",
        "A learned positive feature map replaces the softmax kernel; linear cost, meant to be distilled.",
    ),
}

# Auto classes named in the card, most specific first; the first whose mapping holds the base architecture wins.
AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForPreTraining", "MODEL_FOR_PRETRAINING_MAPPING_NAMES"),
)
#: The Hub's pipeline tag of each Auto class named in cards.
PIPELINE_TAGS = {
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModelForImageClassification": "image-classification",
    "AutoModel": "feature-extraction",
}


def template_path() -> Path:
    """The packaged card template."""
    return Path(__file__).with_name("templates") / TEMPLATE_NAME


def auto_class_name(config: PreTrainedConfig, architecture: str | None = None) -> str:
    """The `transformers` Auto class that loads a converted architecture (`AutoModel` by default).

    `architecture` defaults to `config.architectures[0]` (e.g. `LaraBertForMaskedLM`).
    """
    architecture = architecture or (getattr(config, "architectures", None) or [""])[0]
    architecture = architecture.removeprefix("Lara")
    base_type = config.model_type.removeprefix("lara_")
    for auto_name, mapping_name in AUTO_CLASSES:
        names = getattr(modeling_auto, mapping_name, {}).get(base_type, ())
        names = (names,) if isinstance(names, str) else tuple(names)
        if architecture in names:
            return auto_name
    return "AutoModel"


def _round(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def fidelity_summary(report: FidelityReport | Mapping[str, Any]) -> dict[str, Any]:
    """The part of a fidelity report recorded in the card, rounded to 4 significant digits."""
    report = report if isinstance(report, FidelityReport) else FidelityReport.from_dict(report)
    return {
        "attention_error": [_round(e) for e in report.attention_error],
        "mean_attention_error": _round(report.mean_attention_error),
        "metrics": {k: _round(v, 6) for k, v in report.metrics.items()},
        "num_sequences": report.num_sequences,
        "num_tokens": report.num_tokens,
    }


def calibration_summary(report: CalibrationReport | Mapping[str, Any]) -> dict[str, Any]:
    """Why layers run exact softmax, as recorded in the card: the `keep_softmax` calibration's per-layer errors
    (rounded to 4 significant digits, keyed by the layer as a string) and the layers it kept."""
    data = report.to_dict() if isinstance(report, CalibrationReport) else dict(report)
    errors = sorted((int(layer), error) for layer, error in data["errors"].items())
    return {
        "method": data["method"],
        "kept_softmax": [int(layer) for layer in data["kept_softmax"]],
        "errors": {str(layer): _round(error) for layer, error in errors},
        "num_tokens": int(data["num_tokens"]),
    }


def calibration_reason(summary: Mapping[str, Any]) -> str:
    """Why `keep_softmax` left its layers on softmax, in one clause: the errors that decided it."""
    kept = summary["kept_softmax"]
    others = [e for layer, e in summary["errors"].items() if int(layer) not in kept]
    worst = ", ".join(f"layer {layer}: {summary['errors'][str(layer)]:.3g}" for layer in kept)
    rest = f"; largest of the converted layers: {max(others):.3g}" if others else ""
    return (
        f"`keep_softmax={len(kept)}` chose the layers with the largest `{summary['method']}` attention error on "
        f"{summary['num_tokens']} calibration tokens ({worst}{rest})"
    )


def _check_base_model(base_model: str | None) -> str | None:
    if base_model is None:
        return None
    try:
        validate_repo_id(base_model)
    except HFValidationError as error:
        raise ValueError(
            f"`base_model` must be a Hub repository id like 'org/name', got {base_model!r}: {error}"
        ) from None
    return base_model


def build_card(
    config: PreTrainedConfig | PreTrainedModel,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    fidelity: FidelityReport | Mapping[str, Any] | None = None,
    recipe: str | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    model_name: str | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    datasets: list[str] | None = None,
    pipeline_tag: str | None = None,
    tags: Sequence[str] = (),
    calibration: CalibrationReport | Mapping[str, Any] | None = None,
) -> ModelCard:
    """Render the card of a converted model.

    Args:
        config (`PreTrainedConfig` or `PreTrainedModel`): the converted config (with `lara_method`, `lara_hparams`,
            `lara_layers`), or the converted model (whose class then names the architecture and Auto class).
        repo_id (`str`, *optional*): where the model lives on the Hub, used in the "How to use" snippet.
        base_model (`str`, *optional*): Hub id of the original checkpoint (the Hub links the two).
        fidelity (`FidelityReport` or `dict`, *optional*): a fidelity report or an earlier card's summary of one.
        recipe (`str`, *optional*): how the estimator was trained after conversion (Markdown).
        eval_results (`list[EvalResult]`, *optional*): evaluation results, written to the `model-index`.
        model_name, license, language, datasets: standard card metadata.
        pipeline_tag (`str`, *optional*): defaults to the task of the architecture's Auto class (`fill-mask`, ...).
        tags (`Sequence[str]`, *optional*): tags added to `hf-lara`, `linear-attention` and the method.
        calibration (`CalibrationReport` or `dict`, *optional*): the measurement of `convert(..., keep_softmax=K)`
            (or an earlier card's summary of it); defaults to the model's `lara_calibration` when a model is given.

    Returns:
        A `huggingface_hub.ModelCard`.
    """
    if isinstance(config, PreTrainedModel):
        calibration = calibration if calibration is not None else getattr(config, "lara_calibration", None)
        architecture, config = type(config).__name__, config.config
    else:
        architecture = (getattr(config, "architectures", None) or [None])[0]
    method = getattr(config, "lara_method", None)
    if method is None:
        raise ValueError(
            f"`config` must be a converted config (with `lara_method`), got `{type(config).__name__}`. "
            "Convert the model with `hf_lara.convert` first."
        )
    base_model = _check_base_model(base_model)
    if fidelity is None or (isinstance(fidelity, Mapping) and "converted_layers" not in fidelity):
        summary = None if fidelity is None else dict(fidelity)  # already a card's summary
    else:
        summary = fidelity_summary(fidelity)
    name = model_name or (repo_id.split("/")[-1] if repo_id else None)
    name = name or (f"{base_model.split('/')[-1]}-{method}" if base_model else f"{config.model_type}-{method}")
    record = {"method": method, "hparams": dict(config.lara_hparams), "layers": config.lara_layers}
    layer_hparams = dict(getattr(config, "lara_layer_hparams", None) or {})
    if layer_hparams:
        record["layer_hparams"] = layer_hparams
    if summary is not None:
        record["fidelity"] = summary
    calibration = None if calibration is None else calibration_summary(calibration)
    if calibration is not None:
        record["calibration"] = calibration
    if recipe:
        record["recipe"] = recipe
    auto_class = auto_class_name(config, architecture)
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        tags=list(dict.fromkeys(["hf-lara", "linear-attention", method, *tags])),
        model_name=name if eval_results else None,
        eval_results=list(eval_results) if eval_results else None,
        license=license,
        language=language,
        datasets=datasets,
        pipeline_tag=pipeline_tag or PIPELINE_TAGS.get(auto_class),
        **{CARD_KEY: record},
    )
    title, text = METHOD_INFO.get(method, (method, ""))
    num_layers = len(config.lara_layers) if config.lara_layers is not None else None
    layers_text = "all" if config.lara_layers is None else f"{config.lara_layers} ({num_layers} converted)"
    fidelity_view = None
    if summary is not None:
        fidelity_view = {
            **summary,
            "layers": list(range(len(summary["attention_error"]))),
            "attention_error": [f"{e:.3g}" for e in summary["attention_error"]],
            "mean_attention_error": f"{summary['mean_attention_error']:.3g}",
            "metrics": {k: f"{v:.4g}" for k, v in summary["metrics"].items()},
        }
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        model_name=name,
        base_model=base_model,
        method=method,
        method_title=title,
        method_summary=text,
        hparams=dict(config.lara_hparams),
        layer_hparams=layer_hparams,
        layers_text=layers_text,
        architecture=architecture or type(config).__name__,
        model_type=config.model_type,
        fidelity=fidelity_view,
        calibration=calibration and {**calibration, "reason": calibration_reason(calibration)},
        recipe=recipe,
        eval_results=eval_results,
        auto_class=auto_class,
        repo_id=repo_id or REPO_PLACEHOLDER,
    )


def is_hf_lara_card(card: ModelCard) -> bool:
    """True when the card was rendered by `build_card` (its front matter holds the `hf_lara` record)."""
    return isinstance(card.data.to_dict().get(CARD_KEY), dict)


def update_card(card: ModelCard, config: PreTrainedConfig, **updates: Any) -> ModelCard:
    """Re-render an hf_lara card with `updates` (the `build_card` arguments); what is not updated is kept.

    Rendering twice with the same facts gives the same text, so updates are idempotent.
    """
    if not is_hf_lara_card(card):
        raise ValueError("This card was not written by hf_lara (no `hf_lara` record in its front matter).")
    data = card.data.to_dict()
    record = data[CARD_KEY]
    kept = {
        "base_model": data.get("base_model"),
        "fidelity": record.get("fidelity"),
        "calibration": record.get("calibration"),
        "recipe": record.get("recipe"),
        "eval_results": card.data.eval_results,
        "license": data.get("license"),
        "language": data.get("language"),
        "datasets": data.get("datasets"),
        "pipeline_tag": data.get("pipeline_tag"),
        "model_name": card.data.model_name,
        "tags": [t for t in data.get("tags") or [] if t not in ("hf-lara", "linear-attention", record["method"])],
    }
    repo_id = updates.pop("repo_id", None) or _snippet_repo_id(card.text)
    return build_card(config, repo_id=repo_id, **{**kept, **updates})


def _snippet_repo_id(text: str) -> str | None:
    match = re.search(r'from_pretrained\("([^"]+)"\)', text)
    return None if match is None or match.group(1) == REPO_PLACEHOLDER else match.group(1)


def validate_card(card: ModelCard | str) -> None:
    """Offline checks of what the Hub's card validator checks; raises `ValueError` naming the problem.

    The front matter must be a YAML mapping that `ModelCard` parses back to the same data, with `library_name`,
    `tags` (a list of strings with `hf-lara`), a valid `base_model` id when present, a well-formed `model-index`
    when present, and the `hf_lara` record. (`ModelCard.validate()` asks the Hub itself and needs the network.)
    """
    text = card if isinstance(card, str) else str(card)
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
    if match is None:
        raise ValueError("The card has no YAML front matter (a block between two '---' lines at the top).")
    meta = yaml.safe_load(match.group(1))
    if not isinstance(meta, dict):
        raise ValueError(f"The card's front matter must be a YAML mapping, got {type(meta).__name__}.")
    reparsed = ModelCard(text)
    if reparsed.data.to_dict() != ModelCardData(**meta).to_dict():
        raise ValueError("The card's front matter does not survive a `ModelCard` round trip.")
    tags = meta.get("tags")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags) or "hf-lara" not in tags:
        raise ValueError(f"`tags` must be a list of strings including 'hf-lara', got {tags!r}.")
    if not isinstance(meta.get("library_name"), str):
        raise ValueError(f"`library_name` must be a string, got {meta.get('library_name')!r}.")
    _check_base_model(meta.get("base_model"))
    if "model-index" in meta:
        # raises on malformed entries, as the Hub does
        from huggingface_hub.repocard_data import model_index_to_eval_results

        try:
            model_index_to_eval_results(meta["model-index"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"The card's `model-index` is malformed: {error!r}") from None
    record = meta.get(CARD_KEY)
    if not isinstance(record, dict) or not isinstance(record.get("method"), str):
        raise ValueError(f"The card's `{CARD_KEY}` record must be a mapping with a `method`, got {record!r}.")
    json.dumps(record)


def load_folder_card(folder: str | Path) -> ModelCard | None:
    """The card in `folder/README.md`, or None (also when README.md is a symbolic link: it is never followed)."""
    path = Path(folder) / "README.md"
    return ModelCard.load(path) if path.is_file() and not path.is_symlink() else None
