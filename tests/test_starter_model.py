"""Integration tests on the real SmolLM2-135M-Instruct starter model (converted from its GGUF)."""

from __future__ import annotations

import pytest
from chathelpers import Chat

from chatapp.engine.bench import naive_turn
from chatapp.engine.session import Message

pytestmark = pytest.mark.integration

CONVERSATION = [
    "What is the capital of France?",
    "And what is the capital of Germany?",
    "Which of the two cities is larger?",
    "Name a famous museum in the first city.",
    "What language do they speak there?",
    "Thank you! Say goodbye in that language.",
]


def test_converted_checkpoint_is_a_normal_hf_folder(starter_folder):
    names = {p.name for p in starter_folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "chat_template.jinja" in names or "tokenizer_config.json" in names


def test_capital_of_france(starter_fp32):
    reply = Chat(starter_fp32).send("What is the capital of France?", max_new_tokens=30)
    assert "Paris" in reply.text
    assert reply.stats.finish_reason == "stop"


def test_six_turns_cached_equal_naive_and_prefill_only_new_tokens(starter_fp32):
    tok = starter_fp32.tokenizer
    chat = Chat(starter_fp32)
    history: list[Message] = []
    previous = None
    for turn, question in enumerate(CONVERSATION, 1):
        reply = chat.send(question, max_new_tokens=24)
        stats = reply.stats
        history.append(Message("user", question))
        expected, _ = naive_turn(starter_fp32, history, 24)
        assert reply.tokens == expected, f"turn {turn}"
        history.append(Message("assistant", chat.session.messages[-1].content))
        if turn > 1:
            glue = f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
            new = len(tok(glue, add_special_tokens=False)["input_ids"])
            assert stats.prefilled_tokens == new + (0 if previous == "stop" else 1)
        previous = stats.finish_reason


def test_ask_from_the_command_line(starter_folder):
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "chatapp.cli", "ask", "--model", "smollm2-135m-local"],
        input="What is the capital of France?\n",
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ.copy(),
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
