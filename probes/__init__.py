"""Device and host probes (installed as batchmon.probes). No textual, no torch here."""
