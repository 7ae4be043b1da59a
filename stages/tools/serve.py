"""Serve a checkpoint behind an OpenAI-compatible API, with a chat page in the browser.

    make serve                                        # the latest complete policy stage of the run, on 127.0.0.1:8000
    make serve ARGS="stage=sft port=8001"
    RLHF_API_KEYS=sk-one,sk-two make serve ARGS="host=0.0.0.0 checkpoint=path/to/hf/folder"
    python -m stages.tools.serve limits.requests_per_minute=60 moderation.classifier=path/to/classifier

Then any OpenAI client works against it:
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-one")
    client.chat.completions.create(model=client.models.list().data[0].id, messages=[...], stream=True)

The API, limits and moderation are described in docs/serving.md; the code is in serving/.
"""

from __future__ import annotations

from omegaconf import DictConfig

from pipeline.core.entry import entry
from pipeline.core.runs import resolve_checkpoint


@entry("serve")
def main(cfg: DictConfig) -> None:
    from serving.server import serve

    path, label, _ = resolve_checkpoint(cfg)
    serve(cfg, path, label if cfg.checkpoint is None else path.name)


if __name__ == "__main__":
    main()
