"""yapctl's live dashboard over the admin socket (Textual).

``run_tui(path)`` runs it until the operator quits; ``Dashboard`` is the app, for tests
and screenshots. Panels and dialogs are in :mod:`yapctl.tui.widgets`, the state that
needs no screen (reconnect timing, the log book) in :mod:`yapctl.tui.model`.
"""

from yapctl.tui.app import Dashboard, run_tui

__all__ = ["Dashboard", "run_tui"]
