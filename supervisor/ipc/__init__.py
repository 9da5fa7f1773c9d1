"""Inter-process messages: one typed class per kind and their wire forms (messages),
what each field may hold (fields), the one module that sends and receives them with
fds (channel), and the master-upgrade socket handoff (handoff)."""
