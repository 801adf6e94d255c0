"""Everything that runs inside the training process: the only place torch is imported.

handle (attach, the AgentHandle), accounting (byte counting), transport (the socket thread, torch-free),
process_memory (per-process NVML off the training thread), bootstrap (`batchmon run`'s sitecustomize) and the
trainer integrations. Kept empty so that importing one of them loads neither torch nor the others.
"""
