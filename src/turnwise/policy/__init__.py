"""turnwise.policy: the model side of the loop.

Loading (`load_policy`: a local Hugging Face directory or the built-in tiny model), chat
rendering per model family with token-exact bridging between turns and parsing of content,
reasoning and tool calls (`ChatFormat`, i.e. `policy.renderers.Renderer`), the batched sampler
(`SamplerEngine`), the trainer's logprobs (`token_logprobs`, same convention as the sampler),
and in `policy.checkpoint` LoRA adapters and HF-format checkpoints (imported on demand
because it pulls in `peft`).
"""

from turnwise.policy.chat import ChatFormat
from turnwise.policy.load import ModelLoadError, load_policy
from turnwise.policy.logprobs import token_logprobs
from turnwise.policy.sampler import EngineClosedError, PromptTooLongError, SamplerEngine
from turnwise.policy.tiny import tiny_model_dir
from turnwise.policy.tokenizer import build_tiny_tokenizer

__all__ = ["ChatFormat", "EngineClosedError", "ModelLoadError", "PromptTooLongError", "SamplerEngine",
           "build_tiny_tokenizer", "load_policy", "tiny_model_dir", "token_logprobs"]
