"""Where the tests' data lives, and the builder of tiny random-weight Llama models that conftest's fixtures use."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Converting the starter GGUF takes ~30 s; keep the result between local runs (CI starts clean anyway).
TEST_DATA = ROOT / ".cache" / "test-data"


def _word_token_ids(tokenizer, limit: int = 400) -> list[int]:
    """Ids of tokens that are a space plus a lowercase word and re-encode to themselves."""
    ids = []
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if token.startswith("Ġ") and token[1:].isalpha() and token[1:].islower() and len(token) > 3:
            if tokenizer(" " + token[1:], add_special_tokens=False)["input_ids"] == [token_id]:
                ids.append(token_id)
                if len(ids) == limit:
                    break
    return ids


def build_tiny_model(starter: Path, out: Path, *, words_only: bool = False, template: bool = True) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer and chat template.

    words_only: the output layer can only pick whole-word tokens or the end-of-turn token, so replies
    re-tokenize to exactly the ids that were sampled, as real models' replies almost always do.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(starter)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Larger logits than the default init, so greedy picks are far from ties.
        model.lm_head.weight.mul_(20)
        if words_only:
            allowed = torch.zeros(config.vocab_size, dtype=torch.bool)
            allowed[_word_token_ids(tokenizer)] = True
            allowed[tokenizer.eos_token_id] = True
            # Zero rows give logit 0; the best of ~400 random allowed logits is positive all but never.
            model.lm_head.weight[~allowed] = 0
    model.save_pretrained(out)
    if not template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(out)
    if not template:
        for name in ("chat_template.jinja", "chat_template.json"):
            (out / name).unlink(missing_ok=True)
    return out
