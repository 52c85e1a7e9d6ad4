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


def _only_words(model, tokenizer) -> None:
    """Let the output layer pick only whole-word tokens or the end-of-turn token."""
    import torch

    weight = model.get_output_embeddings().weight
    allowed = torch.zeros(weight.shape[0], dtype=torch.bool)
    allowed[_word_token_ids(tokenizer)] = True
    allowed[tokenizer.eos_token_id] = True
    # Zero rows give logit 0; the best of ~400 random allowed logits is positive all but never.
    weight[~allowed] = 0


def build_tiny_model(starter: Path, out: Path, *, words_only: bool = False, template: bool = True) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer and chat template (template=False: none).

    words_only: the output layer can only pick whole-word tokens or the end-of-turn token, so replies
    re-tokenize to exactly the ids that were sampled, as real models' replies almost always do.
    """
    build_family_model(starter, out, "llama", words_only=words_only)
    if not template:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(out)
        tokenizer.chat_template = None
        tokenizer.save_pretrained(out)
        for name in ("chat_template.jinja", "chat_template.json"):
            (out / name).unlink(missing_ok=True)
    return out


# Templates in the style of each family's own, over SmolLM2's tokenizer (which lacks their special tokens, so
# they are spelled out in text: the cache contract only cares which tokens a render produces).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n"
    "{{ m.content }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content }}{{ eos_token }}"
    "{% else %}[INST] {{ m.content }}[/INST]{% endif %}{% endfor %}"
)
PHI_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
#: Qwen3's rule for earlier turns: an assistant message before the last user message loses its <think> block.
#: Its generation prompt opens an empty one, as Qwen3's does with enable_thinking=False, so every reply the
#: model makes holds a think block that the next render drops.
QWEN3_HISTORY = (
    "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m.role == 'user' %}"
    "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% set content = m.content %}"
    "{% if m.role == 'assistant' and loop.index0 < ns.last and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ content }}<|im_end|>\n{% endfor %}"
)
QWEN3_THINKING_TEMPLATE = (
    QWEN3_HISTORY + "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
)

#: Without the final soft cap: it squashes our scaled-up logits into near-ties that fp noise decides.
_GEMMA = {"head_dim": 16, "sliding_window": 16, "final_logit_softcapping": None}

#: family -> (transformers config class name, extra config fields, chat template or None for SmolLM2's)
FAMILIES = {
    "llama": ("LlamaConfig", {}, None),
    "qwen2": ("Qwen2Config", {}, None),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, QWEN3_THINKING_TEMPLATE),
    "mistral": ("MistralConfig", {"sliding_window": 16}, MISTRAL_TEMPLATE),
    "phi3": ("Phi3Config", {}, PHI_TEMPLATE),
    "gemma2": (
        "Gemma2Config",
        {**_GEMMA, "layer_types": ["sliding_attention", "full_attention"]},
        GEMMA_TEMPLATE,
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {**_GEMMA, "layer_types": ["sliding_attention", "full_attention"]},
        GEMMA_TEMPLATE,
    ),
}


def build_family_model(
    starter: Path,
    out: Path,
    family: str,
    *,
    words_only: bool = False,
    seed: int = 1234,
    tokens: tuple[str, ...] = (),
    template: str | None = None,
    width: int = 64,
) -> Path:
    """A 2-layer random model of one architecture family in our catalog, with SmolLM2's tokenizer.

    tokens are added to the tokenizer (as a reasoning model's <think> is), and template replaces the family's.
    Sliding-window families get a 16-token window, so a chat of a few hundred tokens is many windows long.
    words_only as in build_tiny_model. The scaled-up output layer keeps greedy picks far from ties. Another seed
    gives other random weights over the same tokenizer (a draft model that disagrees). width is the hidden size;
    each of the 4 heads gets a quarter of it.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_class, extra, family_template = FAMILIES[family]
    if "head_dim" in extra:
        extra = {**extra, "head_dim": width // 4}
    template = template or family_template
    tokenizer = AutoTokenizer.from_pretrained(starter)
    tokenizer.add_tokens(list(tokens))
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
        if words_only:
            _only_words(model, tokenizer)
    model.save_pretrained(out)
    if template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    return out


def build_chain_model(starter: Path, out: Path, chain: list[int]) -> Path:
    """A tiny Llama whose next token depends on the current token alone, and follows `chain` where it is in it.

    Attention and MLP outputs are zeroed, so the last hidden state is the current token's embedding: a bigram
    model. Each chain token's embedding is its own axis, and the next chain token's output row points along
    it, so greedy (and any temperature near 1) walks chain[0] -> chain[1] -> ... by a margin of hundreds of
    logits. Replies are then known in advance, which lets a test put a stop token inside an accepted draft.
    """
    build_family_model(starter, out, "llama")
    return follow_chains(out, [chain])


def follow_chains(folder: Path, chains: list[list[int]]) -> Path:
    """Make the model in `folder` a bigram model that walks each chain, as build_chain_model does. Chains may
    join (a token in two of them has the same successor in both), and each token pair takes a hidden axis."""
    import torch
    from transformers import AutoModelForCausalLM

    successors: dict[int, int] = {}
    for chain in chains:
        for token, successor in zip(chain, chain[1:], strict=False):
            assert successors.setdefault(token, successor) == successor, f"token {token} has two successors"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert len(successors) <= model.config.hidden_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        for axis, (token, successor) in enumerate(successors.items()):
            embed[token] = 0.0
            embed[token, axis] = 1.0
            head[successor, axis] = 100.0
    model.save_pretrained(folder)
    return folder
