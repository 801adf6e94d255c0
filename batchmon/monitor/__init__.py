"""Everything that runs in the monitor process: the hub (IO thread) and its pure state, step history, agent
sockets, remote boxes, replay, record/stream, export and the --once renderer. Never imports torch or textual."""
