"""The model picker: recommended, catalog, downloaded and Hub search, with fit verdicts, downloads and delete."""

from __future__ import annotations

from dataclasses import replace

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import (
    Button,
    DataTable,
    Footer,
    Input,
    Label,
    ProgressBar,
    Static,
    TabbedContent,
    TabPane,
)

from ... import choices, units
from ...errors import ChatappError
from ...units import gb
from ..backend import DownloadEnded, DownloadUpdate, Target
from ..widgets import download_line, hardware_line
from .dialogs import ConfirmScreen

TABS = ("recommended", "catalog", "downloaded", "search")
COLUMNS = ("model", "speed", "fit on this machine", "params", "download", "license", "context")


def _cells(row: choices.ModelRow) -> tuple[str, ...]:
    """A row's cells, in COLUMNS' order."""
    if row.ready:
        size = gb(row.size_on_disk) if row.size_on_disk else "ready"
    else:
        size = f"≈{gb(row.download_bytes)}" if row.download_bytes else "-"
    license_text = ("gated · " if row.gated else "") + (row.license or "")
    context = f"{row.context:,}" if row.context else "-"
    return (row.name, row.speed, row.verdict, units.params(row.params), size, license_text or "-", context)


class ModelPickerScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("enter", "choose", "Choose", show=True),
        Binding("x", "delete", "Delete download"),
        Binding("slash", "search", "Search the Hub"),
    ]

    def __init__(self):
        super().__init__()
        self.rows: dict[str, list[choices.ModelRow]] = {tab: [] for tab in TABS}
        #: The name of the model being downloaded from here, if any; and its row and target, to ask about them.
        self.downloading: str | None = None
        self.download_row: choices.ModelRow | None = None
        self.download_target: Target | None = None

    def compose(self) -> ComposeResult:
        yield Label("Choose a model", id="picker-title", markup=False)
        yield Static("", id="switch-cost", markup=False)
        with Horizontal(id="picker-body"):
            with Vertical(id="picker-lists"):
                with TabbedContent(id="picker-tabs", initial="recommended"):
                    for tab in TABS:
                        with TabPane(f"{tab.capitalize()}" if tab != "search" else "Search the Hub", id=tab):
                            if tab == "search":
                                yield Input(placeholder="Search text-generation models, then Enter", id="hub-query")
                            yield DataTable(id=f"table-{tab}", cursor_type="row", zebra_stripes=True)
            with VerticalScroll(id="picker-details"):
                yield Static("", id="details", markup=False)
        with Horizontal(id="download-box"):
            yield Label("", id="download-label", markup=False)
            yield ProgressBar(id="download-bar", show_eta=False)
            yield Button("Cancel download", id="download-cancel", variant="warning")
        yield Label("", id="picker-error", classes="error", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        cost = self.app.chat.switch_cost() if self.app.backend.loaded else ""
        self.query_one("#switch-cost", Static).update(cost)
        self.query_one("#switch-cost").display = bool(cost)
        self.query_one("#download-box").display = False
        self.query_one("#picker-error").display = False
        for tab in TABS:
            self.query_one(f"#table-{tab}", DataTable).add_columns(*COLUMNS)
        self.app.backend.listen(self)
        self.refresh_rows()

    def on_unmount(self) -> None:
        self.app.backend.unlisten(self)

    @work(thread=True, exclusive=True, group="rows")
    def refresh_rows(self) -> None:
        """Plan every catalog and downloaded model for this machine, in a thread: the HF cache scan, the
        safetensors headers and the GPU driver all take time."""
        from ... import hub

        local = {m.repo_id: m for m in hub.list_local()}
        catalog = self.app.catalog()
        hw = self.app.hardware
        cap = self.app.settings.context_cap
        rows = {"catalog": choices.catalog_rows(catalog, hw, local, cap)}
        rows["recommended"] = choices.recommended(rows["catalog"])
        known = {spec.repo for spec in catalog.values()}
        downloaded = [r for r in rows["catalog"] if r.size_on_disk]
        downloaded += choices.local_rows({k: v for k, v in local.items() if k not in known}, hw, cap)
        rows["downloaded"] = downloaded
        self.app.call_from_thread(self._show_rows, rows, hardware_line(hw))

    def _show_rows(self, rows: dict[str, list[choices.ModelRow]], machine: str) -> None:
        self.query_one("#picker-title", Label).update(f"Choose a model · this machine: {machine}")
        self.rows.update(rows)
        for tab in rows:
            self._fill(tab)

    def _fill(self, tab: str) -> None:
        table = self.query_one(f"#table-{tab}", DataTable)
        # Text, not str: a DataTable reads a str as markup, and names and licenses come from user files and the
        # Hub ("[@click=app.quit]" would be an action, a stray "[/]" a crash).
        rows = [[Text(cell) for cell in _cells(row)] for row in self.rows[tab]]
        # Widths set here, not measured by the table: it measures new rows on an idle, and lines it painted before
        # that kept their header-wide columns until something else repainted them.
        table.clear(columns=True)
        for i, label in enumerate(COLUMNS):
            table.add_column(label, width=max([len(label), *(cells[i].cell_len for cells in rows)]))
        for row, cells in zip(self.rows[tab], rows, strict=True):
            table.add_row(*cells, key=row.ref)
        if tab == self._active_tab():
            self._show_details()

    def _active_tab(self) -> str:
        return self.query_one("#picker-tabs", TabbedContent).active or "recommended"

    def selected(self) -> choices.ModelRow | None:
        tab = self._active_tab()
        table = self.query_one(f"#table-{tab}", DataTable)
        rows = self.rows[tab]
        if not rows or table.cursor_row is None or table.cursor_row >= len(rows):
            return None
        return rows[table.cursor_row]

    def _show_details(self) -> None:
        row = self.selected()
        self.query_one("#details", Static).update(row.details() if row else "")

    @on(DataTable.RowHighlighted)
    def _highlighted(self) -> None:
        self._show_details()

    @on(TabbedContent.TabActivated)
    def _tab_changed(self) -> None:
        self._show_details()

    @on(DataTable.RowSelected)
    def _row_selected(self) -> None:
        self.action_choose()

    # -- search ------------------------------------------------------------------------------

    def action_search(self) -> None:
        self.query_one("#picker-tabs", TabbedContent).active = "search"
        self.query_one("#hub-query", Input).focus()

    @on(Input.Submitted, "#hub-query")
    def _query(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.query_one("#picker-error").display = False
            self._search(event.value.strip())

    @work(thread=True, exclusive=True, group="search")
    def _search(self, text: str) -> None:
        from ... import hub

        try:
            results = hub.search(text, 30)
            local = {m.repo_id: m for m in hub.list_local()}
            rows = choices.search_rows(results, self.app.hardware, local)
        except ChatappError as exc:
            self.app.call_from_thread(self.show_error, str(exc))
            return
        self.app.call_from_thread(self._searched, rows, text)

    def _searched(self, rows: list[choices.ModelRow], text: str) -> None:
        self.rows["search"] = rows
        self._fill("search")
        if not rows:
            self.show_error(f"no text-generation models match '{text}'")
        else:
            self.query_one("#table-search", DataTable).focus()

    def show_error(self, text: str, notify: bool = True) -> None:
        label = self.query_one("#picker-error", Label)
        label.update(text)
        label.display = True
        if notify:
            self.notify(text, severity="error", timeout=10)

    # -- choose, download, delete ------------------------------------------------------------

    def action_choose(self) -> None:
        row = self.selected()
        if row is None or self.downloading is not None:
            return
        choice = row.plan.choice if row.fits else None
        target = Target(
            row.ref,
            row.preset,
            choice.max_context_tokens if choice else None,
            choice.attn_implementation if choice else None,
        )
        if row.ready:
            self.app.backend.switch(target)
            self.dismiss_to_chat()
            return
        self._download(row, target)

    def _download(self, row: choices.ModelRow, target: Target) -> None:
        # The backend downloads it, then loads it with this plan; the box below shows the progress. First it
        # plans from the headers, and refuses (DownloadEnded.wont_fit) what can't fit: then the user is asked.
        self.downloading, self.download_row, self.download_target = row.name, row, target
        self.query_one("#picker-error").display = False
        self.query_one("#download-box").display = True
        self.query_one("#download-label", Label).update(f"downloading {row.name}…")
        self.query_one("#download-bar", ProgressBar).update(total=None, progress=0)
        self.app.backend.switch(target)

    def dismiss_to_chat(self) -> None:
        if self.app.screen is self:
            self.app.pop_screen()

    @on(DownloadUpdate)
    def _progress(self, event: DownloadUpdate) -> None:
        if self.downloading is None:
            return
        self.query_one("#download-label", Label).update(
            f"{self.downloading}: {download_line(event.done, event.total, event.bytes_per_s)}"
        )
        self.query_one("#download-bar", ProgressBar).update(total=event.total or None, progress=event.done)

    @on(DownloadEnded)
    def _download_ended(self, event: DownloadEnded) -> None:
        name, self.downloading = self.downloading, None
        self.query_one("#download-box").display = False
        if name is None:
            return
        if event.error:
            self.show_error(event.error, notify=False)  # the chat screen tells the user once
            if event.wont_fit:
                self._ask_to_force(self.download_row, self.download_target)
            return
        self.notify(f"Downloaded {name}.", timeout=4)
        self.dismiss_to_chat()

    def _ask_to_force(self, row: choices.ModelRow, target: Target) -> None:
        def confirmed(yes: bool | None) -> None:
            if yes:
                self._download(row, replace(target, force=True))

        size = f" (about {gb(row.download_bytes)})" if row.download_bytes else ""
        question = f"{row.name} fits no preset on this machine, so it won't load here. Download it{size} anyway?"
        self.app.push_screen(ConfirmScreen(question, yes="Download anyway"), confirmed)

    @on(Button.Pressed, "#download-cancel")
    def _cancel_pressed(self) -> None:
        self.action_back()

    def action_back(self) -> None:
        if self.downloading is not None:
            self.app.backend.cancel_download()  # it stops at its next block; what arrived is kept for next time
            return
        self.dismiss_to_chat()

    def action_delete(self) -> None:
        row = self.selected()
        if row is None or not row.size_on_disk:
            self.notify("Only a downloaded model can be deleted.", timeout=3)
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self._delete(row)

        self.app.push_screen(ConfirmScreen(f"Delete the download of {row.name} ({gb(row.size_on_disk)})?"), confirmed)

    @work(thread=True, exclusive=True, group="delete")
    def _delete(self, row: choices.ModelRow) -> None:
        """Deleting gigabytes takes a while: in a thread, then the rows are planned again."""
        from ... import hub

        try:
            freed = hub.delete(self.app.source(row.ref).repo_id)
        except ChatappError as exc:
            self.app.call_from_thread(self.show_error, str(exc))
            return
        self.app.call_from_thread(self.notify, f"Deleted {row.name}: {gb(freed, 2)} freed.", timeout=6)
        self.app.call_from_thread(self.refresh_rows)
