"""batchmon.tui: the Textual monitor. Only this package imports textual; it renders Snapshots and nothing else.

Entry point: ``batchmon.tui.app.run_monitor(source, interval=..., mouse=...)``.
"""
