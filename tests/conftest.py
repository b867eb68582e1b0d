"""Shared fixtures: a tiny randomly initialised chat model built in code (no download)."""

import os

import pytest

# Tests never reach a model hub: a name that is not a local path fails at once.
os.environ["HF_HUB_OFFLINE"] = "1"

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from parlay import prompts
    from parlay.games import all_contexts, objective

    corpus = [prompts.system_prompt(c, "A", objective(0), 20) for c in all_contexts()[:50]]
    corpus += ["[message] I want the books and you take the hats.", "[propose] (1 book, 2 hats, 0 balls)"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    return fast


def tiny_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """(model, tokenizer, path): a tiny Llama saved to a local directory, as a user's model would be."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer))
    path = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, path


@pytest.fixture(scope="session")
def parrot_lm(tiny_lm, tmp_path_factory):
    """Path of a tiny model fully fine-tuned to answer every turn with one valid [message]: games
    with it have accepted turns (and never a deal), so the training loop has something to learn from."""
    from parlay import prompts
    from parlay.config import TrainConfig
    from parlay.games import all_contexts, objective
    from parlay.improve.examples import TrainExample
    from parlay.improve.sft import train

    _, tokenizer, path = tiny_lm
    examples = [
        TrainExample(
            messages=[
                {"role": "system", "content": prompts.system_prompt(ctx, player, objective(lam), 6)},
                {"role": "user", "content": "The negotiation starts now."},
                {"role": "assistant", "content": "[message] I want the books and you take the hats."},
            ]
        )
        for ctx in all_contexts()[::700]
        for player in "AB"
        for lam in (0, 1)
    ]
    out = tmp_path_factory.mktemp("parrot") / "model"
    train(examples, str(path), out, TrainConfig(lora=False, lr=1e-2, epochs=10, batch_size=8, grad_accum=1))
    tokenizer.save_pretrained(out)
    return out
