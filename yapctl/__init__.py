"""yapctl: the operator's CLI and TUI for yapd."""
