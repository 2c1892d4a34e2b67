"""vllm.tokenizers.get_tokenizer: transformers' tokenizer of the folder."""


def get_tokenizer(name, tokenizer_mode="auto", trust_remote_code=False, revision=None, **other):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
