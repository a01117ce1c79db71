"""Upload a stage checkpoint folder (weights + code + processor + card) to the Hub."""

from huggingface_hub import HfApi


def push_checkpoint(folder, repo_id: str, token: str | None = None, private: bool = False,
                    endpoint: str | None = None, commit_message: str = "Upload LLaVA checkpoint") -> str:
    """Creates the model repo if needed and uploads `folder` (without Trainer `checkpoint-*` subfolders).

    `token=None` uses the saved login / `HF_TOKEN`; `endpoint=None` the Hub (or `HF_ENDPOINT`).
    """
    if not repo_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. 'user/llava-stage1').")
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message,
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**", "*.pt", "*.pth", "training_args.bin"],
    )
    return str(getattr(info, "commit_url", info))
