"""The preset picker (F4): what fits on the machine, and a confirmation before one that won't."""

from __future__ import annotations

from uihelpers import make_app, make_settings, run, until

from chatapp.hardware import CpuInfo, Hardware


def test_the_preset_picker_shows_fits_and_asks_before_one_that_wont(settings, tiny_folder, tmp_path):
    from chatapp.facts import facts_from_folder
    from chatapp.planner import SAFETY_MARGIN, estimate

    # RAM between what nf4 and fp32 need: the planner says nf4 fits and fp32 doesn't.
    facts = facts_from_folder(tiny_folder)
    need = {
        p: estimate(facts, p, facts.max_context, device_type="cpu", bf16_supported=False).total_bytes
        for p in ("fp32", "nf4")
    }
    ram = int((need["fp32"] + need["nf4"]) / 2 / (1 - SAFETY_MARGIN))
    tight = Hardware(cpu=CpuInfo(ram_total_bytes=ram, ram_available_bytes=ram, flags=frozenset()))
    app = make_app(
        make_settings(settings, tmp_path), str(tiny_folder), preset="nf4", start_worker=False, hardware=tight
    )

    async def check(pilot):
        await pilot.pause()
        await pilot.press("f4")
        await until(pilot, lambda: type(app.screen).__name__ == "PresetScreen", what="the preset picker")
        options = app.screen.query_one("#presets")
        texts = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert texts[3].startswith("fp32  ✗ needs") and "won't fit" in texts[3]
        assert texts[5].startswith("nf4   ✓") and texts[5].endswith(" GB on cpu (loaded)")
        options.highlighted = 3
        await pilot.press("enter")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", what="the confirmation")
        assert "fp32 won't fit on this machine" in str(app.screen.query_one("Label").content)
        await pilot.click("#no")
        await pilot.pause()
        assert app.backend.preset == "nf4" and app.backend.fallback is None  # nothing was reloaded

    run(app, check)


def test_the_preset_picker_says_what_a_switch_costs_this_chat(settings, tiny_folder, tmp_path):
    from uihelpers import last_stats, loaded, say

    app = make_app(make_settings(settings, tmp_path, max_new_tokens=8), str(tiny_folder), preset="fp32", fake=True)

    async def check(pilot):
        await loaded(pilot)
        await say(pilot, "A message worth a few tokens of cache")
        held = last_stats(app)["cache_tokens"]
        await pilot.press("f4")
        await until(pilot, lambda: type(app.screen).__name__ == "PresetScreen", what="the preset picker")
        cost = str(app.screen.query_one("#switch-cost").content)
        assert cost.startswith(f"After a switch, this chat's next reply re-reads {held:,} tokens")
        assert cost.endswith("stays on disk for a switch back.")
        await pilot.press("escape")
        app.action_models()
        await until(pilot, lambda: app.screen.query("#switch-cost") and app.screen.is_mounted, what="the model picker")
        await pilot.pause()
        assert str(app.screen.query_one("#switch-cost").content) == cost

    run(app, check)
