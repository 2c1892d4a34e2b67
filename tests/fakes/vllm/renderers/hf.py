"""vllm.renderers.hf.resolve_chat_template: the tokenizer's own template, as vLLM resolves it for a
folder that has one."""


def resolve_chat_template(tokenizer, chat_template=None, tools=None, model_config=None, **other):
    return chat_template or tokenizer.chat_template
