"""Branches in the chat screen (issue 11 §3), driven with Pilot through the scripted FakeWorkerClient."""

from __future__ import annotations

from uihelpers import (
    FAKE_MODEL,
    last_stats,
    loaded,
    long_reply_app,
    make_app,
    make_settings,
    run,
    say,
    seeded_store,
    start_long_reply,
    until,
)

from chatapp import protocol as p
from chatapp.store import StoredMessage
from chatapp.ui.screens.edit_choice import EditChoiceScreen, edit_costs
from chatapp.ui.widgets import MessageView


def sidebar(app) -> list[str]:
    """The chats' titles as the sidebar shows them, without the two columns of the cache mark."""
    return [str(label.content)[2:] for label in app.chat.query_one("#chats").query("Label")]


def views(app) -> list[MessageView]:
    return list(app.chat.query(MessageView))


async def chat_of(pilot, *questions: str) -> int:
    await loaded(pilot)
    for question in questions:
        await say(pilot, question)
    return pilot.app.chat.conversation_id


async def press_on(pilot, position: int, *keys: str) -> None:
    view = next(v for v in views(pilot.app) if v.position == position)
    view.focus()
    await pilot.press(*keys)
    await pilot.pause(0.1)


def test_b_on_a_reply_branches_there_and_the_branch_starts_from_a_copy_of_the_cache(settings, tmp_path):
    app = make_app(make_settings(settings, tmp_path), fake=True)

    async def scenario(pilot):
        parent = await chat_of(pilot, "First question", "Second question", "Third question")
        await press_on(pilot, 3, "b")  # the reply to the second question
        chat, store = app.chat, app.store
        branch = store.conversation(chat.conversation_id)
        assert (branch.parent_id, branch.branch_point, branch.title) == (parent, 3, "First question ⑂")
        assert [m.content for m in store.messages(branch.id)] == [m.content for m in store.messages(parent)][:4]
        assert [v.position for v in views(app)] == [0, 1, 2, 3]
        assert p.Branch(branch.id, parent) in app.backend.client.received
        assert sidebar(app) == ["First question", "└ First question ⑂"]
        assert chat.query_one("#chats").index == 1 and chat.query_one("#prompt").has_focus
        assert any("“First question” stays as it was" in n for n in app.notices)

        await say(pilot, "Something else entirely")
        stats = last_stats(app)
        # The fake counts words as tokens: the branch's first reply reads its new message and nothing before it
        # (the parent's next turn began with the same "user:" marker).
        assert stats["prefilled_tokens"] == len("Something else entirely assistant:".split())
        assert stats["prompt_tokens"] > 20
        assert len(store.messages(parent)) == 6 and len(store.messages(branch.id)) == 6

    run(app, scenario)


def test_branching_from_a_message_of_the_users_puts_it_in_the_prompt_and_ctrl_b_branches_the_whole_chat(
    settings, tmp_path
):
    app = make_app(make_settings(settings, tmp_path), fake=True)

    async def scenario(pilot):
        parent = await chat_of(pilot, "First question", "Second question")
        chat, store = app.chat, app.store
        await press_on(pilot, 2, "b")
        branch = chat.conversation_id
        assert [m.content for m in store.messages(branch)] == [m.content for m in store.messages(parent)][:2]
        prompt = chat.query_one("#prompt")
        assert prompt.text == "Second question" and prompt.has_focus and chat.editing is None

        prompt.text = ""
        await pilot.press("ctrl+b")  # from the prompt: the chat up to its last message
        await pilot.pause(0.1)
        nested = store.conversation(chat.conversation_id)
        assert (nested.parent_id, nested.branch_point, len(store.messages(nested.id))) == (branch, 1, 2)
        assert sidebar(app) == ["First question", "└ First question ⑂", "  └ First question ⑂"]

        await pilot.press("ctrl+p")
        await pilot.pause(0.2)
        await pilot.press(*"Branch from here")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await until(pilot, lambda: store.conversation(chat.conversation_id).parent_id == nested.id, what="the branch")
        assert len(store.conversations()) == 4

    run(app, scenario)


