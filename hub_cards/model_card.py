"""Model card of a stage checkpoint, rendered with `huggingface_hub.ModelCard`."""

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


TEMPLATE_PATH = Path(__file__).resolve().parent / "model_card_template.md"
WIDGET = [
    {
        "text": "What is shown in this image?",
        "src": "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/coco_sample.png",
    }
]


def render_model_card(
    *,
    model_name: str,
    stage: str,
    tune: str,
    vision_model: str,
    language_model: str,
    config,
    chat_template: str,
    data: str,
    num_samples: int,
    hyperparameters: dict,
    final_loss: float | None,
    repo_id: str | None = None,
    datasets: list[str] | None = None,
    has_projector: bool = False,
    projector_file: str = "mm_projector.safetensors",
    license: str = "apache-2.0",
    system_prompt: str | None = None,
) -> ModelCard:
    """The card: Hub metadata (`pipeline_tag: image-text-to-text`, widget, base parts) + parts, data, settings, loss."""
    base_models = [m for m in (vision_model, language_model) if m and not Path(m).exists()]
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["llava", "llava_plugin", "image-text-to-text", "trl", "sft", stage],
        base_model=base_models or None,
        datasets=datasets or None,
        widget=WIDGET,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        stage=stage,
        stage_title={"stage1": "stage-1 (feature alignment)", "stage2": "stage-2 (visual instruction tuning)"}[stage],
        description="",
        tune=tune,
        repo_id=repo_id or model_name,
        vision_model=vision_model,
        language_model=language_model,
        projector_type=config.projector_type,
        vision_feature_layer=config.vision_feature_layer,
        select_strategy=config.vision_feature_select_strategy,
        image_seq_length=config.image_seq_length,
        chat_template=chat_template,
        system_prompt=system_prompt,
        data=data,
        num_samples=num_samples,
        hyperparameters=hyperparameters,
        final_loss="n/a" if final_loss is None else f"{final_loss:.4f}",
        has_projector=has_projector,
        projector_file=projector_file,
    )
