"""Conversations -> prompts through the tokenizer's chat template (what `LLM.chat` and
OpenAI chat-completion lines feed the engine)."""

from __future__ import annotations

from .errors import ConfigError


def is_conversation(x) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(m, dict) for m in x)


def conversations(messages) -> list[list[dict]]:
    """One conversation (a list of {"role", "content"}) or a list of them -> a list of them."""
    if is_conversation(messages) and messages and isinstance(messages[0], dict):
        return [list(messages)]
    if isinstance(messages, (list, tuple)) and all(is_conversation(c) for c in messages):
        return [list(c) for c in messages]
    raise ConfigError("chat messages must be a list of {'role': ..., 'content': ...} dicts, or a list of such lists")


def render(tokenizer, conv: list[dict], chat_template: str | None = None, add_generation_prompt: bool = True,
           continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> dict:
    """{"prompt": the rendered text, "prompt_token_ids": its tokens} for one conversation."""
    for i, m in enumerate(conv):
        if "role" not in m or "content" not in m:
            raise ConfigError(f"chat message {i} needs 'role' and 'content', got keys {sorted(m)}")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the model's tokenizer has no chat template: pass chat_template= (a Jinja string)")
    if continue_final_message and add_generation_prompt:
        raise ConfigError("continue_final_message needs add_generation_prompt=False")
    try:
        text = tokenizer.apply_chat_template(conv, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message,
                                             **(chat_template_kwargs or {}))
    except Exception as e:  # a template error is the caller's to fix: one line
        raise ConfigError(f"the chat template failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    # The template writes the special tokens (BOS) itself.
    return {"prompt": text, "prompt_token_ids": tokenizer(text, add_special_tokens=False)["input_ids"]}