def test_editing_an_early_message_offers_a_branch_and_says_what_each_costs(settings, tmp_path):
    app = make_app(make_settings(settings, tmp_path), fake=True)

    async def scenario(pilot):
        chat, store = app.chat, app.store
        # A turn of this model that prefilled 1,000 tokens in 2 s: the cost estimates go by 500 tokens/s.
        other = store.new_conversation("Long document")
        fast = {"prompt_tokens": 1000, "prefilled_tokens": 1000, "generated_tokens": 1, "ttft_s": 2.0}
        store.add_message(other.id, "assistant", "x", model=FAKE_MODEL, preset="fp32", stats=fast)
        await pilot.press("ctrl+n", "enter")  # the persona picker: none
        parent = await chat_of(pilot, "First question", "Second question", "Third question")
        messages = store.messages(parent)

        await press_on(pilot, 0, "e")
        dialog = app.screen
        assert isinstance(dialog, EditChoiceScreen)
        total = messages[-1].stats["prompt_tokens"] + messages[-1].stats["generated_tokens"]
        assert dialog.rewrite.startswith(f"deletes the 5 messages after it ({total:,} tokens)")
        assert dialog.note.endswith("nothing comes before it to re-read.")
        await pilot.press("escape")
        await pilot.pause(0.1)
        assert app.screen is chat and chat.editing is None

        await press_on(pilot, 2, "e")
        dialog = app.screen
        before = messages[1].stats["prompt_tokens"] + messages[1].stats["generated_tokens"]
        assert dialog.rewrite.startswith(f"deletes the 3 messages after it ({total - before:,} tokens)")
        assert dialog.note.endswith(f"it first re-reads {before} tokens, < 1s.")
        await pilot.press("b")
        await until(pilot, lambda: chat.conversation_id != parent, what="the branch")
        assert store.conversation(chat.conversation_id).parent_id == parent
        assert len(store.messages(chat.conversation_id)) == 2 and len(store.messages(parent)) == 6
        assert chat.query_one("#prompt").text == "Second question"

        await chat.open_conversation(parent)
        await press_on(pilot, 0, "e")
        await pilot.press("w")  # rewrite here: the edit as it was before branches
        await pilot.pause(0.1)
        assert chat.editing == 0 and chat.query_one("#prompt").text == "First question"
        assert chat.query_one("#edit-banner").display
        await pilot.press("escape")
        await press_on(pilot, 4, "e")  # the last message of the user's: nothing after it to lose, no question
        assert app.screen is chat and chat.editing == 4

    run(app, scenario)


def test_deleting_a_parent_keeps_its_branches_in_the_sidebar(settings, tmp_path):
    s = make_settings(settings, tmp_path)
    store = seeded_store(s)
    dinner = next(c for c in store.conversations() if c.title == "Dinner plans")
    store.branch(dinner.id, 1)
    app = make_app(s, store=store, start_worker=False)

    async def scenario(pilot):
        await pilot.pause()
        assert sidebar(app) == ["Dinner plans", "└ Dinner plans ⑂", "Python help"]
        await app.chat.open_conversation(dinner.id)
        await pilot.press("ctrl+d")
        await pilot.pause()
        assert "Its 1 branch(es) stay, as chats of their own." in str(app.screen.query_one("Label").content)
        await pilot.click("#yes")
        await pilot.pause(0.2)
        assert sidebar(app) == ["Dinner plans ⑂", "Python help"]

    run(app, scenario)


def test_no_branch_from_a_reply_being_written_or_from_an_empty_chat(settings, tmp_path):
    app = long_reply_app(settings, tmp_path, "Talk for long")

    async def scenario(pilot):
        await loaded(pilot)
        await start_long_reply(pilot, "Talk for long")
        await pilot.press("ctrl+b")
        next(v for v in views(app) if v.position < 0).focus()
        await pilot.press("b")
        await pilot.pause(0.1)
        assert len(app.store.conversations()) == 1
        assert sum("still being written" in n for n in app.notices) == 2
        await pilot.press("escape")
        await until(pilot, lambda: app.chat.turn is None, what="the stop")
        await pilot.press("ctrl+n", "enter", "ctrl+b")
        await pilot.pause(0.1)
        assert len(app.store.conversations()) == 2 and "Nothing to branch from yet." in app.notices

    run(app, scenario)


def test_edit_costs_without_stats_say_no_numbers():
    roles = ["user", "assistant", "user", "assistant"]
    messages = [StoredMessage(i, 1, i, role, "x", None, None, None, False, 0.0) for i, role in enumerate(roles)]
    assert edit_costs(messages, 2) == (1, None, None)
    assert edit_costs(messages, 0) == (3, None, 0)
    screen = EditChoiceScreen(1, None, None, None)
    assert screen.rewrite == "deletes the message after it and goes on from your edit"
    assert screen.note.endswith("or the model has a sliding window, it first re-reads the messages before it.")


def test_a_branch_through_the_real_worker_starts_warm(settings, tiny_words_folder, tmp_path):
    app = make_app(make_settings(settings, tmp_path), str(tiny_words_folder))

    async def scenario(pilot):
        parent = await chat_of(pilot, "Tell me about the bridge", "And the floods?")
        await press_on(pilot, 1, "b")  # the first reply
        assert app.chat.conversation_id != parent
        await say(pilot, "What about the mill pond?")
        stats = last_stats(app)
        # Read: the new message and the template's glue around it, not the two turns before it.
        assert 0 < stats["prefilled_tokens"] < 20 < stats["prompt_tokens"] - stats["prefilled_tokens"]
        await app.chat.open_conversation(parent)
        await say(pilot, "Thanks")
        assert last_stats(app)["prefilled_tokens"] < 20

    run(app, scenario)
